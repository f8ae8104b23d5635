"""Eviction audits: what each step's decay, erase and write did to every stream's GDN-2 state.

Per value head the recurrence is ``S_t = (I - k (b * k)^T) Diag(exp(g)) S_{t-1} + k (w * v)^T`` (docs/gdn2.md).
The audit replays it in float64 from the op inputs the encoder's own forward produced, and splits each step's
change of the state energy ``||S||_F^2`` into three terms taken in the op's order:

    energy_after = energy_before - decay_removed + erase_change + write_change        (exactly)

For associations registered at tagged events it keeps the written key ``k_e`` and value ``u_e = w_e * v_e``
and follows how well later states still return ``u_e`` for ``k_e`` (``recall``), and how much of the event's own
write survives the later decays and erases (``retention``, 1 at the event; its half-life, interpolated in time
between observations, is reported). Tables are polars DataFrames; :mod:`gdn2ts.apps.audit_report` appends them
to Parquet logs, summarizes and plots them. See docs/audit.md.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from gdn2ts.layers.gdn2 import GatedDeltaNet2
from gdn2ts.models import EncoderState, StreamEncoder

__all__ = ["StateAudit", "audit_encoder", "SCHEMAS"]

# Column types of every table, also the schema a Parquet log must match before an append.
SCHEMAS: dict[str, dict[str, pl.DataType]] = {
    "energy": {"stream": pl.String, "layer": pl.Int32, "head": pl.Int32, "step": pl.Int32, "time": pl.Float64,
               "observed": pl.Boolean, "energy_before": pl.Float64, "decay_removed": pl.Float64,
               "erase_change": pl.Float64, "write_change": pl.Float64, "energy_after": pl.Float64},
    "channels": {"stream": pl.String, "layer": pl.Int32, "head": pl.Int32, "step": pl.Int32, "time": pl.Float64,
                 "channel": pl.Int32, "erase_mass": pl.Float64, "erase_change": pl.Float64},
    "associations": {"tag": pl.String, "stream": pl.String, "layer": pl.Int32, "head": pl.Int32,
                     "event_step": pl.Int32, "event_time": pl.Float64, "key_norm": pl.Float64,
                     "value_norm": pl.Float64, "half_life": pl.Float64},
    "recall": {"tag": pl.String, "stream": pl.String, "layer": pl.Int32, "head": pl.Int32, "step": pl.Int32,
               "time": pl.Float64, "since": pl.Float64, "recall": pl.Float64, "retention": pl.Float64},
}


@dataclass(frozen=True)
class StateAudit:
    """The audit of one window of ``B`` streams through a :class:`StreamEncoder` (one row per the keys named).

    Example:
        >>> import torch
        >>> from gdn2ts.models import EncoderConfig, StreamEncoder
        >>> enc = StreamEncoder(EncoderConfig(n_channels=2, hidden_size=16, num_heads=2, head_dim=8, horizon=2))
        >>> values, times = torch.randn(1, 6, 2), torch.arange(6.0).double()[None]
        >>> audit = audit_encoder(enc, values, times, tags={"onset": (0, 2)})
        >>> audit.energy.height, audit.channels.height, audit.associations.height, audit.recall.height
        (24, 192, 4, 16)
    """

    energy: pl.DataFrame
    """Per (stream, layer, head, step): ``energy_before`` ``||S_{t-1}||^2``; ``decay_removed``
    ``||S_{t-1}||^2 - ||D S_{t-1}||^2`` (>= 0); ``erase_change`` and ``write_change``, the signed changes of the
    erase and the write; ``energy_after`` ``||S_t||^2``; ``observed`` (False: an identity step, all changes 0)."""
    channels: pl.DataFrame
    """Per (stream, layer, head, step, key channel): ``erase_mass``, the squared norm of the erase term's row
    ``k_i r`` (``r = (D S)^T (b * k)``, what the erase reads); ``erase_change``, that state row's energy change by
    the erase (summing over channels gives the energy table's ``erase_change``)."""
    associations: pl.DataFrame
    """Per (tag, layer, head): the event's ``stream``, ``event_step``, ``event_time``, ``key_norm`` ``||k_e||``,
    ``value_norm`` ``||w_e * v_e||`` and ``half_life`` (time from the event until ``retention`` falls to 0.5, in
    the timestamps' units, interpolated log-linearly in time between the observations either side of the crossing;
    null when it stays above half within the window)."""
    recall: pl.DataFrame
    """Per (tag, layer, head, step >= event step): ``since`` (time since the event); ``recall``
    ``<S_t^T k_e, u_e> / (||k_e||^2 ||u_e||^2)`` (what the whole state returns for the key, other writes
    included); ``retention`` (the same for the event's own write carried through the later decays and erases
    alone: exactly 1 at the event)."""

    def tables(self) -> dict[str, pl.DataFrame]:
        """The four tables by name (the keys of :data:`SCHEMAS`)."""
        return {"energy": self.energy, "channels": self.channels, "associations": self.associations,
                "recall": self.recall}


def _frame(name: str, columns: dict[str, np.ndarray]) -> pl.DataFrame:
    schema = SCHEMAS[name]
    return pl.DataFrame({c: pl.Series(c, columns[c], dtype=schema[c]) for c in schema}, schema=schema)


def _check_stream_ids(stream_ids, B: int) -> list[str]:
    if stream_ids is None:
        return [str(i) for i in range(B)]
    if isinstance(stream_ids, str) or not isinstance(stream_ids, Sequence):
        raise ValueError(f"audit_encoder: argument 'stream_ids' expected a sequence of {B} strings, got "
                         f"{type(stream_ids).__name__}")
    ids = list(stream_ids)
    if len(ids) != B or not all(isinstance(s, str) for s in ids) or len(set(ids)) != B:
        raise ValueError(f"audit_encoder: argument 'stream_ids' expected {B} distinct strings (one per row of "
                         f"values), got {ids!r}")
    return ids


def _check_tags(tags, ids: list[str], observed: torch.Tensor) -> list[tuple[str, int, int]]:
    """``tags`` (mapping or ``[B, T]`` bool) -> ``[(name, row, step)]``; every failure names the tag."""
    B, T = observed.shape
    if tags is None:
        return []
    events = []
    if isinstance(tags, Mapping):
        for name, where in tags.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"audit_encoder: argument 'tags' expected non-empty string names, got {name!r}")
            if not isinstance(where, (tuple, list)) or len(where) != 2:
                raise ValueError(f"audit_encoder: tag {name!r} expected a (stream, step) pair, got {where!r}")
            stream, step = where
            if isinstance(stream, str):
                if stream not in ids:
                    raise ValueError(f"audit_encoder: tag {name!r} names unknown stream {stream!r}; expected one "
                                     f"of {ids}")
                row = ids.index(stream)
            elif isinstance(stream, (int, np.integer)) and not isinstance(stream, bool) and 0 <= stream < B:
                row = int(stream)
            else:
                raise ValueError(f"audit_encoder: tag {name!r} names unknown stream {stream!r}; expected a stream "
                                 f"id or a row index in [0, {B})")
            if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= step < T:
                raise ValueError(f"audit_encoder: tag {name!r} has step {step!r} out of range; expected an int in "
                                 f"[0, {T})")
            events.append((name, row, int(step)))
    else:
        column = torch.as_tensor(tags)
        if column.dtype != torch.bool or tuple(column.shape) != (B, T):
            raise ValueError(f"audit_encoder: argument 'tags' expected a mapping name -> (stream, step) or a bool "
                             f"[B={B}, T={T}] column, got {column.dtype} of shape {tuple(column.shape)}")
        events = [(f"{ids[r]}@{s}", int(r), int(s)) for r, s in column.cpu().nonzero().tolist()]
    for name, row, step in events:
        if not bool(observed[row, step]):
            raise ValueError(f"audit_encoder: tag {name!r} marks step {step} of stream {ids[row]!r}, where nothing "
                             f"is observed (an identity step writes no association); expected an observed step")
    return events


