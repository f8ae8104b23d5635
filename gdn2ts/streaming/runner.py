"""The online runner: observations from many streams in, per-stream state in a store, forecasts out.

Batch semantics of :meth:`OnlineRunner.observe`:

* The whole batch is validated first; a bad column, an inf value or a wrong type rejects the whole batch with a
  ``ValueError`` and changes nothing.
* Rows are applied per stream in timestamp order. A row whose timestamp is not after its stream's last applied
  observation is rejected (listed in the result, with a message naming the stream); the stream's other rows and
  all other streams proceed.
* All accepted rows of the batch are committed to the store in one transaction: after a crash, a batch is either
  fully reflected or not at all.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import polars as pl
import torch

from gdn2ts.layers import GDN2State
from gdn2ts.models import EncoderState, StreamEncoder
from gdn2ts.streaming.store import StateStore, StreamRecord

__all__ = ["OnlineRunner", "ObserveResult", "model_fingerprint"]


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over the model's class, configuration and parameter bytes: states written by another model (or
    other weights) are recognised."""
    h = hashlib.sha256(type(model).__name__.encode())
    h.update(repr(getattr(model, "config", "")).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


@dataclass
class ObserveResult:
    """What one :meth:`OnlineRunner.observe` call applied."""

    accepted: int = 0
    """Rows applied."""
    rejected: list[tuple[str, float, str]] = field(default_factory=list)
    """``(stream_id, timestamp, reason)`` of rows not applied."""


class OnlineRunner:
    """Streams observations through a :class:`StreamEncoder`, one state per stream kept in a :class:`StateStore`.

    Args:
        encoder: the model (its device is used for the updates).
        store: where stream states persist (``SQLiteStore`` for durability, ``MemoryStore`` otherwise).
        channels: names of the observed channels, in the encoder's channel order.
        covariates: names of covariate columns (always present in a batch), in the encoder's order.
        id_column, time_column: names of the stream id and timestamp columns.

    Example:
        >>> import polars as pl, torch
        >>> from gdn2ts.models import EncoderConfig, StreamEncoder
        >>> from gdn2ts.streaming import MemoryStore
        >>> enc = StreamEncoder(EncoderConfig(n_channels=2, hidden_size=16, head_dim=8, horizon=3))
        >>> runner = OnlineRunner(enc, MemoryStore(), channels=["load", "temp"])
        >>> batch = pl.DataFrame({"stream": ["a", "b", "a"], "time": [1.0, 1.0, 2.0],
        ...                       "load": [0.5, None, 0.7], "temp": [20.0, 18.0, None]})
        >>> runner.observe(batch).accepted
        3
        >>> runner.forecast(["a"]).shape   # 3 steps x 2 channels, one row each
        (6, 6)
    """

    def __init__(self, encoder: StreamEncoder, store: StateStore, channels: Sequence[str],
                 covariates: Sequence[str] = (), id_column: str = "stream", time_column: str = "time"):
        cfg = encoder.config
        if len(channels) != cfg.n_channels or len(set(channels)) != len(channels):
            raise ValueError(f"OnlineRunner: 'channels' expected {cfg.n_channels} distinct names, got {list(channels)}")
        if len(covariates) != cfg.n_covariates:
            raise ValueError(f"OnlineRunner: 'covariates' expected {cfg.n_covariates} names, got {list(covariates)}")
        self.encoder = encoder.eval()
        self.store = store
        self.channels, self.covariates = list(channels), list(covariates)
        self.id_column, self.time_column = id_column, time_column
        self.fingerprint = model_fingerprint(encoder)
        p = next(encoder.parameters())
        self.device, self.dtype = p.device, p.dtype

    # ------------------------------------------------------------------------------------------------------------

    def observe(self, batch: pl.DataFrame | Iterable[Mapping]) -> ObserveResult:
        """Apply a batch of observations (long format: id, time, one column per channel, nulls for missing)."""
        frame = self._frame(batch)
        result = ObserveResult()
        if frame.height == 0:
            return result
        frame = frame.sort([self.id_column, self.time_column], maintain_order=True)
        ids = frame[self.id_column].to_list()
        times = frame[self.time_column].to_numpy().astype("float64")
        values = torch.tensor(frame.select(self.channels).fill_null(float("nan")).to_numpy().astype("float64"))
        covs = (torch.tensor(frame.select(self.covariates).to_numpy().astype("float64")) if self.covariates
                else None)
        streams = list(dict.fromkeys(ids))
        states, steps = self._load(streams)
        last = {sid: float(states[sid].last_time[0]) for sid in streams}
        # rounds: the r-th remaining row of every stream, so each round is one vectorized step
        rows_of: dict[str, list[int]] = {}
        for i, sid in enumerate(ids):
            prev = times[rows_of[sid][-1]] if sid in rows_of else last[sid]
            if not times[i] > prev:
                result.rejected.append((sid, float(times[i]), f"stream {sid!r}: timestamp {times[i]} is not after "
                                                                f"its last observation {prev}"))
                continue
            rows_of.setdefault(sid, []).append(i)
        for r in range(max((len(v) for v in rows_of.values()), default=0)):
            active = [sid for sid, rows in rows_of.items() if len(rows) > r]
            idx = torch.tensor([rows_of[sid][r] for sid in active])
            state = _stack([states[sid] for sid in active])
            out = self.encoder.step(values[idx].to(self.device, self.dtype),
                                    torch.tensor(times[idx.numpy()], dtype=torch.float64, device=self.device),
                                    None if covs is None else covs[idx].to(self.device, self.dtype), state)
            for j, sid in enumerate(active):
                states[sid] = _row(out["state"], j)
                steps[sid] += 1
            result.accepted += len(active)
        touched = {sid: states[sid] for sid in rows_of}
        try:
            self.store.put({sid: self._record(state, steps[sid]) for sid, state in touched.items()})
            self.store.commit()
        except BaseException:
            # a batch that did not commit must not linger as staged writes that later reads would see
            self.store.rollback()
            raise
        return result

    def forecast(self, stream_ids: Sequence[str]) -> pl.DataFrame:
        """Quantile forecasts from each stream's last observation: one row per (stream, step, channel)."""
        states, _ = self._load(list(stream_ids), create=False)
        cfg = self.encoder.config
        h = torch.cat([states[sid].last_output for sid in stream_ids]) if stream_ids else torch.zeros(0, 1)
        with torch.no_grad():
            q = self.encoder._heads(h.to(self.device, self.dtype))["forecast"].cpu().double()  # [N, H, C, Q]
        n = len(stream_ids)
        table = {"stream": [sid for sid in stream_ids for _ in range(cfg.horizon * cfg.n_channels)],
                 "step": [s + 1 for _ in range(n) for s in range(cfg.horizon) for _ in range(cfg.n_channels)],
                 "channel": [c for _ in range(n * cfg.horizon) for c in self.channels]}
        for i, level in enumerate(cfg.quantiles):
            table[f"q{level:g}"] = q[..., i].reshape(-1).tolist()
        return pl.DataFrame(table)

    # ------------------------------------------------------------------------------------------------------------

    def _frame(self, batch) -> pl.DataFrame:
        frame = batch if isinstance(batch, pl.DataFrame) else pl.DataFrame(list(batch))
        need = [self.id_column, self.time_column, *self.covariates]
        missing = [c for c in need if c not in frame.columns]
        if missing:
            raise ValueError(f"observe: batch lacks required columns {missing}")
        known = set(need) | set(self.channels)
        unknown = [c for c in frame.columns if c not in known]
        if unknown:
            raise ValueError(f"observe: unknown columns {unknown} (channels are {self.channels})")
        for c in self.channels:
            if c not in frame.columns:
                frame = frame.with_columns(pl.lit(None, dtype=pl.Float64).alias(c))
        for c in (self.time_column, *self.channels, *self.covariates):
            if frame.height and not frame.schema[c].is_numeric() and frame.schema[c] != pl.Null:
                raise ValueError(f"observe: column {c!r} expected numbers, got {frame.schema[c]}")
        frame = frame.with_columns(pl.col(self.id_column).cast(pl.String),
                                   *[pl.col(c).cast(pl.Float64) for c in (self.time_column, *self.channels,
                                                                           *self.covariates)])
        if frame[self.id_column].null_count():
            raise ValueError("observe: stream ids must not be null")
        for c in (self.time_column, *self.covariates):
            if frame[c].null_count() or frame[c].is_nan().any() or frame[c].is_infinite().any():
                raise ValueError(f"observe: column {c!r} expected finite values in every row")
        for c in self.channels:
            bad = frame.filter(pl.col(c).is_infinite())
            if bad.height:
                raise ValueError(f"observe: column {c!r} holds inf for stream {bad[self.id_column][0]!r} "
                                 "(missing values are null or NaN; inf is an error)")
        return frame

    def _load(self, streams: list[str], create: bool = True) -> tuple[dict[str, EncoderState], dict[str, int]]:
        """States and step counts of ``streams`` (new streams start from zeros, unless ``create`` is False)."""
        records = self.store.get(streams, fingerprint=self.fingerprint)
        states, steps = {}, {}
        for sid in streams:
            rec = records[sid]
            if rec is None:
                if not create:
                    raise KeyError(f"unknown stream {sid!r}")
                states[sid], steps[sid] = self.encoder.init_state(1, device=self.device, dtype=self.dtype), 0
            else:
                states[sid], steps[sid] = self._state(rec), rec.steps
        return states, steps

    def _record(self, state: EncoderState, new_steps: int) -> StreamRecord:
        tensors = {"last_output": state.last_output, "last_time": state.last_time}
        for i, layer in enumerate(state.layers):
            tensors[f"layer{i}.recurrent"] = layer.recurrent
            tensors[f"layer{i}.conv"] = layer.conv
        return StreamRecord(tensors, last_timestamp=float(state.last_time[0]), steps=int(new_steps),
                            fingerprint=self.fingerprint)

    def _state(self, rec: StreamRecord) -> EncoderState:
        t = {k: v.to(self.device) for k, v in rec.tensors.items()}
        layers = tuple(GDN2State(t[f"layer{i}.recurrent"], t[f"layer{i}.conv"])
                       for i in range(self.encoder.config.n_layers))
        return EncoderState(layers, t["last_time"], t["last_output"])


def _stack(states: list[EncoderState]) -> EncoderState:
    layers = tuple(GDN2State(torch.cat([s.layers[i].recurrent for s in states]),
                             torch.cat([s.layers[i].conv for s in states])) for i in range(len(states[0].layers)))
    return EncoderState(layers, torch.cat([s.last_time for s in states]),
                        torch.cat([s.last_output for s in states]))


def _row(state: EncoderState, j: int) -> EncoderState:
    layers = tuple(GDN2State(s.recurrent[j:j + 1].clone(), s.conv[j:j + 1].clone()) for s in state.layers)
    return EncoderState(layers, state.last_time[j:j + 1].clone(), state.last_output[j:j + 1].clone())

