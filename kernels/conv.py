"""Triton kernels for the causal depthwise short conv (with SiLU) of the GDN-2 layer, forward and backward.

Notation: ``x`` ``[N, L, C]`` (channel contiguous, read in place: no transpose, no concatenation), ``tail``
``[N, C, W - 1]`` the inputs before ``x[:, 0]``, ``weight`` ``[C, W]``. Row ``t`` of the padded input ``xp`` is
``x[:, t]`` for ``0 <= t < L`` and ``tail[:, :, W - 1 + t]`` for ``-(W - 1) <= t < 0``. Then

    z_t = sum_j weight[:, j] * xp_{t - W + 1 + j}        y_t = silu(z_t) (or z_t)        new_tail = xp_{L - W + 1 ..}

Forward: one program per (sequence, block of ``BT`` steps, block of ``BC`` channels). It loads its rows ``W``
times, each shifted by one step (the ``W - 1`` rows before the block are its halo, taken from the tail for the
first block); the repeated loads hit the L1 cache, so DRAM sees each input about ``1 + (W - 1) / BT`` times.
The program of the last time block also writes the new tail. Nothing else is saved: the backward recomputes
``z`` from ``x``, which it reads anyway.

Backward: one program per (sequence, span of ``NSUB * BT`` steps, channel block), walking the span in blocks of
``BT`` steps. With ``dz_t = dy_t * silu'(z_t)``:

    dxp_s = sum_j weight[:, j] * dz_{s + W - 1 - j} (+ dnew_tail where s is a new-tail row)
    dweight[:, j] = sum_{n, t} dz_t * xp_{t - W + 1 + j}

so a block's ``dx`` needs ``dz`` on its rows and the ``W - 1`` rows after them (recomputed, halo of ``2 (W - 1)``
input rows). ``dweight`` is summed in fp32 per program and written to a ``[programs, W, C]`` buffer that the host
reduces with ``sum`` (deterministic: no float atomics). The program of the first span also writes ``dtail``.

Plain pointer arithmetic with masks, int64 row offsets, no ``tl.make_block_ptr``; runs in the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["conv_fwd", "conv_bwd", "MAX_WIDTH", "MAX_CHANNEL_BLOCKS"]

MAX_WIDTH = 8
# channel blocks go on the grid's second axis (at most 65,535); (sequence, time block) pairs go on the first
MAX_CHANNEL_BLOCKS = 65_535

# Tiling for the layer's shape (C = 6144, L = 2048, W = 4, 16-bit inputs), fixed without autotuning:
# - BC = 128 channels: a row of a tile is 256 contiguous bytes in bf16, so each warp's loads are whole 128-byte
#   lines, and 6144 channels make 48 blocks.
# - forward BT = 64 steps: 8K-element fp32 tiles (64 registers a thread with 4 warps); the W - 1 halo rows are
#   under 5 % extra reads; N = 8, L = 2048 gives 8 * 32 * 48 = 12,288 programs, many waves on 132 SMs.
# - backward BT = 32 steps: it keeps about five tiles live (dz, dx, z, loaded x, dy), so half the rows keep it
#   at the forward's register use. A program walks NSUB = 8 blocks (256 steps) so the fp32 dweight partials
#   stay small ([N * L / 256, W, C] = 1.6 MB at the layer's shape) while 3,072 programs still fill the GPU.
FWD_BT, BWD_BT, BC, BWD_NSUB = 64, 32, 128, 8


@triton.jit
def _load_xp(x, tail, i_n, rows, o_c, L, C, W: tl.constexpr, HAS_TAIL: tl.constexpr):
    """Rows ``rows`` of ``xp`` for channels ``o_c`` of sequence ``i_n``, as fp32 ``[len(rows), len(o_c)]``:
    ``x`` for ``0 <= row < L``, the tail for ``-(W - 1) <= row < 0``, zeros elsewhere and past ``C``."""
    m_c = (o_c < C)[None, :]
    in_x = (rows >= 0) & (rows < L)
    # masked-off rows still form addresses: clamp them into the tensor
    r_x = tl.where(in_x, rows, 0).to(tl.int64)
    v = tl.load(x + (i_n * L + r_x)[:, None] * C + o_c[None, :], mask=in_x[:, None] & m_c, other=0.0)
    v = v.to(tl.float32)
    if HAS_TAIL:
        in_t = (rows < 0) & (rows >= 1 - W)
        r_t = tl.where(in_t, rows + W - 1, 0)
        p_t = tail + (i_n * C + o_c.to(tl.int64))[None, :] * (W - 1) + r_t[:, None]
        v += tl.load(p_t, mask=in_t[:, None] & m_c, other=0.0).to(tl.float32)
    return v


@triton.jit
def _pre_activation(x, tail, weight, i_n, rows, o_c, L, C, W: tl.constexpr, HAS_TAIL: tl.constexpr):
    """``z`` at ``rows`` (fp32 ``[len(rows), len(o_c)]``)."""
    m_c = o_c < C
    z = tl.zeros([rows.shape[0], o_c.shape[0]], dtype=tl.float32)
    for j in tl.static_range(W):
        w_j = tl.load(weight + o_c * W + j, mask=m_c, other=0.0).to(tl.float32)
        z += w_j[None, :] * _load_xp(x, tail, i_n, rows - (W - 1) + j, o_c, L, C, W, HAS_TAIL)
    return z


@triton.jit
def _conv_fwd_kernel(
    x, tail, weight, y, new_tail, L, C, NT,
    W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BW: tl.constexpr, HAS_TAIL: tl.constexpr,
    SILU: tl.constexpr,
):
    i_nt = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1)
    i_n, i_t = i_nt // NT, i_nt % NT
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    rows = i_t * BT + tl.arange(0, BT)
    z = _pre_activation(x, tail, weight, i_n, rows, o_c, L, C, W, HAS_TAIL)
    if SILU:
        z = z * tl.sigmoid(z)
    m = (rows < L)[:, None] & m_c[None, :]
    tl.store(y + (i_n * L + tl.minimum(rows, L - 1))[:, None] * C + o_c[None, :], z.to(y.dtype.element_ty), mask=m)
    if W > 1:
        if i_t == NT - 1:
            # the last W - 1 rows of xp (reaching into the old tail when L < W - 1)
            o_w = tl.arange(0, BW)
            v = _load_xp(x, tail, i_n, L - (W - 1) + o_w, o_c, L, C, W, HAS_TAIL)
            p = new_tail + (i_n * C + o_c.to(tl.int64))[None, :] * (W - 1) + o_w[:, None]
            tl.store(p, v.to(new_tail.dtype.element_ty), mask=(o_w < W - 1)[:, None] & m_c[None, :])


@triton.jit
def _grad_pre_activation(x, tail, weight, dy, i_n, rows, o_c, L, C, W: tl.constexpr, HAS_TAIL: tl.constexpr,
                         SILU: tl.constexpr):
    """``dz`` at ``rows``: ``dy * silu'(z)`` (or ``dy``), zeros outside ``0 <= row < L``."""
    in_x = (rows >= 0) & (rows < L)
    r = tl.where(in_x, rows, 0).to(tl.int64)
    m = in_x[:, None] & (o_c < C)[None, :]
    g = tl.load(dy + (i_n * L + r)[:, None] * C + o_c[None, :], mask=m, other=0.0).to(tl.float32)
    if SILU:
        z = _pre_activation(x, tail, weight, i_n, rows, o_c, L, C, W, HAS_TAIL)
        s = tl.sigmoid(z)
        g = g * s * (1.0 + z * (1.0 - s))
    return g


