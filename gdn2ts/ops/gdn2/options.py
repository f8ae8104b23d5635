"""What both GDN-2 ops share: the options dataclass, the in-op activations in PyTorch (the reference and CPU path
of the Triton pre-pass), the L2 norm and the choice of backend."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gdn2ts.ops.gdn2.reference import compute_dtype
from gdn2ts.ops.validate import check_scale, fail

__all__ = ["GDN2Options", "BACKENDS", "l2norm", "activate", "resolve", "options"]

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
    """``g`` holds raw pre-activations: the op uses ``-exp(A_log[h]) * softplus(g + dt_bias)``."""
    use_bw_sigmoid: bool = False
    """``b`` and ``w`` hold logits: the op uses ``b = erase_max * sigmoid(b)`` and ``w = sigmoid(w)``."""
    erase_max: float = 1.0
    """Upper end of the erase gate's range with ``use_bw_sigmoid`` (2.0 allows negative eigenvalues)."""
    backend: str = "auto"
    """``auto`` (the device's fast path), ``torch`` (chunked PyTorch), ``naive`` (token-by-token) or ``triton``."""

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"argument 'backend' expected one of {BACKENDS}, got {self.backend!r}")
        if not (0.0 < self.erase_max <= 2.0):
            raise ValueError(f"argument 'erase_max' expected a value in (0, 2], got {self.erase_max!r}")


def l2norm(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x / sqrt(sum(x^2, -1) + 1e-6)`` computed in ``dtype`` (default: x's)."""
    x = x if dtype is None else x.to(dtype)
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + L2NORM_EPS)


def activate(q, k, g, b, w, opts: GDN2Options, A_log, dt_bias):
    """Apply the in-op options in PyTorch (differentiable, so A_log and dt_bias get gradients)."""
    dt = compute_dtype(q.dtype)
    if opts.use_qk_l2norm:
        q, k = l2norm(q, dt), l2norm(k, dt)
    if opts.use_gate_in_kernel:
        x = g.to(dt)
        if dt_bias is not None:
            x = x + dt_bias.to(dt).reshape(g.shape[2], g.shape[3])
        g = -A_log.to(dt).exp()[:, None] * F.softplus(x)
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
             backend) -> GDN2Options:
    try:
        return GDN2Options(
            scale=check_scale(op, scale, q.shape[-1]),
            use_qk_l2norm=bool(use_qk_l2norm_in_kernel),
            use_gate_in_kernel=bool(use_gate_in_kernel),
            use_bw_sigmoid=bool(use_bw_sigmoid_in_kernel),
            erase_max=float(erase_max),
            backend=backend,
        )
    except ValueError as e:
        if str(e).startswith(op):
            raise
        raise ValueError(f"{op}: {e}") from None
