"""Online learning for :class:`~gdn2ts.streaming.OnlineRunner`: bounded per-stream histories, windows whose
whole forecast horizon has been observed, the optimizer, and the learned weights as one store blob.

**History.** With learning on, every stream's state carries its last ``history`` observed rows (timestamps,
values with NaN for missing, covariates; oldest first, ``-inf`` timestamps for empty slots) and ``learn.through``,
the timestamp of the last forecast origin already used for learning. They are components of the working set like
the layer states, so they are journaled, snapshotted, spilled and replayed with them, bit for bit.

**Windows (no leakage).** A forecast issued at an observed row at time ``o`` targets, at step ``k``, the row
nearest to ``o + k * time_unit`` within ``target_tolerance * time_unit`` (NaN when there is none). Position ``o``
has *matured* once the stream's last observation is at or after ``o + (horizon + target_tolerance) * time_unit``:
every row that could be one of its targets has arrived (later rows must be later in time). ``learn`` scores only
matured positions after ``learn.through``; their window is the last ``context`` rows up to the newest of them, fed
from a zero state as in :func:`~gdn2ts.streaming.train.fit`. The encoder is causal, so the forecast at ``o``
reads rows up to ``o`` only, and the window's inputs end at the newest scored origin, before its targets begin.

**Weights.** The learned weights, the AdamW moments, the version (one per committed ``learn`` call), the lineage
(the fingerprint of the model before any learning) and the :class:`LearnConfig` are one blob (safetensors; nothing
is pickled) in the store, committed in the same transaction as the learned streams' records. See
``docs/streaming-learning.md``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from safetensors.torch import load as st_load

from gdn2ts.models import StreamEncoder
from gdn2ts.models.encoder import upgrade_state_dict
from gdn2ts.streaming.errors import CorruptRecordError
from gdn2ts.streaming.history import LearnPlan
from gdn2ts.streaming.records import read_metadata, save_tensors
from gdn2ts.streaming.train import pinball_loss

__all__ = ["LearnConfig", "LearnResult", "Learner", "Learned", "decode_learned", "open_learning", "MODEL_BLOB"]

MODEL_BLOB = "model"
"""Name of the store blob that holds the learned weights."""
FORMAT = "gdn2ts.learned.v2"
FORMAT_V1 = "gdn2ts.learned.v1"


@dataclass(frozen=True)
class LearnConfig:
    """How an :class:`~gdn2ts.streaming.OnlineRunner` learns online.

    Example:
        >>> LearnConfig(history=64, context=48).lr
        0.0001
    """

    history: int = 320
    """Observed rows kept per stream (the most recent). Must hold ``context`` rows plus those of one horizon."""
    context: int = 256
    """Rows per learning window (the encoder's input, from a zero state)."""
    min_context: int = 32
    """Positions with fewer earlier rows in their window are not scored (too little history behind them)."""
    lr: float = 1e-4
    """AdamW learning rate (constant)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient norm clip per optimizer step."""
    batch_streams: int = 64
    """Windows (one per stream) per optimizer step; a ``learn`` call over more streams takes several steps."""
    target_tolerance: float = 0.5
    """A row within this many time units of ``origin + k * time_unit`` is step k's target (the nearest one; the
    earlier on a tie). 0.5 matches every row of a regular grid exactly; at most 0.5."""

    def __post_init__(self):
        for name in ("history", "context", "batch_streams"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LearnConfig: '{name}' expected a positive int, got {value!r}")
        if isinstance(self.min_context, bool) or not isinstance(self.min_context, int) or \
                not 0 <= self.min_context < self.context:
            raise ValueError(f"LearnConfig: 'min_context' expected an int in [0, context={self.context}), got "
                             f"{self.min_context!r}")
        if self.history <= self.context:
            raise ValueError(f"LearnConfig: 'history' expected more rows than 'context' ({self.context}), got "
                             f"{self.history}")
        for name in ("lr", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
                raise ValueError(f"LearnConfig: '{name}' expected a positive number, got {value!r}")
        if not (isinstance(self.weight_decay, (int, float)) and 0 <= self.weight_decay < math.inf):
            raise ValueError(f"LearnConfig: 'weight_decay' expected a non-negative number, got {self.weight_decay!r}")
        if not (isinstance(self.target_tolerance, (int, float)) and 0 <= self.target_tolerance <= 0.5):
            raise ValueError(f"LearnConfig: 'target_tolerance' expected a number in [0, 0.5], got "
                             f"{self.target_tolerance!r}")


@dataclass
class LearnResult:
    """What one :meth:`~gdn2ts.streaming.OnlineRunner.learn` call did."""

    steps: int = 0
    """Optimizer steps taken (0: nothing had matured)."""
    windows: int = 0
    """Windows (streams) that contributed targets."""
    targets: int = 0
    """Target values scored (matured positions x steps x channels, observed ones only)."""
    loss: float | None = None
    """Mean pinball loss of the scored targets before the update (None without a step)."""
    version: int = 0
    """Weight version after the call (one more per call that took a step)."""


class Learned(NamedTuple):
    """A decoded learned-weights blob."""

    lineage: str
    """Fingerprint of the model before any learning."""
    version: int
    """Committed learning steps (calls) so far."""
    weights: str
    """Fingerprint of the learned weights."""
    config: LearnConfig
    """How the store learns."""
    tensors: dict[str, torch.Tensor]
    """``w.<name>``: the encoder's state dict; ``opt.<i>.<key>``: AdamW's state of parameter i."""


def decode_learned(payload: bytes) -> Learned:
    """The blob written by :meth:`Learner.encode`; :class:`CorruptRecordError` when it cannot be decoded."""
    try:
        tensors = dict(st_load(payload))
        meta = read_metadata(payload)
        if meta.get("format") not in (FORMAT_V1, FORMAT):
            raise ValueError(f"format {meta.get('format')!r}")
        if meta["format"] == FORMAT_V1:
            # weights of the encoder's layout before blocks: renamed; AdamW's moments were kept by parameter
            # index in that layout's order (one fused MLP matrix per layer), so learning resumes with fresh moments
            tensors = {k: v for k, v in upgrade_state_dict(tensors, "w.").items() if k.startswith("w.")}
        return Learned(meta["lineage"], int(meta["version"]), meta["weights"],
                       LearnConfig(**json.loads(meta["config"])), tensors)
    except Exception as e:  # any decoding failure is a corrupt blob, named
        raise CorruptRecordError(f"blob {MODEL_BLOB!r} (learned weights): cannot be decoded ({e})") from None


class Learner:
    """The encoder's optimizer (AdamW) and its learning version.

    Args:
        encoder: the model whose weights are learned (in place).
        config: :class:`LearnConfig`.
        lineage: fingerprint of the model before any learning.
        version: learning steps committed so far.
    """

    def __init__(self, encoder: StreamEncoder, config: LearnConfig, lineage: str, version: int = 0):
        self.encoder, self.config, self.lineage, self.version = encoder, config, lineage, version
        self.params = [p for p in encoder.parameters() if p.requires_grad]
        # the optimizer is made at the first step: creating one imports much of torch (seconds), which a runner
        # that only observes, forecasts or audits should not pay; until then its state waits here
        self._opt: torch.optim.AdamW | None = None
        self._pending: dict[int, dict] = {}

    @property
    def opt(self) -> torch.optim.AdamW:
        """AdamW over the encoder's parameters (made on first use, with the state loaded from the store)."""
        if self._opt is None:
            opt = torch.optim.AdamW(self.params, lr=self.config.lr, weight_decay=self.config.weight_decay)
            if self._pending:
                opt.load_state_dict({"state": self._pending, "param_groups": opt.state_dict()["param_groups"]})
            self._opt, self._pending = opt, {}
        return self._opt

    def optimizer_state(self) -> dict[int, dict]:
        """AdamW's state by parameter index (``exp_avg``, ``exp_avg_sq``, ``step``): live tensors, not copies."""
        return self._pending if self._opt is None else self._opt.state_dict()["state"]

    def step(self, plan: LearnPlan) -> tuple[int, int, float]:
        """Optimizer steps over the plan's windows, ``batch_streams`` at a time; returns (steps, targets scored,
        mean loss before the updates weighted by targets)."""
        enc, cfg = self.encoder, self.encoder.config
        p = self.params[0]
        steps, scored, total = 0, 0, 0.0
        for start in range(0, len(plan.rows), self.config.batch_streams):
            part = slice(start, start + self.config.batch_streams)
            targets = plan.targets[part].to(p.device)
            valid = ~torch.isnan(targets)
            with torch.enable_grad():
                out = enc(plan.values[part].to(p.device, p.dtype), plan.times[part].to(p.device),
                          None if plan.covariates is None else plan.covariates[part].to(p.device, p.dtype))
                loss = pinball_loss(out["forecast"], targets.to(p.dtype), cfg.quantiles, valid)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            n = int(valid.sum())
            steps, scored, total = steps + 1, scored + n, total + float(loss.detach()) * n
        return steps, scored, total / max(scored, 1)

    def backup(self) -> tuple[dict, dict]:
        """Copies of the weights and the optimizer state, for :meth:`restore` when a commit fails."""
        weights = {k: v.detach().clone() for k, v in self.encoder.state_dict().items()}
        state = {i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                 for i, s in self.optimizer_state().items()}
        return weights, state

    def restore(self, backup: tuple[dict, dict]) -> None:
        weights, state = backup
        with torch.no_grad():
            self.encoder.load_state_dict(weights)
        # the optimizer is made again, from the saved state, at the next step
        self._opt, self._pending = None, state

    def encode(self, version: int, weights_fingerprint: str) -> bytes:
        """The blob of the current weights and optimizer state under ``version``."""
        tensors = {f"w.{k}": v for k, v in self.encoder.state_dict().items()}
        for i, s in self.optimizer_state().items():
            for k, v in s.items():
                tensors[f"opt.{i}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
        meta = {"format": FORMAT, "lineage": self.lineage, "version": str(version), "weights": weights_fingerprint,
                "config": json.dumps(dataclasses.asdict(self.config))}
        return save_tensors(tensors, meta)

    def load(self, learned: Learned, fingerprint: Callable[[torch.nn.Module], str]) -> None:
        """Load a decoded blob's weights and optimizer state; the weights must match its fingerprint."""
        weights = {k[2:]: v for k, v in learned.tensors.items() if k.startswith("w.")}
        state: dict[int, dict] = {}
        for name, v in learned.tensors.items():
            if name.startswith("opt."):
                _, i, key = name.split(".", 2)
                state.setdefault(int(i), {})[key] = v
        bad = [i for i, s in state.items() if not 0 <= i < len(self.params) or set(s) != {"step", "exp_avg",
                                                                                           "exp_avg_sq"}]
        try:
            if bad:
                raise ValueError(f"optimizer state of parameters {bad} is not AdamW's")
            with torch.no_grad():
                self.encoder.load_state_dict(weights)
        except (RuntimeError, ValueError, KeyError) as e:
            raise CorruptRecordError(f"blob {MODEL_BLOB!r} (learned weights) does not fit this model ({e})") from None
        if fingerprint(self.encoder) != learned.weights:
            raise CorruptRecordError(f"blob {MODEL_BLOB!r} (learned weights): the weights do not match their "
                                     f"fingerprint {learned.weights!r}")
        self._opt, self._pending, self.version = None, state, learned.version


def open_learning(encoder: StreamEncoder, store, config: LearnConfig | None, lineage: str,
                  fingerprint: Callable[[torch.nn.Module], str]) -> Learner | None:
    """The learner of a runner opening ``store`` with ``encoder`` (fingerprint ``lineage``), or None when the
    store does not learn and ``config`` is None.

    A store that holds learned weights of this model lineage (or whose learned weights are this model's) loads
    them into ``encoder`` and continues at their version; ``config`` None adopts the stored configuration, another
    one is refused. Learned weights of another model raise :class:`FingerprintMismatchError`. A new learning store
    gets version 0 (the weights as given) committed at once.
    """
    from gdn2ts.streaming.errors import FingerprintMismatchError
    from gdn2ts.streaming.store import BlobStore, JournaledStore

    if config is not None and not isinstance(config, LearnConfig):
        raise ValueError(f"OnlineRunner: 'learning' expected a LearnConfig or None, got {type(config).__name__}")
    payload = store.get_blob(MODEL_BLOB) if isinstance(store, BlobStore) else None
    if payload is None:
        if config is None:
            return None
        if not isinstance(store, BlobStore):
            raise ValueError(f"OnlineRunner: learning needs a store that keeps blobs (BlobStore), got "
                             f"{type(store).__name__}")
        if next(iter(store.iterate()), None) is not None or (isinstance(store, JournaledStore) and
                                                             store.journal_head() > 0):
            raise ValueError("OnlineRunner: the store already holds streams kept without learning (their states "
                             "carry no history); learning needs a new store")
        learner = Learner(encoder, config, lineage)
        try:
            store.put_blob(MODEL_BLOB, learner.encode(0, lineage))
            store.commit()
        except BaseException:
            store.rollback()
            raise
        return learner
    learned = decode_learned(payload)
    if lineage not in (learned.lineage, learned.weights):
        raise FingerprintMismatchError(f"blob {MODEL_BLOB!r}: the store's learned weights (version "
                                       f"{learned.version}) belong to model {learned.lineage!r}, not to this model "
                                       f"{lineage!r}")
    if config is not None and config != learned.config:
        raise ValueError(f"OnlineRunner: the store learns with {learned.config}, not {config}; pass learning=None "
                         "to continue with the stored configuration")
    learner = Learner(encoder, learned.config, learned.lineage)
    learner.load(learned, fingerprint)
    return learner
