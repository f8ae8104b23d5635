"""Triton kernels for the causal depthwise short conv (with SiLU) of the GDN-2 layer, forward and backward.

Notation: ``x`` holds sequences of ``C`` channels (channel contiguous, rows read in place through their strides:
no transpose, no concatenation), ``tail`` ``[N, C, W - 1]`` the inputs before each sequence's first row,
``weight`` ``[C, W]``. Row ``p`` of a sequence's padded input ``xp`` is its row ``p`` for ``0 <= p < len`` and
``tail[n, :, W - 1 + p]`` for ``-(W - 1) <= p < 0``. Then

    z_p = sum_j weight[:, j] * xp_{p - W + 1 + j}       y_p = silu(z_p) (or z_p)       new_tail = xp_{lt - W + 1 .. lt}

Three layouts (``MODE``): ``x`` ``[N, L, C]`` (every sequence ``L`` rows, ``lt = L``); the same with ``lengths``
(row ``n``'s tail is taken at ``lt = lengths[n]``; rows past it are computed like any other, as the PyTorch path
does); and packed, ``x`` ``[1, total, C]`` with ``cu_seqlens`` (sequence ``n`` is rows ``cu[n] .. cu[n + 1]``,
found per row by a binary search over ``cu`` in the kernel: no host synchronization, no padding).

Forward: one program per (block of ``BT`` rows, block of ``BC`` channels). It loads its rows ``W`` times, each
shifted by one step; a row whose shifted input lies before its sequence's start takes it from the tail, so the
repeated loads hit the L1 cache and DRAM sees each input about ``1 + (W - 1) / BT`` times. ``N`` more programs
write the new tails. Nothing else is saved: the backward recomputes ``z`` from ``x``, which it reads anyway.

Backward: one program per (span of ``NSUB * BT`` rows, channel block), walking the span in blocks of ``BT`` rows.
With ``dz_p = dy_p * silu'(z_p)`` (zero outside ``0 <= p < len``, so nothing crosses into the next sequence):

    dxp_p = sum_j weight[:, j] * dz_{p + W - 1 - j} (+ dnew_tail where p is a new-tail row)
    dweight[:, j] = sum_{n, p} dz_p * xp_{p - W + 1 + j}

``dweight`` is summed in fp32 per program into a ``[programs, W, C]`` buffer that the host reduces with ``sum``
(deterministic: no float atomics). ``N`` more programs write ``dtail``.

Plain pointer arithmetic with masks, int64 row offsets, no ``tl.make_block_ptr``; runs in the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["conv_fwd", "conv_bwd", "MAX_WIDTH", "MAX_CHANNEL_BLOCKS"]

MAX_WIDTH = 8
# channel blocks go on the grid's second axis (at most 65,535); row blocks go on the first
MAX_CHANNEL_BLOCKS = 65_535
DENSE, LENGTHS, PACKED = 0, 1, 2

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
def _find_seq(cu, rows, N, LOGN: tl.constexpr):
    """The sequence of each packed row: the largest ``n < N`` with ``cu[n] <= row`` (``cu[N]`` past every row)."""
    lo = tl.zeros(rows.shape, dtype=tl.int64)
    hi = tl.zeros(rows.shape, dtype=tl.int64) + N
    for _ in tl.static_range(LOGN):
        mid = (lo + hi) // 2
        go = tl.load(cu + mid).to(tl.int64) <= rows
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    return lo


@triton.jit
def _seq_of(cu, lengths, i_n, L, MODE: tl.constexpr):
    """Sequence ``i_n``'s ``(first row, rows, tail position)``."""
    if MODE == 2:
        start = tl.load(cu + i_n).to(tl.int64)
        ln = tl.load(cu + i_n + 1).to(tl.int64) - start
        return start, ln, ln
    elif MODE == 1:
        return i_n * 0, L + i_n * 0, tl.load(lengths + i_n).to(tl.int64)
    else:
        return i_n * 0, L + i_n * 0, L + i_n * 0


