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


def _km_quantiles(durations: np.ndarray, fell: np.ndarray, levels: tuple[float, ...]) -> list[float | None]:
    """Quantiles of half-lives of which some are only known to exceed a duration (``fell`` False: the window
    ended first), by the Kaplan-Meier estimate: the smallest half-life at which at least the level's share has
    fallen; None when the window ends before that share did.

    Example:
        >>> _km_quantiles(np.array([1.0, 2.0, 3.0, 4.0]), np.array([True, True, True, True]), (0.25, 0.5))
        [1.0, 2.0]
        >>> _km_quantiles(np.array([1.0, 2.0, 3.0]), np.array([True, False, False]), (0.25, 0.5))
        [1.0, None]
    """
    order = np.lexsort((~fell, durations))  # at equal times the falls count before the windows that end
    d, f = durations[order], fell[order]
    survival = np.cumprod(np.where(f, 1.0 - 1.0 / (len(d) - np.arange(len(d))), 1.0))
    out = []
    for q in levels:
        hit = np.flatnonzero(f & (survival <= 1.0 - q + 1e-12))
        out.append(float(d[hit[0]]) if hit.size else None)
    return out


def _pairs(audit: StateAudit) -> pl.DataFrame:
    """Per (tag, layer, head): ``half_life`` (null: not within the window), ``window`` (time from the event to the
    window's end), and ``next_retention`` / ``next_gap``, retention at the first observation after the event and
    the time to it (null without one)."""
    keys = ["tag", "layer", "head"]
    observed = audit.energy.select("stream", "layer", "head", "step", "observed")
    rec = audit.recall.join(observed, on=["stream", "layer", "head", "step"], how="left")
    window = rec.group_by(keys).agg(pl.col("since").max().alias("window"))
    nxt = (rec.filter(pl.col("observed") & (pl.col("since") > 0)).sort("step").group_by(keys)
           .agg(pl.col("retention").first().alias("next_retention"), pl.col("since").first().alias("next_gap")))
    return (audit.associations.select(*keys, "half_life").join(window, on=keys, how="left")
            .join(nxt, on=keys, how="left"))


def summarize_audit(audit: StateAudit) -> pl.DataFrame:
    """One row per layer: the mean fraction of the state energy removed by decay and by erase and added by write
    per observed step (relative to the energy before the step; steps starting from an empty state are left out),
    and how long the tagged associations last.

    Columns: ``layer``, ``decay_removed``, ``erase_removed``, ``write_added``, ``tagged`` (tags), ``pairs``
    ((tag, head) pairs), ``fell_to_half`` (pairs whose retention fell to half within the window),
    ``half_life_q25``, ``median_half_life``, ``half_life_q75`` (quartiles of the interpolated half-lives, in the
    timestamps' units, by the Kaplan-Meier estimate: a pair still above half when the window ends counts as
    longer than its window; null where the window ended first), ``next_retention`` (median retention at the first
    observation after the event: the share of an observation's own write that one more observation leaves) and
    ``spacing`` (median time between observations of the audited streams).
    """
    e = audit.energy.filter(pl.col("observed") & (pl.col("energy_before") > 0))
    flows = e.group_by("layer").agg(
        (pl.col("decay_removed") / pl.col("energy_before")).mean().alias("decay_removed"),
        (-pl.col("erase_change") / pl.col("energy_before")).mean().alias("erase_removed"),
        (pl.col("write_change") / pl.col("energy_before")).mean().alias("write_added"))
    pairs = _pairs(audit)
    rows = []
    layers = audit.energy["layer"].unique().sort().to_list()
    for layer in layers:
        p = pairs.filter(pl.col("layer") == layer)
        fell = p["half_life"].is_not_null().to_numpy()
        durations = np.where(fell, p["half_life"].fill_null(0.0).to_numpy(), p["window"].to_numpy())
        q25, q50, q75 = _km_quantiles(durations, fell, (0.25, 0.5, 0.75)) if p.height else (None,) * 3
        rows.append({"layer": layer, "tagged": audit.associations.filter(pl.col("layer") == layer)["tag"].n_unique(),
                     "pairs": p.height, "fell_to_half": int(fell.sum()), "half_life_q25": q25,
                     "median_half_life": q50, "half_life_q75": q75,
                     "next_retention": p["next_retention"].median()})
    tags = pl.DataFrame(rows, schema={"layer": pl.Int32, "tagged": pl.Int64, "pairs": pl.Int64,
                                      "fell_to_half": pl.Int64, "half_life_q25": pl.Float64,
                                      "median_half_life": pl.Float64, "half_life_q75": pl.Float64,
                                      "next_retention": pl.Float64})
    gaps = (audit.energy.filter(pl.col("observed") & (pl.col("layer") == 0) & (pl.col("head") == 0))
            .sort("stream", "step").select(pl.col("time").diff().over("stream").alias("gap"))["gap"].median())
    out = pl.DataFrame({"layer": layers}, schema={"layer": pl.Int32}).join(flows, on="layer", how="left")
    return out.join(tags, on="layer", how="left").with_columns(pl.lit(gaps, dtype=pl.Float64).alias("spacing"))


