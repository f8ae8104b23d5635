"""The MQAR comparison: small causal LMs, one per mixer, trained on fresh MQAR batches at each difficulty level and
seed, then scored on held-out sequences.

Every recurrent mixer gets the same heads and head sizes, so the same recurrent state (``num_heads * head_k_dim *
head_v_dim`` floats per layer): the comparison is at matched state size, which is what MQAR measures. Parameter
counts differ between mixers (GDN-2's gates are wider) and are recorded. ``swa`` and ``attention`` may join as
references; their memory is a KV cache, not a fixed state.

A plain PyTorch loop: AdamW (betas 0.9/0.95, weight decay on matrices only, not on ``_no_weight_decay``
parameters), linear warmup then cosine to ``min_lr_ratio`` of the peak, gradient clipping, cross-entropy at the
answer positions only, bf16 autocast on CUDA. Training batches come from a generator on the device seeded by the
run's seed; the held-out set from a CPU generator seeded by ``MQAREvalConfig.seed`` (the same sequences on any
machine).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from gdn2ts.lm.eval.mqar import IGNORE_INDEX, MQARConfig, evaluate_mqar, make_mqar
from gdn2ts.models.lm import CausalLM
from gdn2ts.models.lm_config import MIXERS, LMConfig
from gdn2ts.models.schedule import WarmupCosine

__all__ = ["MQARModelConfig", "MQARTrainConfig", "MQAREvalConfig", "train_mqar_run", "answer_logits", "score_answers"]


def _ints(owner: str, obj, names: tuple[str, ...], low: int = 1) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{owner}: field '{name}' expected an int >= {low}, got {value!r}")


def _floats(owner: str, obj, names: tuple[str, ...], low: float, high: float) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise ValueError(f"{owner}: field '{name}' expected a float in [{low}, {high}], got {value!r}")


@dataclass(frozen=True)
class MQARModelConfig:
    """The models compared: ``num_layers`` x [mixer, SwiGLU MLP], one mixer name per model.

    Example:
        >>> m = MQARModelConfig(hidden_size=32, num_heads=2, head_k_dim=8, head_v_dim=8, gate_low_rank=4,
        ...                     intermediate_size=32, attn_head_dim=8)
        >>> cfg = m.lm_config("kda", vocab_size=64)
        >>> cfg.layout, m.state_floats_per_layer
        (('kda', 'kda'), 128)
    """

    hidden_size: int = 128
    """Width ``d_model`` of the residual stream."""
    num_layers: int = 2
    """Mixer layers (each followed by an MLP)."""
    intermediate_size: int = 256
    """Channels of each SwiGLU MLP."""
    num_heads: int = 2
    """Heads of the recurrent mixers."""
    head_k_dim: int = 64
    """Key dimension per head (rows of each head's state)."""
    head_v_dim: int = 64
    """Value dimension per head (columns of each head's state)."""
    conv_size: int = 4
    """Width of the recurrent mixers' short causal conv."""
    gate_low_rank: int = 32
    """Rank of the recurrent mixers' low-rank decay and output-gate projections."""
    attn_num_heads: int = 2
    """Heads of the attention references (``swa``, ``attention``)."""
    attn_head_dim: int = 64
    """Dimension per attention head (even)."""
    window: int = 64
    """Window of the ``swa`` reference."""

    def __post_init__(self):
        _ints("MQARModelConfig", self, ("hidden_size", "num_layers", "intermediate_size", "num_heads",
                                        "head_k_dim", "head_v_dim", "conv_size", "gate_low_rank", "attn_num_heads",
                                        "attn_head_dim", "window"))
        # the LM config checks the rest (an even attention head size, ...)
        self.lm_config(MIXERS[0], vocab_size=8)

    def lm_config(self, mixer: str, vocab_size: int) -> LMConfig:
        """The :class:`LMConfig` of the model with ``mixer`` in every layer, for a task of ``vocab_size``."""
        if mixer not in MIXERS:
            raise ValueError(f"MQARModelConfig.lm_config: argument 'mixer' expected one of {MIXERS}, got {mixer!r}")
        return LMConfig(vocab_size=vocab_size, hidden_size=self.hidden_size, num_cells=self.num_layers,
                        cell=(mixer,), intermediate_size=self.intermediate_size, num_heads=self.num_heads,
                        head_k_dim=self.head_k_dim, head_v_dim=self.head_v_dim, conv_size=self.conv_size,
                        gate_low_rank=self.gate_low_rank, attn_num_heads=self.attn_num_heads,
                        attn_head_dim=self.attn_head_dim, window=self.window)

    @property
    def state_floats_per_layer(self) -> int:
        """Recurrent state of one layer: ``num_heads * head_k_dim * head_v_dim`` floats, for every recurrent
        mixer."""
        return self.num_heads * self.head_k_dim * self.head_v_dim


@dataclass(frozen=True)
class MQARTrainConfig:
    """One training budget, the same for every mixer, level and seed."""

    steps: int = 400
    """Optimizer steps per run, each on a fresh batch."""
    batch_size: int = 64
    """Sequences per step."""
    lr: float = 3e-3
    """Peak learning rate."""
    weight_decay: float = 0.1
    """AdamW weight decay of the matrices (not of norms, biases, ``A_log``, ``dt_bias``, ``D``)."""
    warmup_steps: int = 40
    """Steps of linear warmup, from ``lr / warmup_steps`` up to ``lr``."""
    min_lr_ratio: float = 0.1
    """The cosine ends at ``min_lr_ratio * lr``."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0: none)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """One run per seed (weights and training batches)."""
    pair_mix: tuple[float, ...] = (1.0,)
    """Training batches cycle through these fractions of the level's pairs (at its length and vocabulary), e.g.
    ``[0.125, 0.25, 0.5, 1.0]``: the easier sequences teach the recall circuit sooner. Held-out scores are always
    at the full level."""
    log_every: int = 25
    """Steps between points of the training-loss curve (the mean loss over those steps)."""
    eval_every: int = 100
    """Steps between points of the held-out accuracy curve (0: only at the end)."""

    def __post_init__(self):
        owner = "MQARTrainConfig"
        for name in ("seeds", "pair_mix"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        _ints(owner, self, ("steps", "batch_size", "log_every"))
        _ints(owner, self, ("warmup_steps", "eval_every"), low=0)
        _floats(owner, self, ("lr",), 1e-8, 10.0)
        _floats(owner, self, ("weight_decay", "min_lr_ratio"), 0.0, 1.0)
        _floats(owner, self, ("grad_clip",), 0.0, math.inf)
        s = self.seeds
        if not isinstance(s, tuple) or not s or len(set(s)) != len(s) or any(
                isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in s):
            raise ValueError(f"{owner}: field 'seeds' expected a non-empty list of distinct ints >= 0, got {s!r}")
        m = self.pair_mix
        if not isinstance(m, tuple) or not m or any(isinstance(f, bool) or not isinstance(f, (int, float))
                                                    or not 0 < f <= 1 for f in m):
            raise ValueError(f"{owner}: field 'pair_mix' expected a non-empty list of fractions in (0, 1], got {m!r}")

    def levels(self, level: MQARConfig) -> list[MQARConfig]:
        """The training levels of ``level`` under ``pair_mix``, in cycle order.

        Example:
            >>> t = MQARTrainConfig(pair_mix=(0.25, 1.0))
            >>> [lv.num_pairs for lv in t.levels(MQARConfig(vocab_size=64, num_pairs=8, seq_len=32))]
            [2, 8]
        """
        out = []
        for f in self.pair_mix:
            pairs = max(1, round(f * level.num_pairs))
            queries = None if level.num_queries is None else min(level.num_queries, pairs)
            out.append(replace(level, num_pairs=pairs, num_queries=queries))
        return out

    def schedule(self) -> WarmupCosine:
        """The learning rate of each optimizer step (0-based): linear warmup to ``lr``, then a cosine to
        ``min_lr_ratio * lr`` at the last step.

        Example:
            >>> lr = MQARTrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1).schedule()
            >>> [round(lr(s), 3) for s in (0, 9, 10, 99)]
            [0.1, 1.0, 1.0, 0.1]
        """
        return WarmupCosine(self.warmup_steps, self.steps, self.min_lr_ratio, peak=self.lr)


@dataclass(frozen=True)
class MQAREvalConfig:
    """The held-out sequences of each level."""

    num_examples: int = 1024
    """Held-out sequences scored at the end of each run."""
    batch_size: int = 256
    """Sequences per evaluation forward."""
    curve_examples: int = 256
    """The first this many held-out sequences give the accuracy curve during training."""
    seed: int = 20260522
    """Seed of the held-out sequences (a CPU generator: the same on every machine)."""

    def __post_init__(self):
        _ints("MQAREvalConfig", self, ("num_examples", "batch_size", "curve_examples"))
        _ints("MQAREvalConfig", self, ("seed",), low=0)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, plain = [], []
    for p in model.parameters():
        # matrices decay; vectors (norms, biases) and the marked gate parameters (A_log, dt_bias, D) do not
        (plain if p.dim() < 2 or getattr(p, "_no_weight_decay", False) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def answer_logits(model: CausalLM, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The logits of ``model`` at the positions where ``mask`` ``[B, T]`` is True only, ``[n, vocab]`` in row-major
    order: the blocks run on every token, the output head only on the answers (at a vocabulary of 8,192 the full
    ``[B, T, vocab]`` logits would cost more than the rest of the model). Equal to ``model(input_ids)[0][mask]``.

    Example:
        >>> from gdn2ts.models.lm_config import LMConfig
        >>> model = CausalLM(LMConfig(vocab_size=32, hidden_size=16, num_cells=1, intermediate_size=16, num_heads=2,
        ...                           head_k_dim=8, head_v_dim=8, gate_low_rank=4)).double()
        >>> ids = torch.randint(0, 32, (2, 6)); mask = torch.rand(2, 6) < 0.5
        >>> bool(torch.allclose(answer_logits(model, ids, mask), model(ids)[0][mask]))
        True
    """
    x = model.embed(input_ids)
    for block in model.blocks:
        x, _ = block(x, None)
    return model.lm_head(model.norm(x[mask]))