@triton.jit
def _grad_xp(x, tail, weight, dy, dnt, dz0, i_n, rows, o_c, L, C, W: tl.constexpr, HAS_TAIL: tl.constexpr,
             HAS_DNT: tl.constexpr, SILU: tl.constexpr):
    """Gradient of ``xp`` at ``rows``, given ``dz0`` = ``dz`` at the same rows."""
    m_c = o_c < C
    acc = tl.load(weight + o_c * W + (W - 1), mask=m_c, other=0.0).to(tl.float32)[None, :] * dz0
    for s in tl.static_range(1, W):
        w_j = tl.load(weight + o_c * W + (W - 1 - s), mask=m_c, other=0.0).to(tl.float32)
        acc += w_j[None, :] * _grad_pre_activation(x, tail, weight, dy, i_n, rows + s, o_c, L, C, W, HAS_TAIL,
                                                   SILU)
    if HAS_DNT:
        # rows L - W + 1 .. L - 1 were returned as the new tail
        j = rows - (L - (W - 1))
        in_t = (j >= 0) & (j < W - 1)
        p = dnt + (i_n * C + o_c.to(tl.int64))[None, :] * (W - 1) + tl.where(in_t, j, 0)[:, None]
        acc += tl.load(p, mask=in_t[:, None] & m_c[None, :], other=0.0).to(tl.float32)
    return acc


