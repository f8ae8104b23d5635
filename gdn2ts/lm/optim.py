"""The paper's optimizer and schedule: AdamW (lr 4e-4, betas 0.9/0.95, weight decay 0.1 on matrices only), linear
warmup, then cosine decay to 10 % of the peak; gradients clipped to norm 1.0 by the training loop.

Weight decay applies to every weight matrix (the projections, the MLPs, the short convs, the embedding and the
output head: the GPT-2 / Megatron / flash-linear-attention convention, where only vectors are exempt). It does
not apply to norms' scales, biases, ``A_log``, ``dt_bias``, Mamba-2's ``D``, or any parameter marked
``p._no_weight_decay = True``. ``decay_embeddings=False`` also exempts the embedding and the head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from gdn2ts.layers.norm import RMSNorm
from gdn2ts.models.schedule import WarmupCosine

__all__ = ["OptimConfig", "WarmupCosine", "build_optimizer", "build_scheduler", "no_decay_names", "param_groups"]

# wrappers (FSDP, activation checkpointing, torch.compile) put these segments into parameter names
_WRAPPER_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def _fail(field: str, expected: str, got: object) -> None:
    raise ValueError(f"OptimConfig: field '{field}' expected {expected}, got {got!r}")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and the warmup + cosine schedule (GDN2.md section 4 gives the paper's values, the defaults here).

    Example:
        >>> cfg = OptimConfig(warmup_steps=10)
        >>> cfg.lr, cfg.betas, cfg.weight_decay, cfg.min_lr_ratio, cfg.grad_clip
        (0.0004, (0.9, 0.95), 0.1, 0.1, 1.0)
    """

    lr: float = 4e-4
    """Peak learning rate, reached at the end of the warmup."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW's (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW's epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay of the weight matrices (vectors, norms, biases, ``A_log``, ``dt_bias`` get none)."""
    decay_embeddings: bool = True
    """Whether the embedding and the output head get weight decay (they are matrices; the paper's convention)."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this (None: no clipping)."""
    warmup_steps: int = 2000
    """Optimizer steps of linear warmup from ``lr / warmup_steps`` to ``lr`` (the paper: 1B tokens, about 1,900
    steps of 0.5M tokens)."""
    min_lr_ratio: float = 0.1
    """The cosine ends at ``min_lr_ratio * lr`` on the last step (the paper: 4e-5 = 10 % of 4e-4)."""

    def __post_init__(self):
        betas = self.betas
        if isinstance(betas, list):
            # YAML and the command line give lists; stored as a tuple so that the config stays hashable
            betas = tuple(betas)
            object.__setattr__(self, "betas", betas)
        for name in ("lr", "eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                _fail(name, "a finite float > 0", v)
        if not (isinstance(betas, tuple) and len(betas) == 2
                and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
            _fail("betas", "two floats in [0, 1)", self.betas)
        wd = self.weight_decay
        if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not math.isfinite(wd) or wd < 0:
            _fail("weight_decay", "a finite float >= 0", wd)
        clip = self.grad_clip
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float))
                                 or not math.isfinite(clip) or clip <= 0):
            _fail("grad_clip", "None or a finite float > 0", clip)
        ws = self.warmup_steps
        if isinstance(ws, bool) or not isinstance(ws, int) or ws < 0:
            _fail("warmup_steps", "an int >= 0", ws)
        r = self.min_lr_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1:
            _fail("min_lr_ratio", "a float in [0, 1]", r)


def _clean(name: str) -> str:
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_PARTS)


def no_decay_names(model: nn.Module, decay_embeddings: bool = True) -> set[str]:
    """Names of the parameters of ``model`` that get no weight decay: vectors (every parameter with fewer than two
    dimensions: norms' scales, biases, ``A_log``, ``dt_bias``, ``D``), every parameter of a norm module, every
    parameter marked ``_no_weight_decay``, and, when ``decay_embeddings`` is False, embeddings and the output head.
    Names are as ``model.named_parameters()`` gives them on the unwrapped model.

    Call it before wrapping (FSDP replaces parameters, and the ``_no_weight_decay`` marks with them).

    Example:
        >>> from gdn2ts.lm import build_model
        >>> names = no_decay_names(build_model("tiny_gdn2"))
        >>> sorted(n for n in names if n.startswith("blocks.0.mixer."))[:3]
        ['blocks.0.mixer.A_log', 'blocks.0.mixer.dt_bias', 'blocks.0.mixer.g_proj.1.bias']
        >>> "blocks.0.mixer.q_proj.weight" in names, "embed.weight" in names
        (False, False)
    """
    out = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            head = isinstance(module, nn.Embedding) or mod_name.endswith("lm_head")
            if p.dim() < 2 or isinstance(module, RMSNorm) or getattr(p, "_no_weight_decay", False) \
                    or (head and not decay_embeddings):
                out.add(_clean(name))
    return out


def param_groups(model: nn.Module, weight_decay: float, no_decay: set[str]) -> list[dict]:
    """Two AdamW groups over ``model``'s trainable parameters: ``weight_decay`` for those whose (wrapper-free)
    name is not in ``no_decay``, 0 for the rest. Works on an FSDP-wrapped model (``use_orig_params=True``) when
    ``no_decay`` came from the unwrapped one.

    Example:
        >>> from gdn2ts.lm import build_model
        >>> model = build_model("tiny_gdn2")
        >>> groups = param_groups(model, 0.1, no_decay_names(model))
        >>> [g["weight_decay"] for g in groups], sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
        ([0.1, 0.0], True)
    """
    decay, keep = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (keep if _clean(name) in no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: OptimConfig, no_decay: set[str] | None = None
                    ) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (``no_decay`` from :func:`no_decay_names` of ``model`` when omitted).

    Example:
        >>> from gdn2ts.lm import build_model
        >>> opt = build_optimizer(build_model("tiny_gdn2"), OptimConfig())
        >>> opt.defaults["lr"], opt.defaults["betas"]
        (0.0004, (0.9, 0.95))
    """
    if not isinstance(config, OptimConfig):
        raise ValueError(f"build_optimizer: argument 'config' expected an OptimConfig, got {type(config).__name__}")
    if no_decay is None:
        no_decay = no_decay_names(model, config.decay_embeddings)
    groups = param_groups(model, config.weight_decay, no_decay)
    params = [p for g in groups for p in g["params"]]
    # one fused launch per step on the GPU (the default, foreach, runs several passes over 1.3B parameters)
    fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """The warmup + cosine schedule (:class:`~gdn2ts.models.schedule.WarmupCosine`) over ``total_steps`` optimizer
    steps, ending at ``min_lr_ratio * lr`` on the last (call ``step()`` after each ``optimizer.step()``).

    Example:
        >>> from gdn2ts.lm import build_model
        >>> opt = build_optimizer(build_model("tiny_gdn2"), OptimConfig(warmup_steps=1))
        >>> sched = build_scheduler(opt, OptimConfig(warmup_steps=1), total_steps=3)
        >>> sched.get_last_lr()[0]
        0.0004
    """
    fn = WarmupCosine(config.warmup_steps, total_steps, config.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
