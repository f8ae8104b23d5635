"""Triton kernels for the gated RMSNorm that closes the GDN-2 mixer, forward and backward, one launch each.

Per row (a token's value head) of ``D`` channels, with ``r = 1 / sqrt(mean(x^2) + eps)``, ``n = r x`` and
``a = act(gate)`` (``silu`` or ``sigmoid``):

    y = n * weight * a
    dgate = dy * n * weight * act'(gate)      dn = dy * weight * a      dx = r (dn - n mean(dn n))
    dweight = sum over rows of dy * n * a     (per-program fp32 partial sums, added by the host in a fixed order)

fp32 arithmetic, ``y`` in ``x``'s dtype; the forward keeps ``r`` (fp32, one per row) for the backward. ``x`` and
``gate`` are dense ``[R, D]`` (rows of ``[B, T, HV, D]``). Plain pointer arithmetic with masks, int64 offsets; runs
in the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import buffers

__all__ = ["gated_norm_fwd", "gated_norm_bwd", "ACTIVATIONS"]

ACTIVATIONS = ("silu", "sigmoid")
BLOCK_R = 64


@triton.jit
def _rows(x, gate, weight, i_r, R, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    rows = i_r * BR + tl.arange(0, BR).to(tl.int64)
    o_d = tl.arange(0, BD)
    m = (rows < R)[:, None] & (o_d < D)[None, :]
    off = rows[:, None] * D + o_d[None, :]
    xx = tl.load(x + off, mask=m, other=0.0).to(tl.float32)
    z = tl.load(gate + off, mask=m, other=0.0).to(tl.float32)
    wt = tl.load(weight + o_d, mask=o_d < D, other=0.0).to(tl.float32)
    return rows, o_d, m, off, xx, z, wt


@triton.jit
def _gated_norm_fwd_kernel(x, gate, weight, y, rstd, R, eps, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
                           SILU: tl.constexpr):
    rows, o_d, m, off, xx, z, wt = _rows(x, gate, weight, tl.program_id(0), R, D, BR, BD)
    r = 1.0 / tl.sqrt(tl.sum(xx * xx, axis=1) / D + eps)
    s = tl.sigmoid(z)
    a = z * s if SILU else s
    tl.store(y + off, (xx * r[:, None] * wt[None, :] * a).to(y.dtype.element_ty), mask=m)
    tl.store(rstd + rows, r, mask=rows < R)


@triton.jit
def _gated_norm_bwd_kernel(x, gate, weight, rstd, dy, dx, dgate, dw_part, R, D: tl.constexpr, BR: tl.constexpr,
                           BD: tl.constexpr, SILU: tl.constexpr):
    i_r = tl.program_id(0)
    rows, o_d, m, off, xx, z, wt = _rows(x, gate, weight, i_r, R, D, BR, BD)
    r = tl.load(rstd + rows, mask=rows < R, other=0.0)
    g = tl.load(dy + off, mask=m, other=0.0).to(tl.float32)
    n = xx * r[:, None]
    s = tl.sigmoid(z)
    if SILU:
        a = z * s
        da = s * (1.0 + z * (1.0 - s))
    else:
        a = s
        da = s * (1.0 - s)
    tl.store(dgate + off, (g * n * wt[None, :] * da).to(dgate.dtype.element_ty), mask=m)
    dn = g * wt[None, :] * a
    gx = r[:, None] * (dn - n * (tl.sum(dn * n, axis=1) / D)[:, None])
    tl.store(dx + off, gx.to(dx.dtype.element_ty), mask=m)
    tl.store(dw_part + i_r * D + o_d, tl.sum(tl.where(m, g * n * a, 0.0), axis=0), mask=o_d < D)


def gated_norm_fwd(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, activation: str = "silu"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, rstd)``: ``x``, ``gate`` ``[..., D]`` (made dense), ``weight`` ``[D]``; ``y`` in ``x``'s dtype and shape,
    ``rstd`` fp32 ``[rows]``."""
    D = x.shape[-1]
    x, gate = x.contiguous(), gate.contiguous()
    R = x.numel() // D if D else 0
    y = buffers.empty(*x.shape, device=x.device, dtype=x.dtype)
    rstd = buffers.empty(R, device=x.device, dtype=torch.float32)
    if R:
        _gated_norm_fwd_kernel[(triton.cdiv(R, BLOCK_R),)](
            x, gate, weight, y, rstd, R, float(eps), D=D, BR=BLOCK_R, BD=triton.next_power_of_2(D),
            SILU=activation == "silu", num_warps=4)
    return y, rstd


def gated_norm_bwd(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor,
                   activation: str = "silu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dgate, dweight)`` in the dtypes of ``x``, ``gate`` and ``weight``."""
    D = x.shape[-1]
    x, gate, dy = x.contiguous(), gate.contiguous(), dy.contiguous()
    R = x.numel() // D if D else 0
    dx = buffers.empty(*x.shape, device=x.device, dtype=x.dtype)
    dgate = buffers.empty(*gate.shape, device=x.device, dtype=gate.dtype)
    nprog = triton.cdiv(R, BLOCK_R)
    dw_part = buffers.empty(nprog, D, device=x.device, dtype=torch.float32)
    if R:
        _gated_norm_bwd_kernel[(nprog,)](
            x, gate, weight, rstd, dy, dx, dgate, dw_part, R, D=D, BR=BLOCK_R, BD=triton.next_power_of_2(D),
            SILU=activation == "silu", num_warps=4)
    # the per-program partial sums, added in a fixed order
    dweight = dw_part.sum(0) if R else torch.zeros(D, device=x.device)
    return dx, dgate, dweight.to(weight.dtype)