@triton.jit
def _conv_bwd_kernel(
    x, tail, weight, dy, dnt, dx, dw_part, dtail, L, C, NS,
    W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BW: tl.constexpr, NSUB: tl.constexpr,
    HAS_TAIL: tl.constexpr, HAS_DNT: tl.constexpr, SILU: tl.constexpr, STORE_DX: tl.constexpr,
    STORE_DTAIL: tl.constexpr,
):
    i_ns = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1)
    i_n, i_s = i_ns // NS, i_ns % NS
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    o_w = tl.arange(0, BW)
    dw = tl.zeros([BW, BC], dtype=tl.float32)
    for k in range(NSUB):
        rows = (i_s * NSUB + k) * BT + tl.arange(0, BT)
        dz0 = _grad_pre_activation(x, tail, weight, dy, i_n, rows, o_c, L, C, W, HAS_TAIL, SILU)
        for j in tl.static_range(W):
            xs = _load_xp(x, tail, i_n, rows - (W - 1) + j, o_c, L, C, W, HAS_TAIL)
            dw += tl.where(o_w[:, None] == j, tl.sum(dz0 * xs, axis=0)[None, :], 0.0)
        if STORE_DX:
            g = _grad_xp(x, tail, weight, dy, dnt, dz0, i_n, rows, o_c, L, C, W, HAS_TAIL, HAS_DNT, SILU)
            m = (rows < L)[:, None] & m_c[None, :]
            p = dx + (i_n * L + tl.minimum(rows, L - 1))[:, None] * C + o_c[None, :]
            tl.store(p, g.to(dx.dtype.element_ty), mask=m)
    tl.store(dw_part + (i_ns * W + o_w[:, None]) * C + o_c[None, :], dw, mask=(o_w < W)[:, None] & m_c[None, :])
    if STORE_DTAIL:
        if i_s == 0:
            # the tail rows -(W - 1) .. -1: no dz of their own, only what they fed into the first outputs
            rows = o_w - (W - 1)
            zero = tl.zeros([BW, BC], dtype=tl.float32)
            g = _grad_xp(x, tail, weight, dy, dnt, zero, i_n, rows, o_c, L, C, W, HAS_TAIL, HAS_DNT, SILU)
            p = dtail + (i_n * C + o_c.to(tl.int64))[None, :] * (W - 1) + o_w[:, None]
            tl.store(p, g.to(dtail.dtype.element_ty), mask=(o_w < W - 1)[:, None] & m_c[None, :])


def _blocks(C: int, block_c: int | None) -> int:
    bc = block_c or min(BC, max(16, triton.next_power_of_2(C)))
    if triton.cdiv(C, bc) > MAX_CHANNEL_BLOCKS:
        raise ValueError(f"conv kernels: at most {MAX_CHANNEL_BLOCKS * bc:,} channels with {bc}-channel blocks, "
                         f"got C={C:,}")
    return bc


