"""The configuration of the MQAR grid run as the recall literature runs it (the Zoology protocol): the training
mixture and the held-out levels, the model shape of each width, the learning-rate sweep and seeds, the held-out
sets; and the parameter matching that gives every mixer of a width the same block parameters by widening the MLPs
of the smaller ones.

The grid is every (width, mixer, learning rate, seed). One model per cell trains on the mixture of
``task.train_levels`` and is scored on every level of ``task.test_levels`` twice: on a validation set (which picks
the learning rate of each (mixer, width)) and on a test set of other seeds (which is reported at that rate).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace

import torch

from gdn2ts.lm.eval.mqar import MQARConfig
from gdn2ts.lm.eval.mqar_run import MQARModelConfig
from gdn2ts.models.lm import CausalLM
from gdn2ts.models.lm_config import ATTENTION_MIXERS, MIXERS

__all__ = ["MQARGridTask", "MQARGridTrainConfig", "MQARGridEvalConfig", "MQARGridConfig", "match_parameters"]


def _fail(owner: str, field: str, expected: str, got: object) -> None:
    raise ValueError(f"{owner}: field '{field}' expected {expected}, got {got!r}")


def _as_tuple(obj, name: str) -> None:
    # YAML and JSON give lists; the frozen configs keep tuples so that they stay hashable and compare equal
    value = getattr(obj, name)
    if isinstance(value, list):
        object.__setattr__(obj, name, tuple(value))


def _int(owner: str, field: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(owner, field, f"an int >= {low}", value)


def _float(owner: str, field: str, value: object, low: float, high: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not (low < value if low_open else low <= value) or value > high:
        _fail(owner, field, f"a float in {'(' if low_open else '['}{low}, {high}]", value)


def _levels(owner: str, obj, name: str) -> None:
    _as_tuple(obj, name)
    levels = getattr(obj, name)
    if isinstance(levels, tuple):
        levels = tuple(MQARConfig(**lv) if isinstance(lv, dict) else lv for lv in levels)
        object.__setattr__(obj, name, levels)
    if not isinstance(levels, tuple) or not levels or not all(isinstance(lv, MQARConfig) for lv in levels):
        _fail(owner, name, "a non-empty list of MQAR levels", levels)
    labels = [lv.label for lv in levels]
    if len(set(labels)) != len(labels):
        _fail(owner, name, "levels with distinct labels", labels)


@dataclass(frozen=True)
class MQARGridTask:
    """What every model trains on and is scored on.

    Example:
        >>> t = MQARGridTask(train_levels=[{"vocab_size": 64, "num_pairs": 2, "seq_len": 16},
        ...                                {"vocab_size": 64, "num_pairs": 4, "seq_len": 16}],
        ...                  test_levels=[{"vocab_size": 64, "num_pairs": 4, "seq_len": 16}], train_weights=[3, 1])
        >>> t.schedule(8)
        (0, 0, 1, 0, 0, 0, 1, 0)
    """

    train_levels: tuple[MQARConfig, ...]
    """The training mixture: every optimizer step takes its batch from one of these levels."""
    test_levels: tuple[MQARConfig, ...]
    """The levels scored after training, each on its validation and its test set."""
    train_weights: tuple[float, ...] = ()
    """Share of the training steps of each train level (any positive scale; empty: equal shares)."""

    def __post_init__(self):
        owner = "MQARGridTask"
        _levels(owner, self, "train_levels")
        _levels(owner, self, "test_levels")
        _as_tuple(self, "train_weights")
        w = self.train_weights
        if not isinstance(w, tuple) or (w and len(w) != len(self.train_levels)) or any(
                isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0 for x in w):
            _fail(owner, "train_weights", f"empty or {len(self.train_levels)} positive numbers (one per train "
                  f"level)", w)
        vocab = {lv.vocab_size for lv in self.train_levels + self.test_levels}
        if len(vocab) != 1:
            _fail(owner, "test_levels", "the train levels' vocabulary (one model per vocabulary)", sorted(vocab))

    @property
    def vocab_size(self) -> int:
        """The one vocabulary of every level."""
        return self.train_levels[0].vocab_size

    def schedule(self, steps: int) -> tuple[int, ...]:
        """The train level of each of ``steps`` steps: a fixed interleave in which every level's count stays
        within one step of its share at every prefix (the level whose count lags its share most goes next; ties
        to the first)."""
        w = self.train_weights or (1.0,) * len(self.train_levels)
        share = [x / sum(w) for x in w]
        count = [0] * len(w)
        order = []
        for s in range(steps):
            i = max(range(len(w)), key=lambda j: (share[j] * (s + 1) - count[j], -j))
            count[i] += 1
            order.append(i)
        return tuple(order)


@dataclass(frozen=True)
class MQARGridTrainConfig:
    """The training of every run; only the peak learning rate (one of ``lrs``) and the seed vary."""

    steps: int = 800
    """Optimizer steps per run, each on a fresh batch of one train level."""
    batch_size: int = 256
    """Sequences per step."""
    lrs: tuple[float, ...] = (1e-3, 3.16e-3, 1e-2, 3.16e-2)
    """The swept peak learning rates (the Zoology repository's MQAR configs: ``logspace(-3, -1.5, 4)``)."""
    weight_decay: float = 0.1
    """AdamW weight decay of the matrices (not of norms, biases, ``A_log``, ``dt_bias``, ``D``)."""
    adam_beta2: float = 0.999
    """AdamW's second-moment decay (the first is 0.9); 0.999 is torch's default, which Zoology keeps."""
    warmup_steps: int = 40
    """Steps of linear warmup to the peak."""
    min_lr_ratio: float = 0.0
    """The cosine after the warmup ends at ``min_lr_ratio`` times the peak (Zoology's ends at 0)."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0: none)."""
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    """One run per seed: the initial weights and the training stream (the same for every mixer and rate)."""
    log_every: int = 50
    """Steps between points of the recorded training-loss curve."""

    def __post_init__(self):
        owner = "MQARGridTrainConfig"
        for name in ("lrs", "seeds"):
            _as_tuple(self, name)
        for name in ("steps", "batch_size", "log_every"):
            _int(owner, name, getattr(self, name), 1)
        _int(owner, "warmup_steps", self.warmup_steps, 0)
        for name in ("weight_decay", "min_lr_ratio"):
            _float(owner, name, getattr(self, name), 0.0, 1.0)
        _float(owner, "adam_beta2", self.adam_beta2, 0.0, 1.0, low_open=True)
        _float(owner, "grad_clip", self.grad_clip, 0.0, 1e9)
        lrs = self.lrs
        if not isinstance(lrs, tuple) or not lrs or len(set(lrs)) != len(lrs) or any(
                isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < x <= 10 for x in lrs):
            _fail(owner, "lrs", "a non-empty list of distinct learning rates in (0, 10]", lrs)
        s = self.seeds
        if not isinstance(s, tuple) or not s or len(set(s)) != len(s) or any(
                isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in s):
            _fail(owner, "seeds", "a non-empty list of distinct ints >= 0", s)


@dataclass(frozen=True)
class MQARGridEvalConfig:
    """The held-out sequences: a validation set (chooses the learning rate) and a test set (reported), of
    different seeds, for every test level. Level ``i`` draws from ``valid_seed + i`` and ``test_seed + i`` on a CPU
    generator: the same sequences on every machine."""

    valid_examples: int = 500
    """Validation sequences per test level."""
    test_examples: int = 1000
    """Test sequences per test level."""
    batch_size: int = 256
    """Sequences per evaluation forward."""
    valid_seed: int = 20261207
    """First seed of the validation sets."""
    test_seed: int = 20260522
    """First seed of the test sets."""

    def __post_init__(self):
        owner = "MQARGridEvalConfig"
        for name in ("valid_examples", "test_examples", "batch_size"):
            _int(owner, name, getattr(self, name), 1)
        for name in ("valid_seed", "test_seed"):
            _int(owner, name, getattr(self, name), 0)


@dataclass(frozen=True)
class MQARGridConfig:
    """The whole grid: task, one model shape per width, mixers, training and held-out sets.

    ``widths`` holds one :class:`MQARModelConfig` per width (distinct ``hidden_size``); its
    ``intermediate_size`` is the base MLP size, which :func:`match_parameters` widens for every mixer with fewer
    block parameters than the largest.
    """

    task: MQARGridTask
    """The training mixture and the scored levels."""
    widths: tuple[MQARModelConfig, ...]
    """The model shape of each width: heads and head sizes fix the recurrent state, the same for every mixer."""
    mixers: tuple[str, ...]
    """The mixers compared (``attention`` is the reference: a KV cache, not a fixed state)."""
    train: MQARGridTrainConfig = MQARGridTrainConfig()
    """The training of every run."""
    evaluation: MQARGridEvalConfig = MQARGridEvalConfig()
    """The validation and test sets."""
    match_tolerance: float = 0.05
    """The block parameters of every mixer of a width must lie within this fraction of the largest."""

    def __post_init__(self):
        owner = "MQARGridConfig"
        for name in ("widths", "mixers"):
            _as_tuple(self, name)
        if isinstance(self.widths, tuple):
            object.__setattr__(self, "widths", tuple(MQARModelConfig(**w) if isinstance(w, dict) else w
                                                     for w in self.widths))
        w = self.widths
        if not isinstance(w, tuple) or not w or not all(isinstance(x, MQARModelConfig) for x in w) \
                or len({x.hidden_size for x in w}) != len(w):
            _fail(owner, "widths", "a non-empty list of model shapes of distinct hidden_size", w)
        m = self.mixers
        if not isinstance(m, tuple) or not m or len(set(m)) != len(m) or any(x not in MIXERS for x in m):
            _fail(owner, "mixers", f"a non-empty list of distinct names from {MIXERS}", m)
        for name, kind in (("task", MQARGridTask), ("train", MQARGridTrainConfig),
                           ("evaluation", MQARGridEvalConfig)):
            if not isinstance(getattr(self, name), kind):
                _fail(owner, name, f"an {kind.__name__}", getattr(self, name))
        _float(owner, "match_tolerance", self.match_tolerance, 0.0, 1.0)
        e, n = self.evaluation, len(self.task.test_levels)
        if abs(e.valid_seed - e.test_seed) < n:
            # level i uses seed + i: the two ranges must not meet, or a validation set would be a test set
            _fail(owner, "evaluation", f"valid_seed and test_seed at least {n} apart (one seed per test level), "
                  f"so that no validation set is a test set", (e.valid_seed, e.test_seed))

    def width(self, hidden_size: int) -> MQARModelConfig:
        """The model shape of the width ``hidden_size``."""
        for w in self.widths:
            if w.hidden_size == hidden_size:
                return w
        raise ValueError(f"MQARGridConfig.width: argument 'hidden_size' expected one of "
                         f"{[w.hidden_size for w in self.widths]}, got {hidden_size!r}")

    def to_dict(self) -> dict:
        """Plain data, as it reads back from JSON (tuples are lists)."""
        return json.loads(json.dumps(asdict(self)))

    @property
    def digest(self) -> str:
        """A short hash of :meth:`to_dict`, every number taken as a float (YAML's ``2`` and the command line's
        ``2.0`` are one config): every run file of the grid carries it."""
        return hashlib.sha256(json.dumps(_floats(self.to_dict()), sort_keys=True).encode()).hexdigest()[:16]


def _floats(x):
    if isinstance(x, dict):
        return {k: _floats(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_floats(v) for v in x]
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else x


def _block_parameters(shape: MQARModelConfig, mixer: str, vocab_size: int) -> int:
    with torch.device("meta"):
        return CausalLM(shape.lm_config(mixer, vocab_size)).num_parameters()["blocks"]


def match_parameters(shape: MQARModelConfig, mixers: tuple[str, ...], vocab_size: int,
                     tolerance: float = 0.05) -> dict[str, dict]:
    """The MLP size of every mixer at one width so that all have about the block (non-embedding) parameters of the
    largest at ``shape.intermediate_size``: the others' MLPs are widened by the nearest whole number of channels
    (each costs the same parameters whatever the size, so the solve is exact up to rounding). Built on the meta
    device (no memory). A match worse than ``tolerance`` is a ValueError.

    Returns ``{mixer: {"intermediate_size", "parameters" (blocks), "parameters_total", "state_floats_per_layer"
    (None for attention), "kv_floats_per_token_per_layer" (attention only)}}``.

    Example:
        >>> shape = MQARModelConfig(hidden_size=32, num_layers=2, intermediate_size=64, num_heads=2, head_k_dim=8,
        ...                         head_v_dim=16, gate_low_rank=8, attn_head_dim=16)
        >>> m = match_parameters(shape, ("gdn2", "gdn"), vocab_size=64)
        >>> m["gdn2"]["intermediate_size"], m["gdn"]["intermediate_size"] > 64
        (64, True)
        >>> abs(m["gdn"]["parameters"] - m["gdn2"]["parameters"]) / m["gdn2"]["parameters"] < 0.01
        True
    """
    base = {m: _block_parameters(shape, m, vocab_size) for m in mixers}
    target = max(base.values())
    out = {}
    for mixer in mixers:
        # an MLP channel costs gate, up and down weights in every layer: the slope is measured, not assumed
        slope = _block_parameters(replace(shape, intermediate_size=shape.intermediate_size + 1), mixer,
                                  vocab_size) - base[mixer]
        size = shape.intermediate_size + round((target - base[mixer]) / slope)
        matched = replace(shape, intermediate_size=size)
        cfg = matched.lm_config(mixer, vocab_size)
        with torch.device("meta"):
            count = CausalLM(cfg).num_parameters()
        if abs(count["blocks"] - target) > tolerance * target:
            raise ValueError(f"match_parameters: mixer '{mixer}' at width {shape.hidden_size} has "
                             f"{count['blocks']:,} block parameters with an MLP of {size}, more than "
                             f"{tolerance:.0%} from the largest mixer's {target:,}")
        attention = mixer in ATTENTION_MIXERS
        kv_heads = cfg.attn_num_kv_heads or cfg.attn_num_heads
        out[mixer] = {"intermediate_size": size, "parameters": count["blocks"], "parameters_total": count["total"],
                      "state_floats_per_layer": None if attention else cfg.state_floats_per_layer,
                      "kv_floats_per_token_per_layer": 2 * kv_heads * cfg.attn_head_dim if attention else None}
    return out
