"""What both GDN-2 ops share: the options dataclass, the in-op activations in PyTorch (the reference and CPU path
of the Triton pre-pass), the L2 norm and the choice of backend."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gdn2ts.ops.gdn2.reference import compute_dtype
from gdn2ts.ops.validate import check_scale, fail

__all__ = ["GDN2Options", "BACKENDS", "l2norm", "gate", "activate", "resolve", "options"]

# the backends both ops have; "auto" picks the device's fast path
BACKENDS = ("auto", "torch", "naive", "triton")
L2NORM_EPS = 1e-6


@dataclass(frozen=True)
class GDN2Options:
    """Non-tensor options of a GDN-2 op call."""

    scale: float
    """Multiplier of q in the read-out; ``K ** -0.5`` by default."""
    use_qk_l2norm: bool = False
    """L2-normalize q and k over K inside the op (``x / sqrt(sum x^2 + 1e-6)``)."""
    use_gate_in_kernel: bool = False
    """``g`` holds raw pre-activations: the op uses ``-exp(A_log[h]) * softplus(g + dt_bias)`` (or the bounded
    gate of ``lower_bound``)."""
    use_bw_sigmoid: bool = False
    """``b`` and ``w`` hold logits: the op uses ``b = erase_max * sigmoid(b)`` and ``w = sigmoid(w)``."""
    erase_max: float = 1.0
    """Upper end of the erase gate's range with ``use_bw_sigmoid`` (2.0 allows negative eigenvalues)."""
    lower_bound: float | None = None
    """With ``use_gate_in_kernel``: the bounded gate ``lower_bound * sigmoid(exp(A_log) * (g + dt_bias))`` (KDA's
    "safe" gate, every log-decay in ``(lower_bound, 0)``; ``A_log`` may then be omitted: a rate of 1) instead of
    ``-exp(A_log) * softplus(g + dt_bias)``. A finite negative number."""
    backend: str = "auto"
    """``auto`` (the device's fast path), ``torch`` (chunked PyTorch), ``naive`` (token-by-token) or ``triton``."""

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"argument 'backend' expected one of {BACKENDS}, got {self.backend!r}")
        if not (0.0 < self.erase_max <= 2.0):
            raise ValueError(f"argument 'erase_max' expected a value in (0, 2], got {self.erase_max!r}")
        lb = self.lower_bound
        if lb is not None and (isinstance(lb, bool) or not isinstance(lb, (int, float)) or not math.isfinite(lb)
                               or lb >= 0):
            raise ValueError(f"argument 'lower_bound' expected a finite negative number or None, got {lb!r}")
        if lb is not None and not self.use_gate_in_kernel:
            raise ValueError(f"argument 'lower_bound' expected None without use_gate_in_kernel=True (it bounds the "
                             f"in-op gate), got {lb!r}")


def l2norm(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x / sqrt(sum(x^2, -1) + 1e-6)`` computed in ``dtype`` (default: x's)."""
    x = x if dtype is None else x.to(dtype)
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + L2NORM_EPS)


def gate(g, A_log, dt_bias, lower_bound: float | None, dtype: torch.dtype) -> torch.Tensor:
    """The decay from raw pre-activations ``g`` ``[B, T, heads, K]`` in ``dtype`` (differentiable in g, A_log and
    dt_bias): ``-exp(A_log) * softplus(g + dt_bias)``, or with ``lower_bound`` the bounded
    ``lower_bound * sigmoid(exp(A_log) * (g + dt_bias))`` (``A_log`` None: a rate of 1)."""
    x = g.to(dtype)
    if dt_bias is not None:
        x = x + dt_bias.to(dtype).reshape(g.shape[2], g.shape[3])
    rate = None if A_log is None else A_log.to(dtype).exp()[:, None]
    if lower_bound is None:
        return -rate * F.softplus(x)
    return lower_bound * torch.sigmoid(x if rate is None else rate * x)


def activate(q, k, g, b, w, opts: GDN2Options, A_log, dt_bias):
    """Apply the in-op options in PyTorch (differentiable, so A_log and dt_bias get gradients)."""
    dt = compute_dtype(q.dtype)
    if opts.use_qk_l2norm:
        q, k = l2norm(q, dt), l2norm(k, dt)
    if opts.use_gate_in_kernel:
        g = gate(g, A_log, dt_bias, opts.lower_bound, dt)
    if opts.use_bw_sigmoid:
        b = opts.erase_max * torch.sigmoid(b.to(dt))
        w = torch.sigmoid(w.to(dt))
    return q, k, g, b, w


def _triton_usable(device: torch.device) -> bool:
    """Triton runs CUDA tensors, or CPU tensors under its interpreter (``TRITON_INTERPRET=1``, for tests)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve(op: str, backend: str, device: torch.device) -> str:
    """The path a call takes: ``auto`` is Triton for CUDA tensors and PyTorch's chunked form elsewhere."""
    if backend not in BACKENDS:
        fail(op, "backend", f"one of {BACKENDS}", repr(backend))
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and not _triton_usable(device):
        fail(op, "backend", "'triton' only for CUDA tensors (or under TRITON_INTERPRET=1)", f"tensors on {device}")
    return backend


def options(op, q, scale, use_qk_l2norm_in_kernel, use_gate_in_kernel, use_bw_sigmoid_in_kernel, erase_max,
            backend, lower_bound=None) -> GDN2Options:
    try:
        return GDN2Options(
            scale=check_scale(op, scale, q.shape[-1]),
            use_qk_l2norm=bool(use_qk_l2norm_in_kernel),
            use_gate_in_kernel=bool(use_gate_in_kernel),
            use_bw_sigmoid=bool(use_bw_sigmoid_in_kernel),
            erase_max=float(erase_max),
            lower_bound=lower_bound,
            backend=backend,
        )
    except ValueError as e:
        if str(e).startswith(op):
            raise
        raise ValueError(f"{op}: {e}") from None
