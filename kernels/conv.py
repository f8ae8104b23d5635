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

# Tiling for the layer's shape (C = 6144, L = 2048, W = 4, 16-bit inputs), fixed without autotuning. Register
# counts are ptxas's for sm_90 (triton 3.6, bf16), compiled ahead of time; run times are not measured here.
# - BC = 128 channels: a tile row is 256 contiguous bytes in bf16, loaded as 16-byte vectors, so a warp reads
#   whole 128-byte lines; 6144 channels make 48 blocks.
# - forward BT = 64 steps, 8 warps: each thread holds 32 elements of a tile (120 registers at W = 4, no
#   spills); the W - 1 halo rows add under 5 % to the reads; N = 8, L = 2048 gives 8 * 32 * 48 = 12,288 programs.
# - backward BT = 16 steps, 4 warps: each tile row of dx needs dz on W rows, each from W shifted loads, and
#   the compiler issues these loads together, so 16 rows (8 at W > 5) is what fits in 255 registers without
#   spilling (32 rows spill at W = 4). A program walks NSUB = 16 blocks (256 steps) in order, so each block's
#   halo rows were loaded by the block before (L1 hits), and the fp32 dweight partials stay small
#   ([N * L / 256, W, C], 6.3 MB at the layer's shape) with 8 * 8 * 48 = 3,072 programs.
FWD_BT, FWD_WARPS, BC, BWD_WARPS, BWD_NSUB = 64, 8, 128, 4, 16


def _bwd_block_t(W: int) -> int:
    return 16 if W <= 5 else 8


@triton.jit
def _row_ptrs(x, halo, i_n, row0, R: tl.constexpr, L, C, W: tl.constexpr, HAS_TAIL: tl.constexpr):
    """Pointers ``[R]`` to channel 0 of rows ``row0 .. row0 + R`` of ``xp`` in sequence ``i_n``, and which rows
    exist: ``x`` rows ``0 <= row < L``, ``halo`` rows ``-(W - 1) <= row < 0``. One pointer a row (int64 row
    offsets), so a tile is a single load whose rows come from either tensor, vectorized along the channels."""
    rows = row0 + tl.arange(0, R)
    ok = (rows >= 0) & (rows < L)
    # rows that do not exist still form addresses: clamp them into the tensors
    p = x + (i_n * L + tl.minimum(tl.maximum(rows, 0), L - 1)) * C
    if HAS_TAIL:
        in_t = (rows < 0) & (rows >= 1 - W)
        p = tl.where(ok, p, halo + (i_n * (W - 1) + tl.minimum(tl.maximum(rows + W - 1, 0), W - 2)) * C)
        ok = ok | in_t
    return p, ok


@triton.jit
def _load_xp(x, halo, i_n, row0, R: tl.constexpr, o_c, L, C, W: tl.constexpr, HAS_TAIL: tl.constexpr):
    """Rows ``row0 .. row0 + R`` of ``xp`` for channels ``o_c``, as fp32 ``[R, len(o_c)]`` (zeros where a row does
    not exist or past ``C``)."""
    p, ok = _row_ptrs(x, halo, i_n, row0, R, L, C, W, HAS_TAIL)
    return tl.load(p[:, None] + o_c[None, :], mask=ok[:, None] & (o_c < C)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _pre_activation(x, halo, weight, i_n, row0, R: tl.constexpr, o_c, L, C, W: tl.constexpr,
                    HAS_TAIL: tl.constexpr):
    """``z`` at rows ``row0 .. row0 + R`` (fp32 ``[R, len(o_c)]``)."""
    m_c = o_c < C
    z = tl.zeros([R, o_c.shape[0]], dtype=tl.float32)
    for j in tl.static_range(W):
        w_j = tl.load(weight + o_c * W + j, mask=m_c, other=0.0).to(tl.float32)
        z += w_j[None, :] * _load_xp(x, halo, i_n, row0 - (W - 1) + j, R, o_c, L, C, W, HAS_TAIL)
    return z


@triton.jit
def _conv_fwd_kernel(
    x, halo, weight, y, new_tail, L, C, NT,
    W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BW: tl.constexpr, HAS_TAIL: tl.constexpr,
    SILU: tl.constexpr,
):
    i_nt = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1)
    i_n, i_t = i_nt // NT, i_nt % NT
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    row0 = i_t * BT
    rows = row0 + tl.arange(0, BT)
    z = _pre_activation(x, halo, weight, i_n, row0, BT, o_c, L, C, W, HAS_TAIL)
    if SILU:
        z = z * tl.sigmoid(z)
    m = (rows < L)[:, None] & m_c[None, :]
    tl.store(y + (i_n * L + tl.minimum(rows, L - 1))[:, None] * C + o_c[None, :], z.to(y.dtype.element_ty), mask=m)
    if W > 1:
        if i_t == NT - 1:
            # the last W - 1 rows of xp (reaching into the old tail when L < W - 1)
            o_w = tl.arange(0, BW)
            v = _load_xp(x, halo, i_n, L - (W - 1), BW, o_c, L, C, W, HAS_TAIL)
            p = new_tail + (i_n * C + o_c.to(tl.int64))[None, :] * (W - 1) + o_w[:, None]
            tl.store(p, v.to(new_tail.dtype.element_ty), mask=(o_w < W - 1)[:, None] & m_c[None, :])