@triton.jit
def _block(cu, lengths, blk, row0, R: tl.constexpr, N, NT, L, C, sxn, sxl, W: tl.constexpr, MODE: tl.constexpr,
           LOGN: tl.constexpr):
    """Rows ``row0 .. row0 + R`` of row block ``blk`` as ``(xb, hb, yb, p, ln, lt)``: each row's sequence offsets in
    x (``xb``), in the tail rows ``[N, W - 1, C]`` (``hb``) and in a dense ``[rows, C]`` output (``yb``); its position
    ``p`` in its sequence, the sequence's rows ``ln`` and tail position ``lt``. Packed: ``row0`` counts from the
    start of x; else block ``blk`` of ``NT`` per sequence, ``row0`` within the sequence."""
    if MODE == 2:
        rows = row0 + tl.arange(0, R).to(tl.int64)
        n = _find_seq(cu, tl.minimum(rows, L - 1), N, LOGN)
        start = tl.load(cu + n).to(tl.int64)
        # rows past the last sequence's end get no rows (every mask is off)
        ln = tl.where(rows < L, tl.load(cu + n + 1).to(tl.int64) - start, 0)
        return start * sxl, n * (W - 1) * C, start * C, rows - start, ln, ln
    else:
        i_n = (blk // NT).to(tl.int64)
        start, ln, lt = _seq_of(cu, lengths, i_n, L, MODE)
        p = row0 + tl.arange(0, R).to(tl.int64)
        return i_n * sxn, i_n * (W - 1) * C, i_n * L * C, p, ln, lt


@triton.jit
def _load_xp(x, halo, xb, hb, p, ln, sxl, o_c, C, W: tl.constexpr, HAS_TAIL: tl.constexpr):
    """``xp`` at positions ``p`` (``[R]``, each in its own row's sequence) for channels ``o_c``, fp32
    ``[R, len(o_c)]``, zeros where a position holds nothing (past the sequence, before the tail, past ``C``)."""
    ok = (p >= 0) & (p < ln)
    # positions that hold nothing still form addresses: clamp them into the tensors
    ptr = x + xb + tl.minimum(tl.maximum(p, 0), tl.maximum(ln - 1, 0)) * sxl
    if HAS_TAIL:
        in_t = (p < 0) & (p >= 1 - W)
        ptr = tl.where(ok, ptr, halo + hb + tl.minimum(tl.maximum(p + W - 1, 0), W - 2) * C)
        ok = ok | in_t
    return tl.load(ptr[:, None] + o_c[None, :], mask=ok[:, None] & (o_c < C)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _pre_activation(x, halo, weight, xb, hb, p, ln, sxl, o_c, C, W: tl.constexpr, HAS_TAIL: tl.constexpr):
    """``z`` at positions ``p`` (fp32 ``[R, len(o_c)]``)."""
    m_c = o_c < C
    z = tl.zeros([p.shape[0], o_c.shape[0]], dtype=tl.float32)
    for j in tl.static_range(W):
        w_j = tl.load(weight + o_c * W + j, mask=m_c, other=0.0).to(tl.float32)
        z += w_j[None, :] * _load_xp(x, halo, xb, hb, p - (W - 1) + j, ln, sxl, o_c, C, W, HAS_TAIL)
    return z


@triton.jit
def _conv_fwd_kernel(
    x, halo, weight, y, new_tail, cu, lengths, N, L, C, NT, NBLK, sxn, sxl,
    W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BW: tl.constexpr, HAS_TAIL: tl.constexpr,
    SILU: tl.constexpr, MODE: tl.constexpr, LOGN: tl.constexpr,
):
    i_p = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    if i_p < NBLK:
        if MODE == 2:
            row0 = i_p * BT
        else:
            row0 = (i_p % NT) * BT
        xb, hb, yb, p, ln, lt = _block(cu, lengths, i_p, row0, BT, N, NT, L, C, sxn, sxl, W, MODE, LOGN)
        z = _pre_activation(x, halo, weight, xb, hb, p, ln, sxl, o_c, C, W, HAS_TAIL)
        if SILU:
            z = z * tl.sigmoid(z)
        ok = (p >= 0) & (p < ln)
        ptr = y + yb + tl.minimum(tl.maximum(p, 0), tl.maximum(ln - 1, 0)) * C
        tl.store(ptr[:, None] + o_c[None, :], z.to(y.dtype.element_ty), mask=ok[:, None] & m_c[None, :])
    elif W > 1:
        # the new tail of sequence i_n: the last W - 1 rows of xp before lt (reaching into the old tail when short).
        # Its names differ from the block branch's: the compiler requires a name bound in both branches of a
        # runtime `if` to have one type, and there they are tiles ([BT]) where here they are scalars or [BW, BC].
        i_n = i_p - NBLK
        start_n, ln_n, lt_n = _seq_of(cu, lengths, i_n, L, MODE)
        xb_n = i_n * sxn
        if MODE == 2:
            xb_n = start_n * sxl
        o_w = tl.arange(0, BW)
        v = _load_xp(x, halo, xb_n, i_n * (W - 1) * C, lt_n - (W - 1) + o_w, ln_n, sxl, o_c, C, W, HAS_TAIL)
        tail_ptr = new_tail + (i_n * C + o_c.to(tl.int64))[None, :] * (W - 1) + o_w[:, None]
        tl.store(tail_ptr, v.to(new_tail.dtype.element_ty), mask=(o_w < W - 1)[:, None] & m_c[None, :])


@triton.jit
def _grad_pre_activation(x, halo, weight, dy, xb, hb, yb, p, ln, sxl, o_c, C, W: tl.constexpr,
                         HAS_TAIL: tl.constexpr, SILU: tl.constexpr):
    """``dz`` at positions ``p``: ``dy * silu'(z)`` (or ``dy``), zeros outside ``0 <= p < ln``."""
    ok = (p >= 0) & (p < ln)
    ptr = dy + yb + tl.minimum(tl.maximum(p, 0), tl.maximum(ln - 1, 0)) * C
    g = tl.load(ptr[:, None] + o_c[None, :], mask=ok[:, None] & (o_c < C)[None, :], other=0.0).to(tl.float32)
    if SILU:
        z = _pre_activation(x, halo, weight, xb, hb, p, ln, sxl, o_c, C, W, HAS_TAIL)
        s = tl.sigmoid(z)
        g = g * s * (1.0 + z * (1.0 - s))
    return g


@triton.jit
def _grad_xp(x, halo, weight, dy, dnt, dz0, xb, hb, yb, p, ln, lt, sxl, o_c, C, W: tl.constexpr,
             HAS_TAIL: tl.constexpr, HAS_DNT: tl.constexpr, SILU: tl.constexpr):
    """Gradient of ``xp`` at positions ``p``, given ``dz0`` = ``dz`` at the same positions."""
    m_c = o_c < C
    acc = tl.load(weight + o_c * W + (W - 1), mask=m_c, other=0.0).to(tl.float32)[None, :] * dz0
    for s in tl.static_range(1, W):
        w_j = tl.load(weight + o_c * W + (W - 1 - s), mask=m_c, other=0.0).to(tl.float32)
        acc += w_j[None, :] * _grad_pre_activation(x, halo, weight, dy, xb, hb, yb, p + s, ln, sxl, o_c, C, W,
                                                   HAS_TAIL, SILU)
    if HAS_DNT:
        # positions lt - W + 1 .. lt - 1 were returned as the new tail (dnt holds them as rows [N, W - 1, C])
        i = p - (lt - (W - 1))
        ok = (i >= 0) & (i < W - 1)
        ptr = dnt + hb + tl.minimum(tl.maximum(i, 0), W - 2) * C
        acc += tl.load(ptr[:, None] + o_c[None, :], mask=ok[:, None] & m_c[None, :], other=0.0).to(tl.float32)
    return acc


@triton.jit
def _conv_bwd_kernel(
    x, halo, weight, dy, dnt, dx, dw_part, dtail, cu, lengths, N, L, C, NS, NSPAN, sxn, sxl,
    W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BW: tl.constexpr, NSUB: tl.constexpr,
    HAS_TAIL: tl.constexpr, HAS_DNT: tl.constexpr, SILU: tl.constexpr, STORE_DX: tl.constexpr,
    STORE_DTAIL: tl.constexpr, MODE: tl.constexpr, LOGN: tl.constexpr,
):
    i_p = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    o_w = tl.arange(0, BW)
    if i_p < NSPAN:
        dw = tl.zeros([BW, BC], dtype=tl.float32)
        span = i_p % NS
        if MODE == 2:
            span = i_p
        for k in range(NSUB):
            row0 = (span * NSUB + k) * BT
            xb, hb, yb, p, ln, lt = _block(cu, lengths, i_p, row0, BT, N, NS, L, C, sxn, sxl, W, MODE, LOGN)
            dz0 = _grad_pre_activation(x, halo, weight, dy, xb, hb, yb, p, ln, sxl, o_c, C, W, HAS_TAIL, SILU)
            for j in tl.static_range(W):
                xs = _load_xp(x, halo, xb, hb, p - (W - 1) + j, ln, sxl, o_c, C, W, HAS_TAIL)
                dw += tl.where(o_w[:, None] == j, tl.sum(dz0 * xs, axis=0)[None, :], 0.0)
            if STORE_DX:
                g = _grad_xp(x, halo, weight, dy, dnt, dz0, xb, hb, yb, p, ln, lt, sxl, o_c, C, W, HAS_TAIL,
                             HAS_DNT, SILU)
                ok = (p >= 0) & (p < ln)
                ptr = dx + yb + tl.minimum(tl.maximum(p, 0), tl.maximum(ln - 1, 0)) * C
                tl.store(ptr[:, None] + o_c[None, :], g.to(dx.dtype.element_ty), mask=ok[:, None] & m_c[None, :])
        tl.store(dw_part + (i_p * W + o_w[:, None]) * C + o_c[None, :], dw, mask=(o_w < W)[:, None] & m_c[None, :])
    elif STORE_DTAIL:
        # the tail rows -(W - 1) .. -1 of sequence i_n: no dz of their own, only what they fed into its first
        # outputs (and, for a sequence shorter than W - 1, what they passed on into the new tail)
        i_n = i_p - NSPAN
        start, ln, lt = _seq_of(cu, lengths, i_n, L, MODE)
        xb, yb = i_n * sxn, i_n * L * C
        if MODE == 2:
            xb, yb = start * sxl, start * C
        zero = tl.zeros([BW, BC], dtype=tl.float32)
        g = _grad_xp(x, halo, weight, dy, dnt, zero, xb, i_n * (W - 1) * C, yb, o_w.to(tl.int64) + 1 - W, ln, lt,
                     sxl, o_c, C, W, HAS_TAIL, HAS_DNT, SILU)
        ptr = dtail + (i_n * C + o_c.to(tl.int64))[None, :] * (W - 1) + o_w[:, None]
        tl.store(ptr, g.to(dtail.dtype.element_ty), mask=(o_w < W - 1)[:, None] & m_c[None, :])


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


def _rows_in_place(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its channels are contiguous (rows may have any stride), else a dense copy."""
    return x if x.stride(2) == 1 else x.contiguous()


def _layout(x, lengths, cu_seqlens):
    """``(MODE, N sequences, rows per sequence or in all, LOGN, cu or x, lengths or x)`` for the launches."""
    if cu_seqlens is not None:
        N = cu_seqlens.numel() - 1
        return PACKED, N, x.shape[1], max(1, int(N).bit_length()), cu_seqlens, x
    if lengths is not None:
        return LENGTHS, x.shape[0], x.shape[1], 1, x, lengths
    return DENSE, x.shape[0], x.shape[1], 1, x, x


def conv_fwd(
    x: torch.Tensor, weight: torch.Tensor, tail: torch.Tensor | None, silu: bool = True,
    block_t: int | None = None, block_c: int | None = None, out: torch.Tensor | None = None,
    out_tail: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward on validated inputs: ``x`` ``[N, L, C]`` (``L >= 1``; channel-contiguous rows of any
    stride are read in place), ``weight`` ``[C, W]`` (``1 <= W <= 8``), ``tail`` ``[N, C, W - 1]`` or None (zeros).
    ``lengths`` ``[N]`` takes each row's new tail after its first ``lengths[n]`` rows; ``cu_seqlens`` ``[N + 1]``
    makes ``x`` ``[1, total, C]`` hold N packed sequences (``tail`` then per sequence).

    Returns ``(y [N or 1, L, C], new_tail [N, C, W - 1])`` in ``x``'s dtype, ``y = silu(z)`` (``z`` when ``silu``
    is false), accumulated in fp32. ``block_t`` / ``block_c`` override the tiling (powers of two); ``out`` /
    ``out_tail`` may supply the output buffers (tests poison them with NaN).
    """
    L, C = x.shape[1], x.shape[2]
    W = weight.shape[1]
    x, weight = _rows_in_place(x), weight.contiguous()
    mode, N, _, logn, cu, lens = _layout(x, lengths, cu_seqlens)
    halo = _rows_of(tail, x.dtype, W)
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype) if out is None else out
    new_tail = x.new_empty(N, C, W - 1) if out_tail is None else out_tail
    bt, bc = block_t or FWD_BT, _blocks(C, block_c)
    # short inputs (a streaming step has L = 1) need no 64-row tile
    bt = min(bt, max(16, triton.next_power_of_2(L)))
    NT = triton.cdiv(L, bt)
    nblk = NT if mode == PACKED else N * NT
    _conv_fwd_kernel[(nblk + N, triton.cdiv(C, bc))](
        x, x if halo is None else halo, weight, y, new_tail, cu, lens, N, L, C, NT, nblk, x.stride(0), x.stride(1),
        W=W, BT=bt, BC=bc, BW=triton.next_power_of_2(max(W - 1, 1)), HAS_TAIL=halo is not None, SILU=silu,
        MODE=mode, LOGN=logn, num_warps=FWD_WARPS if bt * bc >= 8192 else 4,
    )
    return y, new_tail


def conv_bwd(
    x: torch.Tensor, weight: torch.Tensor, tail: torch.Tensor | None, dy: torch.Tensor,
    dnew_tail: torch.Tensor | None, silu: bool = True, need_dx: bool = True, need_dtail: bool = False,
    block_t: int | None = None, block_c: int | None = None, span_blocks: int | None = None,
    out_dx: torch.Tensor | None = None, out_dtail: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Launch the backward: ``(dx [N or 1, L, C] or None, dweight [C, W] fp32, dtail [N, C, W - 1] or None)``.

    ``dy`` is the gradient of ``y``, ``dnew_tail`` ``[N, C, W - 1]`` (or None) that of the new tail; ``x``,
    ``weight``, ``tail``, ``silu``, ``lengths`` and ``cu_seqlens`` as given to :func:`conv_fwd`. ``dx`` comes dense
    in ``x``'s dtype, ``dtail`` in ``tail``'s (fp32 without a tail). ``span_blocks`` is how many ``block_t`` blocks
    one program walks; ``out_dx`` / ``out_dtail`` may supply the output buffers.
    """
    L, C = x.shape[1], x.shape[2]
    W = weight.shape[1]
    x, weight, dy = _rows_in_place(x), weight.contiguous(), dy.contiguous()
    mode, N, _, logn, cu, lens = _layout(x, lengths, cu_seqlens)
    tail_dtype = torch.float32 if tail is None else tail.dtype
    halo, dnt_rows = _rows_of(tail, x.dtype, W), _rows_of(dnew_tail, None, W)
    bt, bc = block_t or _bwd_block_t(W), _blocks(C, block_c)
    bt = min(bt, max(8, triton.next_power_of_2(L)))
    nsub = span_blocks or min(BWD_NSUB, triton.cdiv(L, bt))
    NS = triton.cdiv(L, bt * nsub)
    nspan = NS if mode == PACKED else N * NS
    dx = (torch.empty(x.shape, device=x.device, dtype=x.dtype) if out_dx is None else out_dx) if need_dx else None
    dtail = None
    if need_dtail:
        dtail = torch.empty(N, C, W - 1, dtype=tail_dtype, device=x.device) if out_dtail is None else out_dtail
    dw_part = torch.empty(nspan, W, C, dtype=torch.float32, device=x.device)
    store_dtail = need_dtail and W > 1
    _conv_bwd_kernel[(nspan + (N if store_dtail else 0), triton.cdiv(C, bc))](
        x, x if halo is None else halo, weight, dy, dy if dnt_rows is None else dnt_rows,
        dy if dx is None else dx, dw_part, dy if dtail is None else dtail, cu, lens, N, L, C, NS, nspan,
        x.stride(0), x.stride(1),
        W=W, BT=bt, BC=bc, BW=triton.next_power_of_2(W), NSUB=nsub, HAS_TAIL=halo is not None,
        HAS_DNT=dnt_rows is not None, SILU=silu, STORE_DX=need_dx, STORE_DTAIL=store_dtail, MODE=mode, LOGN=logn,
        num_warps=BWD_WARPS,
    )
    # the per-program partial sums, added in a fixed order
    return dx, dw_part.sum(0).t(), dtail