def audit_summary_text(audit: StateAudit, unit: str = "time units", horizon: float | None = None) -> str:
    """:func:`summarize_audit` as a few lines of text (what a command prints), ending with what the half-lives
    mean: which layer forgets fastest and which keeps longest, in ``unit`` (the timestamps' unit, such as
    ``"h"``), and, given the forecast ``horizon`` in that unit, how much of an observation's own write the
    longest-keeping layer still holds that far ahead.

    Example:
        >>> import torch
        >>> from gdn2ts.models import EncoderConfig, StreamEncoder
        >>> from gdn2ts.streaming.audit import audit_encoder
        >>> enc = StreamEncoder(EncoderConfig(n_channels=1, hidden_size=8, num_heads=1, head_dim=4, horizon=2))
        >>> audit = audit_encoder(enc, torch.randn(1, 30, 1), torch.arange(30.0).double()[None], tags={"e": (0, 3)})
        >>> audit_summary_text(audit, unit="h", horizon=24).splitlines()[-1][:40]
        '  observations come every 1 h (median); '
        >>> summarize_audit(audit)["pairs"].to_list()
        [1, 1]
    """
    summary = summarize_audit(audit)

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    def span(x):
        return f"{x:.2g} {unit}"

    lines = ["state audit, per layer (mean per observed step, as a fraction of the state energy before it; "
             "half-lives of the tagged observations' own writes):"]
    for r in summary.iter_rows(named=True):
        line = (f"  layer {r['layer']}: decay removes {pct(r['decay_removed'])}, erase removes "
                f"{pct(r['erase_removed'])}, write adds {pct(r['write_added'])}; {r['tagged']} "
                f"tag{'' if r['tagged'] == 1 else 's'}")
        if r["pairs"]:
            half = ("longer than the window" if r["median_half_life"] is None else
                    f"{span(r['median_half_life'])} median")
            q25, q75 = r["half_life_q25"], r["half_life_q75"]
            quartiles = (f"{q25:.2g}-{q75:.2g} {unit}" if q75 is not None else
                         f"{span(q25)} to beyond the window" if q25 is not None else "beyond the window")
            line += (f": half-life {half} (quartiles {quartiles}; {r['fell_to_half']} of {r['pairs']} tag-head "
                     f"pairs fell to half within the window)")
            if r["next_retention"] is not None:
                line += f", {pct(r['next_retention'])} left one observation later"
        lines.append(line)
    known = summary.filter(pl.col("pairs") > 0)
    if known.height:
        lines.append("  " + _meaning(known, unit, horizon))
    return "\n".join(lines)


