"""RMSNorm, and the gated RMSNorm that closes a GDN-2 mixer: ``RMSNorm(o) * act(gate)`` per head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gdn2ts.ops.reference import compute_dtype

__all__ = ["RMSNorm", "GatedRMSNorm", "rms_norm"]

ACTIVATIONS = {"silu": F.silu, "sigmoid": torch.sigmoid}


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

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        y = rms_norm(x, self.weight, self.eps)
        return (y * ACTIVATIONS[self.activation](gate.to(y.dtype))).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"
