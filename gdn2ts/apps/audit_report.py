"""What to do with a :class:`~gdn2ts.streaming.audit.StateAudit`: append it to Parquet logs, summarize it per
layer, draw it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from gdn2ts.streaming.audit import SCHEMAS, StateAudit

__all__ = ["append_parquet", "append_audit_log", "summarize_audit", "audit_summary_text", "plot_audit"]


def append_parquet(frame: pl.DataFrame, path: str | os.PathLike) -> Path:
    """Append ``frame`` to the Parquet file ``path`` (created when absent); returns the path.

    The file's columns and types must equal the frame's (``ValueError`` naming both otherwise, the file left as
    it was). The new file is written beside the old one, synced, and renamed over it, so a reader or a crash
    sees either the old rows or all of them, never part.

    Example:
        >>> import polars as pl, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "log.parquet")
        >>> _ = append_parquet(pl.DataFrame({"x": [1, 2]}), path)
        >>> pl.read_parquet(append_parquet(pl.DataFrame({"x": [3]}), path))["x"].to_list()
        [1, 2, 3]
    """
    path = Path(path)
    if not isinstance(frame, pl.DataFrame):
        raise ValueError(f"append_parquet: argument 'frame' expected a polars DataFrame, got {type(frame).__name__}")
    if path.exists():
        old = pl.read_parquet(path)
        if old.schema != frame.schema:
            raise ValueError(f"append_parquet: {path} holds columns {dict(old.schema)}, expected the frame's "
                             f"{dict(frame.schema)}")
        frame = pl.concat([old, frame])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            frame.write_parquet(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def append_audit_log(audit: StateAudit, directory: str | os.PathLike) -> dict[str, Path]:
    """Append each of the audit's tables to ``directory/audit_<table>.parquet``; returns the paths by table.

    Every file's schema is checked before any is written, so a mismatch changes none of them.
    """
    directory = Path(directory)
    paths = {name: directory / f"audit_{name}.parquet" for name in SCHEMAS}
    for name, frame in audit.tables().items():
        if paths[name].exists():
            old = pl.read_parquet_schema(paths[name])
            if dict(old) != dict(frame.schema):
                raise ValueError(f"append_audit_log: {paths[name]} holds columns {dict(old)}, expected the "
                                 f"'{name}' table's {dict(frame.schema)}")
    for name, frame in audit.tables().items():
        append_parquet(frame, paths[name])
    return paths


def summarize_audit(audit: StateAudit) -> pl.DataFrame:
    """One row per layer: the mean fraction of the state energy removed by decay and by erase and added by write
    per observed step (relative to the energy before the step; steps starting from an empty state are left out),
    and the median half-life of the tagged associations (null without one that fell to half).

    Columns: ``layer``, ``decay_removed``, ``erase_removed``, ``write_added``, ``tagged`` (tags), ``pairs``
    ((tag, head) pairs), ``fell_to_half`` (pairs whose retention fell to half), ``median_half_life`` (over those).
    """
    e = audit.energy.filter(pl.col("observed") & (pl.col("energy_before") > 0))
    flows = e.group_by("layer").agg(
        (pl.col("decay_removed") / pl.col("energy_before")).mean().alias("decay_removed"),
        (-pl.col("erase_change") / pl.col("energy_before")).mean().alias("erase_removed"),
        (pl.col("write_change") / pl.col("energy_before")).mean().alias("write_added"))
    tags = audit.associations.group_by("layer").agg(
        pl.col("tag").n_unique().cast(pl.Int64).alias("tagged"),
        pl.len().cast(pl.Int64).alias("pairs"),
        pl.col("half_life").is_not_null().sum().cast(pl.Int64).alias("fell_to_half"),
        pl.col("half_life").median().alias("median_half_life"))
    layers = audit.energy.select(pl.col("layer").unique().sort())
    out = layers.join(flows, on="layer", how="left").join(tags, on="layer", how="left")
    return out.with_columns(pl.col("tagged", "pairs", "fell_to_half").fill_null(0)).sort("layer")


def audit_summary_text(audit: StateAudit) -> str:
    """:func:`summarize_audit` as a few lines of text (what a command prints)."""
    lines = ["state audit, per layer (mean per observed step, as a fraction of the state energy before it):"]
    for r in summarize_audit(audit).iter_rows(named=True):
        def pct(x):
            return "n/a" if x is None else f"{100 * x:.1f}%"

        half = "n/a" if r["median_half_life"] is None else f"{r['median_half_life']:.3g}"
        lines.append(f"  layer {r['layer']}: decay removes {pct(r['decay_removed'])}, erase removes "
                     f"{pct(r['erase_removed'])}, write adds {pct(r['write_added'])}; {r['tagged']} tags: "
                     f"{r['fell_to_half']} of {r['pairs']} (tag, head) pairs fell to half, median half-life {half}")
    return "\n".join(lines)


def _pick_stream(audit: StateAudit, stream: str | None) -> str:
    streams = audit.energy["stream"].unique(maintain_order=True).to_list()
    if stream is None:
        tagged = audit.associations["stream"].to_list()
        return tagged[0] if tagged else streams[0]
    if stream not in streams:
        raise ValueError(f"plot_audit: argument 'stream' names unknown stream {stream!r}; expected one of {streams}")
    return stream


def plot_audit(audit: StateAudit, path: str | os.PathLike | None = None, stream: str | None = None,
               top_channels: int = 12) -> Figure:
    """Draw one stream's audit: energy flows over time per layer (summed over heads, tagged events marked), the
    key channels its erases hit hardest, and the recall curves of its tagged associations with their half-lives.

    Args:
        audit: from :func:`~gdn2ts.streaming.audit.audit_encoder`.
        path: where to save the figure (format from the suffix); not saved when None.
        stream: the stream drawn (default: the first tagged one, else the first).
        top_channels: bars in the erased-channels panel.

    Returns:
        the matplotlib ``Figure`` (no pyplot state is touched).
    """
    stream = _pick_stream(audit, stream)
    energy = audit.energy.filter(pl.col("stream") == stream)
    layers = energy["layer"].unique().sort().to_list()
    assoc = audit.associations.filter(pl.col("stream") == stream)
    events = assoc.select("tag", "event_time").unique(maintain_order=True)
    fig = Figure(figsize=(13, 2.6 * len(layers) + 3.2), layout="constrained")
    grid = fig.add_gridspec(len(layers) + 1, 2, width_ratios=[2.2, 1])
    for i, layer in enumerate(layers):
        ax = fig.add_subplot(grid[i, 0])
        flows = (energy.filter(pl.col("layer") == layer).group_by("step", "time", maintain_order=True)
                 .agg(pl.col("decay_removed", "erase_change", "write_change", "energy_after").sum()).sort("step"))
        t = flows["time"].to_numpy()
        ax.plot(t, flows["write_change"].to_numpy(), lw=0.8, color="tab:green", label="write (change)")
        ax.plot(t, flows["erase_change"].to_numpy(), lw=0.8, color="tab:red", label="erase (change)")
        ax.plot(t, -flows["decay_removed"].to_numpy(), lw=0.8, color="tab:blue", label="decay (-removed)")
        ax.axhline(0.0, color="grey", lw=0.5)
        ax2 = ax.twinx()
        ax2.plot(t, flows["energy_after"].to_numpy(), lw=1.2, color="black", label="energy ||S||^2")
        ax2.set_ylabel("energy")
        for ev in events.iter_rows(named=True):
            ax.axvline(ev["event_time"], color="tab:purple", ls=":", lw=1)
        ax.set_ylabel("change per step")
        ax.set_title(f"stream {stream}, layer {layer}: energy flows (heads summed)", fontsize=10)
        if i == 0:
            handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
            ax.legend(handles=handles, fontsize=7, loc="upper left", ncols=4)
    ax.set_xlabel("time")
    _plot_channels(fig.add_subplot(grid[:len(layers), 1]), audit, stream, top_channels)
    _plot_recall(fig.add_subplot(grid[len(layers), :]), audit, stream)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    return fig


def _plot_channels(ax, audit: StateAudit, stream: str, top: int) -> None:
    mass = (audit.channels.filter(pl.col("stream") == stream).group_by("layer", "head", "channel")
            .agg(pl.col("erase_mass").sum()).sort("erase_mass", descending=True).head(top))
    labels = [f"L{r['layer']} h{r['head']} k{r['channel']}" for r in mass.iter_rows(named=True)]
    ax.barh(np.arange(len(labels))[::-1], mass["erase_mass"].to_numpy(), color="tab:red")
    ax.set_yticks(np.arange(len(labels))[::-1], labels, fontsize=7)
    ax.set_xlabel("erase mass, summed over the window")
    ax.set_title("key channels erased most", fontsize=10)


def _plot_recall(ax, audit: StateAudit, stream: str) -> None:
    recall = audit.recall.filter(pl.col("stream") == stream)
    assoc = audit.associations.filter(pl.col("stream") == stream)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for r in assoc.iter_rows(named=True):
        curve = recall.filter((pl.col("tag") == r["tag"]) & (pl.col("layer") == r["layer"])
                              & (pl.col("head") == r["head"]))
        color = colors[r["layer"] % len(colors)]
        # the state changes only at observations: hold each value until the next one
        ax.plot(curve["since"].to_numpy(), curve["retention"].to_numpy(), lw=0.8, alpha=0.7, color=color,
                drawstyle="steps-post", label=f"layer {r['layer']}")
        if r["half_life"] is not None:
            ax.plot([r["half_life"]], [0.5], "o", ms=4, color=color)
    ax.axhline(0.5, color="grey", ls="--", lw=0.7)
    # half-lives are short next to the window: a log scale beyond one time unit shows both
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(left=0.0)
    ax.set_xlabel("time since the tagged event (linear below 1, log above)")
    ax.set_ylabel("retention")
    ax.set_title(f"stream {stream}: recall of tagged associations (one line per tag and head; dots: half-lives)",
                 fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    if unique:
        ax.legend(unique.values(), unique.keys(), fontsize=7)