@torch.no_grad()
def score_answers(model: CausalLM, input_ids: torch.Tensor, labels: torch.Tensor, batch_size: int,
                  autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """:func:`~gdn2ts.lm.eval.mqar.evaluate_mqar`'s ``{"accuracy", "sequence_accuracy", "loss"}`` with the output
    head applied at the answers only (:func:`answer_logits`), for large vocabularies; eval mode, restored after.

    Example:
        >>> from gdn2ts.lm.eval.mqar import evaluate_mqar
        >>> from gdn2ts.models.lm_config import LMConfig
        >>> model = CausalLM(LMConfig(vocab_size=21, hidden_size=16, num_cells=1, intermediate_size=16, num_heads=2,
        ...                           head_k_dim=8, head_v_dim=8, gate_low_rank=4)).double()
        >>> ids, labels = make_mqar(MQARConfig(vocab_size=21, num_pairs=3, seq_len=14), 5, seed=1)
        >>> a, b = score_answers(model, ids, labels, 2), evaluate_mqar(model, ids, labels, 2)
        >>> all(abs(a[k] - b[k]) < 1e-9 for k in a)
        True
    """
    was_training = model.training
    model.eval()
    correct = answered = full = 0
    loss_sum = 0.0
    try:
        for i in range(0, input_ids.shape[0], batch_size):
            ids, lab = input_ids[i:i + batch_size], labels[i:i + batch_size]
            mask = lab != IGNORE_INDEX
            with torch.autocast(ids.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = answer_logits(model, ids, mask)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            target = lab[mask]
            hit = logits.argmax(-1) == target
            correct += int(hit.sum())
            answered += int(target.numel())
            # a sequence is right when none of its answers is wrong
            wrong = torch.zeros_like(mask, dtype=torch.long)
            wrong[mask] = (~hit).long()
            full += int((wrong.sum(1) == 0).sum())
            loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
    finally:
        model.train(was_training)
    n = input_ids.shape[0]
    return {"accuracy": correct / answered if answered else math.nan, "sequence_accuracy": full / n,
            "loss": loss_sum / answered if answered else math.nan}


def train_mqar_run(level: MQARConfig, mixer: str, seed: int, model_cfg: MQARModelConfig, train: MQARTrainConfig,
                   eval_ids: torch.Tensor, eval_labels: torch.Tensor, eval_batch: int, curve_examples: int,
                   device: torch.device, report: Callable[[int, float], None] | None = None) -> dict:
    """Train one model on ``level`` and score it on the held-out ``eval_ids`` / ``eval_labels`` (on ``device``).

    Returns ``{"accuracy", "sequence_accuracy", "loss", "train_seconds", "steps_per_second", "curve":
    {"step", "loss"}, "eval_curve": {"step", "accuracy"}}`` (the seconds include the curve's evaluations).
    ``report(step, loss)`` is called at each loss point.

    Example:
        >>> level = MQARConfig(vocab_size=32, num_pairs=2, seq_len=12)
        >>> m = MQARModelConfig(hidden_size=16, num_layers=1, intermediate_size=16, num_heads=2, head_k_dim=8,
        ...                     head_v_dim=8, gate_low_rank=4, attn_head_dim=8)
        >>> t = MQARTrainConfig(steps=3, batch_size=4, warmup_steps=1, seeds=(0,), log_every=2, eval_every=2)
        >>> ids, labels = make_mqar(level, 8, seed=9)
        >>> r = train_mqar_run(level, "gdn2", 0, m, t, ids, labels, 8, 4, torch.device("cpu"))
        >>> r["curve"]["step"], r["eval_curve"]["step"], 0 <= r["accuracy"] <= 1
        ([2, 3], [2, 3], True)
    """
    torch.manual_seed(seed)
    model = CausalLM(model_cfg.lm_config(mixer, level.vocab_size)).to(device)
    model.train()
    opt = torch.optim.AdamW(_param_groups(model, train.weight_decay), lr=train.lr, betas=(0.9, 0.95))
    amp = torch.bfloat16 if device.type == "cuda" else None
    # the training stream: a device generator, so that batches are drawn where they are used
    gen = torch.Generator(device=device).manual_seed(1_000_003 * (seed + 1))
    mix = train.levels(level)
    curve = {"step": [], "loss": []}
    eval_curve = {"step": [], "accuracy": []}
    curve_ids, curve_labels = eval_ids[:curve_examples], eval_labels[:curve_examples]
    running = torch.zeros((), device=device)
    since = 0
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    lr_at = train.schedule()
    for step in range(train.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        ids, labels = make_mqar(mix[step % len(mix)], train.batch_size, gen, device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits, _ = model(ids)
        mask = labels != IGNORE_INDEX
        # only the answers carry a label: score just those rows of the logits
        loss = F.cross_entropy(logits[mask].float(), labels[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        opt.step()
        running += loss.detach()
        since += 1
        done = step + 1
        if done % train.log_every == 0 or done == train.steps:
            value = float(running) / since
            running.zero_()
            since = 0
            curve["step"].append(done)
            curve["loss"].append(value)
            if report is not None:
                report(done, value)
        if (train.eval_every and done % train.eval_every == 0) or done == train.steps:
            r = evaluate_mqar(model, curve_ids, curve_labels, batch_size=eval_batch, autocast_dtype=amp)
            eval_curve["step"].append(done)
            eval_curve["accuracy"].append(r["accuracy"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    final = evaluate_mqar(model, eval_ids, eval_labels, batch_size=eval_batch, autocast_dtype=amp)
    return {**final, "train_seconds": seconds, "steps_per_second": train.steps / seconds, "curve": curve,
            "eval_curve": eval_curve}
