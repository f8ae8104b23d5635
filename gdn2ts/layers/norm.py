"""RMSNorm, and the gated RMSNorms that close a GDN-2 mixer: ``RMSNorm(o) * act(gate)`` per head, or Mamba-2's
``RMSNorm(o * act(gate))`` over groups of heads.

The per-head gated norm runs one Triton launch forward and one backward (``gdn2ts.kernels.norm``) for CUDA tensors
in eager mode; under ``torch.compile`` it stays in PyTorch, where inductor fuses it with its neighbours. The group
form is PyTorch (fused by ``torch.compile`` alike)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gdn2ts.ops.gdn2.reference import compute_dtype

__all__ = ["RMSNorm", "GatedRMSNorm", "GroupGatedRMSNorm", "rms_norm", "gated_rms_norm", "NORM_BACKENDS"]

ACTIVATIONS = {"silu": F.silu, "sigmoid": torch.sigmoid}
NORM_BACKENDS = ("auto", "torch", "triton")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2, -1) + eps) * weight`` over the last axis, computed in fp32 (fp64 for fp64 inputs).

    Returns the compute dtype; callers cast back.

    Example:
        >>> import torch
        >>> y = rms_norm(torch.full((2, 4), 3.0), torch.ones(4), 0.0)
        >>> bool(torch.allclose(y, torch.ones(2, 4)))
        True
    """
    dt = compute_dtype(x.dtype)
    x = x.to(dt)
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight.to(dt)


class _TritonGatedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, weight, eps, activation):
        from gdn2ts.kernels.norm import gated_norm_fwd

        y, rstd = gated_norm_fwd(x, gate, weight, eps, activation)
        ctx.save_for_backward(x, gate, weight, rstd)
        ctx.activation = activation
        return y

    @staticmethod
    def backward(ctx, dy):
        from gdn2ts.kernels.norm import gated_norm_bwd

        x, gate, weight, rstd = ctx.saved_tensors
        dx, dgate, dweight = gated_norm_bwd(x, gate, weight, rstd, dy, ctx.activation)
        return dx, dgate, dweight, None, None


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, activation: str = "silu",
                   backend: str = "auto") -> torch.Tensor:
    """``RMSNorm(x) * weight * act(gate)`` over the last axis, in fp32, returned in ``x``'s dtype.

    ``x`` and ``gate`` ``[..., D]`` of one shape, ``weight`` ``[D]``; ``activation`` ``silu`` or ``sigmoid``.
    ``backend``: ``auto`` (the Triton kernels for fp16/bf16/fp32 CUDA tensors outside ``torch.compile``, else
    PyTorch), ``torch``, or ``triton`` (CUDA tensors, or CPU ones under ``TRITON_INTERPRET=1`` for tests).

    Example:
        >>> import torch
        >>> x, gate = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
        >>> y = gated_rms_norm(x, gate, torch.ones(8), 1e-5)
        >>> bool(torch.allclose(y, rms_norm(x, None, 1e-5) * torch.nn.functional.silu(gate), atol=1e-6))
        True
    """
    if backend not in NORM_BACKENDS:
        raise ValueError(f"gated_rms_norm: argument 'backend' expected one of {NORM_BACKENDS}, got {backend!r}")
    if gate.shape != x.shape:
        raise ValueError(f"gated_rms_norm: argument 'gate' expected shape {tuple(x.shape)} (that of 'x'), "
                         f"got {tuple(gate.shape)}")
    triton_ok = x.dtype in KERNEL_DTYPES and gate.dtype in KERNEL_DTYPES and not torch.compiler.is_compiling()
    if backend == "triton" or (backend == "auto" and x.is_cuda and triton_ok):
        return _TritonGatedNorm.apply(x, gate, weight, eps, activation)
    y = rms_norm(x, weight, eps)
    return (y * ACTIVATIONS[activation](gate.to(y.dtype))).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis of ``[..., dim]`` with a learned scale (init 1), output in the input's dtype.

    Example:
        >>> import torch
        >>> norm = RMSNorm(8, eps=1e-5)
        >>> norm(torch.randn(2, 3, 8)).shape
        torch.Size([2, 3, 8])
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class GatedRMSNorm(RMSNorm):
    """``RMSNorm(x) * act(gate)``: ``x`` and ``gate`` ``[..., dim]``, act ``silu`` or ``sigmoid``.

    In the mixer, ``dim`` is ``head_v_dim`` and ``x`` is ``[B, T, HV, V]``: one scale vector shared by all heads,
    each head normalized on its own.

    Example:
        >>> import torch
        >>> norm = GatedRMSNorm(8, eps=1e-5, activation="silu")
        >>> o, gate = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8)
        >>> norm(o, gate).shape
        torch.Size([2, 3, 4, 8])
    """

    def __init__(self, dim: int, eps: float = 1e-5, activation: str = "silu"):
        if activation not in ACTIVATIONS:
            raise ValueError(f"GatedRMSNorm: argument 'activation' expected one of {tuple(ACTIVATIONS)}, "
                             f"got {activation!r}")
        super().__init__(dim, eps)
        self.activation = activation

    def forward(self, x: torch.Tensor, gate: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """``x``, ``gate`` ``[..., dim]`` -> ``RMSNorm(x) * act(gate)`` in x's dtype (see :func:`gated_rms_norm`)."""
        return gated_rms_norm(x, gate, self.weight, self.eps, self.activation, backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"


class GroupGatedRMSNorm(RMSNorm):
    """Mamba-2's gated norm: ``RMSNorm(x * act(gate))`` over groups of ``group_size`` channels, then one learned
    scale per channel (init 1). ``x`` and ``gate`` ``[..., dim]``; computed in fp32 (fp64 for fp64 inputs),
    returned in ``x``'s dtype.

    In the Mamba-2 mixer ``dim`` is ``HV * V`` and a group is the ``G * V`` channels of the value heads that share
    one B/C group (a single group normalizes all ``HV * V`` channels together).

    Example:
        >>> import torch
        >>> norm = GroupGatedRMSNorm(8, group_size=4, eps=0.0)
        >>> x, gate = torch.randn(2, 8), torch.full((2, 8), 30.0)
        >>> y = norm(x, gate)
        >>> bool(torch.allclose(y[:, :4], rms_norm(x[:, :4] * 30.0, None, 0.0), atol=1e-5))
        True
    """

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5, activation: str = "silu"):
        if activation not in ACTIVATIONS:
            raise ValueError(f"GroupGatedRMSNorm: argument 'activation' expected one of {tuple(ACTIVATIONS)}, "
                             f"got {activation!r}")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or dim % group_size:
            raise ValueError(f"GroupGatedRMSNorm: argument 'group_size' expected a positive divisor of dim={dim}, "
                             f"got {group_size!r}")
        super().__init__(dim, eps)
        self.group_size, self.activation = group_size, activation

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """``x``, ``gate`` ``[..., dim]`` -> ``RMSNorm(x * act(gate))`` per group, times the scale, in x's dtype."""
        if gate.shape != x.shape or x.shape[-1] != self.dim:
            raise ValueError(f"GroupGatedRMSNorm: arguments 'x' and 'gate' expected one shape [..., {self.dim}], "
                             f"got {tuple(x.shape)} and {tuple(gate.shape)}")
        dt = compute_dtype(x.dtype)
        gated = (x.to(dt) * ACTIVATIONS[self.activation](gate.to(dt))).unflatten(-1, (-1, self.group_size))
        return (rms_norm(gated, None, self.eps).flatten(-2) * self.weight.to(dt)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, activation={self.activation}"