@triton.jit
def _grad_pre_activation(x, halo, weight, dy, i_n, row0, R: tl.constexpr, o_c, L, C, W: tl.constexpr,
                         HAS_TAIL: tl.constexpr, SILU: tl.constexpr):
    """``dz`` at rows ``row0 .. row0 + R``: ``dy * silu'(z)`` (or ``dy``), zeros outside ``0 <= row < L``."""
    g = _load_xp(dy, dy, i_n, row0, R, o_c, L, C, W, False)
    if SILU:
        z = _pre_activation(x, halo, weight, i_n, row0, R, o_c, L, C, W, HAS_TAIL)
        s = tl.sigmoid(z)
        g = g * s * (1.0 + z * (1.0 - s))
    return g


@triton.jit
def _grad_xp(x, halo, weight, dy, dnt, dz0, i_n, row0, R: tl.constexpr, o_c, L, C, W: tl.constexpr,
             HAS_TAIL: tl.constexpr, HAS_DNT: tl.constexpr, SILU: tl.constexpr):
    """Gradient of ``xp`` at rows ``row0 .. row0 + R``, given ``dz0`` = ``dz`` at the same rows."""
    m_c = o_c < C
    acc = tl.load(weight + o_c * W + (W - 1), mask=m_c, other=0.0).to(tl.float32)[None, :] * dz0
    for s in tl.static_range(1, W):
        w_j = tl.load(weight + o_c * W + (W - 1 - s), mask=m_c, other=0.0).to(tl.float32)
        acc += w_j[None, :] * _grad_pre_activation(x, halo, weight, dy, i_n, row0 + s, R, o_c, L, C, W, HAS_TAIL,
                                                   SILU)
    if HAS_DNT:
        # rows L - W + 1 .. L - 1 were returned as the new tail (a scalar branch: only the last block has them)
        if row0 + R > L - (W - 1):
            # dnt holds them as rows [N, W - 1, C], like the halo
            acc += _load_xp(dnt, dnt, i_n, row0 - (L - (W - 1)), R, o_c, W - 1, C, W, False)
    return acc