def _meaning(summary: pl.DataFrame, unit: str, horizon: float | None) -> str:
    """What the half-lives imply: the fastest- and the longest-keeping layer, against the spacing of the
    observations, and (with a horizon) what the longest-keeping layer holds of one observation's own write that far
    ahead."""
    spacing = summary["spacing"][0]
    inf = float("inf")
    medians = [inf if m is None else m for m in summary["median_half_life"].to_list()]
    layers = summary["layer"].to_list()
    fast, slow = int(np.argmin(medians)), int(np.argmax(medians))

    def told(m):
        return "more than half of them outlast the window" if m == inf else f"{m:.2g} {unit}"

    text = "" if spacing is None else f"observations come every {spacing:.2g} {unit} (median); "
    text += (f"layer {layers[fast]} forgets fastest: half of an observation's own write is gone after "
             f"{told(medians[fast])} (median)")
    if slow != fast:
        text += f"; layer {layers[slow]} keeps longest: {told(medians[slow])}"
    if horizon is not None and medians[slow] < inf:
        left = 0.5 ** (horizon / medians[slow])
        text += (f". At the forecast horizon, {horizon:g} {unit} ahead, layer {layers[slow]} holds about "
                 f"{100 * left:.2g}% of it: "
                 + ("forecasts that far ahead rest on the weights and on what recent observations keep writing, "
                    "not on the memory of single events" if left < 0.05 else
                    "a single event's own write still reaches forecasts that far ahead, fading over the horizon"))
    return text + "."


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


def _log_linear(x: np.ndarray, y: np.ndarray, points: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The curve through ``(x, y)`` drawn as the half-lives interpolate it: log-linearly between points that are
    both positive, linearly otherwise.

    Example:
        >>> _log_linear(np.array([0.0, 2.0]), np.array([1.0, 0.25]), points=3)[1].tolist()
        [1.0, 0.5, 0.25]
    """
    if x.size < 2:
        return x, y
    t = np.linspace(0.0, 1.0, points)[:-1]
    y0, y1 = y[:-1, None], y[1:, None]
    positive = (y0 > 0) & (y1 > 0)
    ratio = np.where(positive, y1 / np.where(positive, y0, 1.0), 1.0)
    mid = np.where(positive, y0 * ratio ** t, y0 + (y1 - y0) * t)
    xs = x[:-1, None] + (x[1:, None] - x[:-1, None]) * t
    return np.append(xs.ravel(), x[-1]), np.append(mid.ravel(), y[-1])


def _plot_recall(ax, audit: StateAudit, stream: str) -> None:
    observed = audit.energy.select("stream", "layer", "head", "step", "observed")
    recall = (audit.recall.filter(pl.col("stream") == stream)
              .join(observed, on=["stream", "layer", "head", "step"], how="left").filter(pl.col("observed")))
    assoc = audit.associations.filter(pl.col("stream") == stream)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for r in assoc.iter_rows(named=True):
        curve = recall.filter((pl.col("tag") == r["tag"]) & (pl.col("layer") == r["layer"])
                              & (pl.col("head") == r["head"])).sort("step")
        color = colors[r["layer"] % len(colors)]
        # known at observations (the state changes only there), interpolated between as the half-lives are
        x, y = _log_linear(curve["since"].to_numpy(), curve["retention"].to_numpy())
        ax.plot(x, y, lw=0.8, alpha=0.7, color=color, label=f"layer {r['layer']}")
        if r["half_life"] is not None:
            ax.plot([r["half_life"]], [0.5], "o", ms=4, color=color)
    ax.axhline(0.5, color="grey", ls="--", lw=0.7)
    # half-lives are short next to the window: a log scale beyond one time unit shows both
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(left=0.0)
    ax.set_xlabel("time since the tagged event (linear below 1, log above)")
    ax.set_ylabel("retention")
    ax.set_title(f"stream {stream}: retention of tagged associations (one line per tag and head, log-linear "
                 "between observations; dots: half-lives)", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    if unique:
        ax.legend(unique.values(), unique.keys(), fontsize=7)