def _capture_mixer_calls(encoder: StreamEncoder, values, timestamps, covariates, state):
    """Run the encoder's forward once, recording each mixer's call arguments (its input, state, mask and decay
    scale): the audit then sees exactly what the model's own forward fed each layer, without a second copy of
    the forward. The hooks are removed whatever happens."""
    calls: list[dict] = []

    def record(module, args, kwargs):
        calls.append(dict(inspect.signature(module.forward).bind(*args, **kwargs).arguments))

    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in encoder.mixers]
    try:
        with torch.no_grad():
            out = encoder(values, timestamps, covariates, state)
    finally:
        for h in handles:
            h.remove()
    return calls, out


def _to_value_heads(t: torch.Tensor, HV: int) -> torch.Tensor:
    return t if t.shape[2] == HV else t.repeat_interleave(HV // t.shape[2], dim=2)


@torch.no_grad()
def _replay_layer(mixer: GatedDeltaNet2, call: dict, events: list[tuple[str, int, int]]) -> dict[str, np.ndarray]:
    """Replay one layer's recurrence in float64 and return every per-step quantity as ``[T, ...]`` arrays."""
    cfg = mixer.config
    x, layer_state = call["x"], call.get("state")
    inputs = mixer.op_inputs(x, layer_state, call.get("attention_mask"), call.get("decay_scale"))
    HV = cfg.num_v_heads
    q, k, v, g, b, w = (_to_value_heads(t, HV).double() for t in inputs)
    B, T, _, K = k.shape
    u = w * v
    S = (torch.zeros(B, HV, K, cfg.head_v_dim, dtype=torch.float64, device=x.device) if layer_state is None
         else layer_state.recurrent.double())
    E = len(events)
    ev_row = torch.tensor([r for _, r, _ in events], dtype=torch.long, device=x.device)
    ev_step = torch.tensor([s for _, _, s in events], dtype=torch.long, device=x.device)
    # each event's own write, carried forward by the later transitions (decay and erase) of its stream
    A = S.new_zeros(E, HV, K, cfg.head_v_dim)
    ke, ue = S.new_zeros(E, HV, K), S.new_zeros(E, HV, cfg.head_v_dim)
    rows = {n: [] for n in ("before", "decay", "erase", "write", "after", "mass", "row_erase", "recall", "retention")}
    for t in range(T):
        kt, bk, ut = k[:, t], b[:, t] * k[:, t], u[:, t]
        Sd = S * g[:, t].exp()[..., None]
        r = torch.einsum("nhk,nhkv->nhv", bk, Sd)
        Se = Sd - kt[..., None] * r[..., None, :]
        # every energy is summed in the same order (rows, then over rows), so that an identity step
        # (g = b = k = 0, all products exact) gives exactly zero changes
        rows_d, rows_e = Sd.square().sum(-1), Se.square().sum(-1)
        before, decayed, erased = S.square().sum(-1).sum(-1), rows_d.sum(-1), rows_e.sum(-1)
        S = Se + kt[..., None] * ut[..., None, :]
        after = S.square().sum(-1).sum(-1)
        rows["before"].append(before)
        rows["decay"].append(before - decayed)
        rows["erase"].append(erased - decayed)
        rows["write"].append(after - erased)
        rows["after"].append(after)
        rows["mass"].append(kt.square() * r.square().sum(-1, keepdim=True))
        rows["row_erase"].append(rows_e - rows_d)
        if E:
            Ad = A * g[ev_row, t].exp()[..., None]
            A = Ad - k[ev_row, t][..., None] * torch.einsum("ehk,ehkv->ehv", bk[ev_row], Ad)[..., None, :]
            now = ev_step == t
            ke = torch.where(now[:, None, None], k[ev_row, t], ke)
            ue = torch.where(now[:, None, None], u[ev_row, t], ue)
            A = torch.where(now[:, None, None, None], ke[..., None] * ue[..., None, :], A)
            norm = ke.square().sum(-1) * ue.square().sum(-1)
            got = torch.einsum("ehk,ehkv->ehv", ke, S[ev_row])
            kept = torch.einsum("ehk,ehkv->ehv", ke, A)
            rows["recall"].append((got * ue).sum(-1) / norm)
            rows["retention"].append((kept * ue).sum(-1) / norm)
    # without events the recall rows stay empty: [T, 0, HV]
    out = {n: torch.stack(v).cpu().numpy() if v else np.zeros((T, 0, HV)) for n, v in rows.items()}
    out["key_norm"] = ke.norm(dim=-1).cpu().numpy()
    out["value_norm"] = ue.norm(dim=-1).cpu().numpy()
    return out


def _half_life(times: np.ndarray, observed: np.ndarray, step: int, retention: np.ndarray) -> float:
    """Time from the event at ``step`` until ``retention`` ``[T]`` falls to half, interpolated in time; NaN when it
    stays above half.

    The state changes only at observations, so retention is known there: between the last observation above half
    (the event itself at least, retention 1) and the first at or below it, the crossing is interpolated
    log-linearly in time, which is exact when retention decays exponentially in time (as the decay does: a gap of
    ``dt`` multiplies by ``alpha ** dt``); linearly when retention at the second point is not positive.
    """
    idx = np.arange(len(times))
    later = np.flatnonzero(observed & (idx > step))
    hit = later[retention[later] <= 0.5]
    if not hit.size:
        return float("nan")
    j = int(hit[0])
    i = int(np.flatnonzero(observed & (idx >= step) & (idx < j))[-1])
    r_i, r_j = float(retention[i]), float(retention[j])
    frac = np.log(r_i / 0.5) / np.log(r_i / r_j) if r_j > 0 else (r_i - 0.5) / (r_i - r_j)
    return float(times[i] - times[step] + frac * (times[j] - times[i]))


def audit_encoder(
    encoder: StreamEncoder,
    values: torch.Tensor,
    timestamps: torch.Tensor,
    covariates: torch.Tensor | None = None,
    state: EncoderState | None = None,
    tags: Mapping[str, tuple[int | str, int]] | torch.Tensor | None = None,
    stream_ids: Sequence[str] | None = None,
) -> StateAudit:
    """Audit a window of ``B`` streams: the energy flows of every layer's state, erased key channels, and the
    recall of associations written at tagged events. Neither the encoder nor ``state`` is changed.

    Args:
        encoder: the model; its forward is run once (no gradient).
        values: ``[B, T, channels]``, NaN where missing (a step with nothing observed is an identity step).
        timestamps: ``[B, T]`` float64, strictly increasing over observed steps; half-lives are in their units.
        covariates: ``[B, T, n_covariates]`` or None, as the encoder takes them.
        state: the streams' state to continue from (zeros when omitted).
        tags: events whose written association is followed: a mapping ``name -> (stream, step)`` (stream as a
            row index or an id of ``stream_ids``; step in ``[0, T)``, observed), or a bool ``[B, T]`` column
            (each True is an event named ``"<stream>@<step>"``).
        stream_ids: a name per row (default ``"0"``, ``"1"``, ...), used in every table.

    Returns:
        :class:`StateAudit`. Wrong shapes, inf values, unknown streams, steps out of range or unobserved raise
        ``ValueError`` naming the argument or tag.
    """
    if not isinstance(encoder, StreamEncoder):
        raise ValueError(f"audit_encoder: argument 'encoder' expected a StreamEncoder, got {type(encoder).__name__}")
    B, T = encoder.check_inputs(values, timestamps, covariates, state)
    if T == 0:
        raise ValueError("audit_encoder: argument 'values' expected at least one step, got T = 0")
    ids = _check_stream_ids(stream_ids, B)
    observed = ~torch.isnan(values).all(-1)
    events = _check_tags(tags, ids, observed)
    calls, _ = _capture_mixer_calls(encoder, values, timestamps, covariates, state)
    if len(calls) != len(encoder.mixers):
        raise RuntimeError(f"audit_encoder: recorded {len(calls)} mixer calls for {len(encoder.mixers)} mixers")
    layers = [_replay_layer(m, c, events) for m, c in zip(encoder.mixers, calls, strict=True)]
    return _tables(layers, events, ids, timestamps.double().cpu().numpy(), observed.cpu().numpy())


def _grid(*sizes: int) -> list[np.ndarray]:
    """Flattened index arrays of a C-ordered grid of ``sizes``."""
    return [a.ravel() for a in np.meshgrid(*(np.arange(n) for n in sizes), indexing="ij")]


def _flat(layers: list[dict], name: str) -> np.ndarray:
    """``[T, B, HV, ...]`` per layer -> flattened in the order ``[L, B, HV, T, ...]``."""
    a = np.stack([lay[name] for lay in layers])
    return np.moveaxis(a, 1, 3).ravel()


def _tables(layers: list[dict], events: list, ids: list[str], times: np.ndarray, observed: np.ndarray
            ) -> StateAudit:
    sid = np.asarray(ids, dtype=object)
    L = len(layers)
    T, B, HV, K = layers[0]["mass"].shape
    li, bi, hi, ti = _grid(L, B, HV, T)
    energy = _frame("energy", {
        "stream": sid[bi], "layer": li, "head": hi, "step": ti, "time": times[bi, ti], "observed": observed[bi, ti],
        "energy_before": _flat(layers, "before"), "decay_removed": _flat(layers, "decay"),
        "erase_change": _flat(layers, "erase"), "write_change": _flat(layers, "write"),
        "energy_after": _flat(layers, "after")})
    li, bi, hi, ti, ci = _grid(L, B, HV, T, K)
    channels = _frame("channels", {
        "stream": sid[bi], "layer": li, "head": hi, "step": ti, "time": times[bi, ti], "channel": ci,
        "erase_mass": _flat(layers, "mass"), "erase_change": _flat(layers, "row_erase")})
    assoc = {c: [] for c in SCHEMAS["associations"]}
    recall = {c: [] for c in SCHEMAS["recall"]}
    for e, (name, row, step) in enumerate(events):
        for layer, lay in enumerate(layers):
            for head in range(HV):
                retention = lay["retention"][:, e, head]
                for col, val in (("tag", name), ("stream", ids[row]), ("layer", layer), ("head", head),
                                 ("event_step", step), ("event_time", times[row, step]),
                                 ("key_norm", lay["key_norm"][e, head]), ("value_norm", lay["value_norm"][e, head]),
                                 ("half_life", _half_life(times[row], observed[row], step, retention))):
                    assoc[col].append(val)
                n = T - step
                for col, val in (("tag", [name] * n), ("stream", [ids[row]] * n), ("layer", [layer] * n),
                                 ("head", [head] * n), ("step", np.arange(step, T)), ("time", times[row, step:]),
                                 ("since", times[row, step:] - times[row, step]),
                                 ("recall", lay["recall"][step:, e, head]), ("retention", retention[step:])):
                    recall[col].append(np.asarray(val))
    associations = _frame("associations", {c: np.asarray(v) for c, v in assoc.items()})
    associations = associations.with_columns(pl.col("half_life").fill_nan(None))
    recall_frame = _frame("recall", {c: np.concatenate(v) if v else np.zeros(0) for c, v in recall.items()})
    return StateAudit(energy, channels, associations, recall_frame)