@triton.jit
def _conv_bwd_kernel(
    x, halo, weight, dy, dnt, dx, dw_part, dtail, L, C, NS,
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
        row0 = (i_s * NSUB + k) * BT
        rows = row0 + tl.arange(0, BT)
        dz0 = _grad_pre_activation(x, halo, weight, dy, i_n, row0, BT, o_c, L, C, W, HAS_TAIL, SILU)
        for j in tl.static_range(W):
            xs = _load_xp(x, halo, i_n, row0 - (W - 1) + j, BT, o_c, L, C, W, HAS_TAIL)
            dw += tl.where(o_w[:, None] == j, tl.sum(dz0 * xs, axis=0)[None, :], 0.0)
        if STORE_DX:
            g = _grad_xp(x, halo, weight, dy, dnt, dz0, i_n, row0, BT, o_c, L, C, W, HAS_TAIL, HAS_DNT, SILU)
            m = (rows < L)[:, None] & m_c[None, :]
            p = dx + (i_n * L + tl.minimum(rows, L - 1))[:, None] * C + o_c[None, :]
            tl.store(p, g.to(dx.dtype.element_ty), mask=m)
    tl.store(dw_part + (i_ns * W + o_w[:, None]) * C + o_c[None, :], dw, mask=(o_w < W)[:, None] & m_c[None, :])
    if STORE_DTAIL:
        if i_s == 0:
            # the tail rows -(W - 1) .. -1: no dz of their own, only what they fed into the first outputs
            zero = tl.zeros([BW, BC], dtype=tl.float32)
            g = _grad_xp(x, halo, weight, dy, dnt, zero, i_n, 1 - W, BW, o_c, L, C, W, HAS_TAIL, HAS_DNT, SILU)
            p = dtail + (i_n * C + o_c.to(tl.int64))[None, :] * (W - 1) + o_w[:, None]
            tl.store(p, g.to(dtail.dtype.element_ty), mask=(o_w < W - 1)[:, None] & m_c[None, :])


def _blocks(C: int, block_c: int | None) -> int:
    bc = block_c or min(BC, max(16, triton.next_power_of_2(C)))
    if triton.cdiv(C, bc) > MAX_CHANNEL_BLOCKS:
        raise ValueError(f"conv kernels: at most {MAX_CHANNEL_BLOCKS * bc:,} channels with {bc}-channel blocks, "
                         f"got C={C:,}")
    return bc


def _rows_of(t: torch.Tensor | None, dtype: torch.dtype | None, W: int) -> torch.Tensor | None:
    """``[N, C, W - 1]`` -> its rows ``[N, W - 1, C]`` in x's layout (a copy of ``(W - 1) / L`` of x's size), so
    the kernels load the tail and its gradient like rows of ``x``; None when absent or ``W == 1``."""
    if t is None or W == 1:
        return None
    return t.transpose(1, 2).to(dtype or t.dtype).contiguous()


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
    halo = _rows_of(tail, x.dtype, W)
    y = torch.empty_like(x) if out is None else out
    new_tail = x.new_empty(N, C, W - 1) if out_tail is None else out_tail
    bt, bc = block_t or FWD_BT, _blocks(C, block_c)
    # short inputs (a streaming step has L = 1) need no 64-row tile
    bt = min(bt, max(16, triton.next_power_of_2(L)))
    NT = triton.cdiv(L, bt)
    _conv_fwd_kernel[(N * NT, triton.cdiv(C, bc))](
        x, x if halo is None else halo, weight, y, new_tail, L, C, NT,
        W=W, BT=bt, BC=bc, BW=triton.next_power_of_2(max(W - 1, 1)), HAS_TAIL=halo is not None, SILU=silu,
        num_warps=FWD_WARPS if bt * bc >= 8192 else 4,
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
    halo, dnt_rows = _rows_of(tail, x.dtype, W), _rows_of(dnew_tail, None, W)
    bt, bc = block_t or _bwd_block_t(W), _blocks(C, block_c)
    bt = min(bt, max(8, triton.next_power_of_2(L)))
    nsub = span_blocks or min(BWD_NSUB, triton.cdiv(L, bt))
    NS = triton.cdiv(L, bt * nsub)
    dx = (torch.empty_like(x) if out_dx is None else out_dx) if need_dx else None
    dtail = None
    if need_dtail:
        dtail = torch.empty(N, C, W - 1, dtype=tail_dtype, device=x.device) if out_dtail is None else out_dtail
    dw_part = torch.empty(N * NS, W, C, dtype=torch.float32, device=x.device)
    _conv_bwd_kernel[(N * NS, triton.cdiv(C, bc))](
        x, x if halo is None else halo, weight, dy, dy if dnt_rows is None else dnt_rows,
        dy if dx is None else dx, dw_part, dy if dtail is None else dtail, L, C, NS,
        W=W, BT=bt, BC=bc, BW=triton.next_power_of_2(W), NSUB=nsub, HAS_TAIL=halo is not None,
        HAS_DNT=dnt_rows is not None, SILU=silu, STORE_DX=need_dx, STORE_DTAIL=need_dtail and W > 1,
        num_warps=BWD_WARPS,
    )
    # the per-program partial sums, added in a fixed order
    return dx, dw_part.sum(0).t(), dtail