def conv_fwd(
    x: torch.Tensor, weight: torch.Tensor, tail: torch.Tensor | None, silu: bool = True,
    block_t: int | None = None, block_c: int | None = None, out: torch.Tensor | None = None,
    out_tail: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward on validated inputs: ``x`` ``[N, L, C]`` (``L >= 1``), ``weight`` ``[C, W]``
    (``1 <= W <= 8``), ``tail`` ``[N, C, W - 1]`` or None (zeros).

    Returns ``(y [N, L, C], new_tail [N, C, W - 1])`` in ``x``'s dtype, ``y = silu(z)`` (``z`` when ``silu`` is
    false), accumulated in fp32. ``block_t`` / ``block_c`` override the tiling (powers of two); ``out`` /
    ``out_tail`` may supply the output buffers (tests poison them with NaN).
    """
    N, L, C = x.shape
    W = weight.shape[1]
    x, weight = x.contiguous(), weight.contiguous()
    tail = None if tail is None or W == 1 else tail.contiguous()
    y = torch.empty_like(x) if out is None else out
    new_tail = x.new_empty(N, C, W - 1) if out_tail is None else out_tail
    bt, bc = block_t or FWD_BT, _blocks(C, block_c)
    # short inputs (a streaming step has L = 1) need no 64-row tile
    bt = min(bt, max(16, triton.next_power_of_2(L)))
    NT = triton.cdiv(L, bt)
    _conv_fwd_kernel[(N * NT, triton.cdiv(C, bc))](
        x, x if tail is None else tail, weight, y, new_tail, L, C, NT,
        W=W, BT=bt, BC=bc, BW=triton.next_power_of_2(max(W - 1, 1)), HAS_TAIL=tail is not None, SILU=silu,
        num_warps=4,
    )
    return y, new_tail


def conv_bwd(
    x: torch.Tensor, weight: torch.Tensor, tail: torch.Tensor | None, dy: torch.Tensor,
    dnew_tail: torch.Tensor | None, silu: bool = True, need_dx: bool = True, need_dtail: bool = False,
    block_t: int | None = None, block_c: int | None = None, span_blocks: int | None = None,
    out_dx: torch.Tensor | None = None, out_dtail: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Launch the backward: ``(dx [N, L, C] or None, dweight [C, W] fp32, dtail [N, C, W - 1] or None)``.

    ``dy`` ``[N, L, C]`` is the gradient of ``y``, ``dnew_tail`` ``[N, C, W - 1]`` (or None) that of the new tail;
    ``x``, ``weight``, ``tail`` and ``silu`` as given to :func:`conv_fwd`. ``dx`` comes in ``x``'s dtype, ``dtail``
    in ``tail``'s (fp32 without a tail). ``span_blocks`` is how many ``block_t`` blocks one program walks;
    ``out_dx`` / ``out_dtail`` may supply the output buffers.
    """
    N, L, C = x.shape
    W = weight.shape[1]
    x, weight, dy = x.contiguous(), weight.contiguous(), dy.contiguous()
    tail_dtype = torch.float32 if tail is None else tail.dtype
    tail = None if tail is None or W == 1 else tail.contiguous()
    dnew_tail = None if dnew_tail is None or W == 1 else dnew_tail.contiguous()
    bt, bc = block_t or BWD_BT, _blocks(C, block_c)
    bt = min(bt, max(16, triton.next_power_of_2(L)))
    nsub = span_blocks or min(BWD_NSUB, triton.cdiv(L, bt))
    NS = triton.cdiv(L, bt * nsub)
    dx = (torch.empty_like(x) if out_dx is None else out_dx) if need_dx else None
    dtail = None
    if need_dtail:
        dtail = torch.empty(N, C, W - 1, dtype=tail_dtype, device=x.device) if out_dtail is None else out_dtail
    dw_part = torch.empty(N * NS, W, C, dtype=torch.float32, device=x.device)
    _conv_bwd_kernel[(N * NS, triton.cdiv(C, bc))](
        x, x if tail is None else tail, weight, dy, dy if dnew_tail is None else dnew_tail,
        dy if dx is None else dx, dw_part, dy if dtail is None else dtail, L, C, NS,
        W=W, BT=bt, BC=bc, BW=triton.next_power_of_2(W), NSUB=nsub, HAS_TAIL=tail is not None,
        HAS_DNT=dnew_tail is not None, SILU=silu, STORE_DX=need_dx, STORE_DTAIL=need_dtail and W > 1,
        num_warps=4,
    )
    # the per-program partial sums, added in a fixed order
    return dx, dw_part.sum(0).t(), dtail
