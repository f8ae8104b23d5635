"""Triton kernels for the chunked GDN-2 forward (prefill and inference), fixed-length or chunk-aligned packed batches.

Launches over chunks of 64 tokens (notation of ``docs/gdn2.md``):

1. ``_cumsum_kernel``: ``G`` = in-chunk cumulative log-decay, fp32.
2. ``_gram_kernel``, one program per (16-row block, chunk, value head): the decayed Grams ``T`` (erase) and
   ``A_qk`` (read-out). Blocks left of the diagonal take the decay about the last position of their column block, a
   diagonal block about its mid-point, so no factor overflows (a diagonal block whose decay spreads too far for
   that is left to the inverse launch, which forms it pairwise). It also writes the decayed erase keys
   ``E = exp(G) b k`` and, for the sequential pass, the decayed queries and tail keys.
3. ``_inverse_kernel``: the far-spread diagonal blocks, then ``L^-1 = (I + T)^-1`` by blocked forward
   substitution.
4. ``_wy_kernel`` (training, and when asked for): ``Y = L^-1 E`` and ``U = L^-1 (w v)``, in programs of their
   own.
5. ``_state_kernel``, one program per (sequence, value head, value block): the sequential state passing
   ``R = U - Y S`` (or, for 16-bit inference, without the WY launch, ``R = L^-1 (w v - E S)``),
   ``O = (exp(G) q) S + A_qk R``, ``S <- exp(G_C) S + (exp(G_C - G) k)^T R``; for 16-bit inference its products
   run on 16-bit operands (fp32 accumulation and state).

Plain pointer arithmetic with masks, int64 offsets, no ``tl.make_block_ptr``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import G_row, G_tile, block, chunk_range, put, put_block, row_f32, tile, tile_f32

__all__ = ["chunk_fwd"]

BT = 64  # chunk
BC = 16  # sub-block of the in-chunk products
SAFE_SPREAD = 40.0  # largest in-block decay spread for the one-product form of a diagonal block


@triton.jit
def _cumsum_kernel(g, G, T, HG: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    i_t, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // HG, i_bh % HG
    rows = i_t * BT + tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m = (rows < T)[:, None] & (o_k < K)[None, :]
    offs = ((i_b * T + rows.to(tl.int64)) * HG + i_h)[:, None] * K + o_k[None, :]
    x = tl.load(g + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(G + offs, tl.cumsum(x, axis=0), mask=m)


@triton.jit
def _gram_diag(
    q, k, G, b, Akk, Aqk, QG, KT, E, scale, T, i_b, i_hv, t0, i,
    H: tl.constexpr, HV: tl.constexpr, HG: tl.constexpr, HB: tl.constexpr, K: tl.constexpr,
    BK: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, PRECISION: tl.constexpr, SAFE_SPREAD: tl.constexpr,
    DECAYED_QK: tl.constexpr,
):
    """Row block ``i`` of one (chunk, value head): loads its rows, writes their decayed erase keys ``E`` (and with
    ``DECAYED_QK`` the decayed queries and tail keys) and the diagonal blocks of both Grams. Returns what the blocks
    left of the diagonal need: the rows' ``G``, scaled ``q`` and ``b k``, and the rows as a column block, keys
    decayed to the block's last row, with that row's ``G``."""
    i_h, i_hg, i_hb = i_hv // (HV // H), i_hv // (HV // HG), i_hv // (HV // HB)
    r0 = t0 + i * BC
    o_c = tl.arange(0, BC)
    Gi = G_tile(G, i_b, r0, T, HG, i_hg, K, 0, BC, BK)
    ki = tile_f32(k, i_b, r0, T, H, i_h, K, 0, BC, BK)
    qi = tile_f32(q, i_b, r0, T, H, i_h, K, 0, BC, BK) * scale
    bki = tile_f32(b, i_b, r0, T, HB, i_hb, K, 0, BC, BK) * ki
    put(E, (tl.exp(Gi) * bki).to(E.dtype.element_ty), i_b, r0, T, HV, i_hv, K, 0, BC, BK)
    if DECAYED_QK:
        # the last row of the chunk (or of the sequence) holds the chunk's total decay
        G_last = G_row(G, i_b, t0 + BT - 1, T, HG, i_hg, K, 0, BK)
        put(QG, (qi * tl.exp(Gi)).to(QG.dtype.element_ty), i_b, r0, T, HV, i_hv, K, 0, BC, BK)
        put(KT, (ki * tl.exp(G_last[None, :] - Gi)).to(KT.dtype.element_ty), i_b, r0, T, HV, i_hv, K, 0, BC,
                    BK)
    # diagonal block: one matrix product about the block's mid-point decay (every factor <= exp(spread / 2)). A
    # block whose decay spreads further is left to the inverse launch, which forms it pairwise (_diag_fixup).
    G_top = G_row(G, i_b, r0, T, HG, i_hg, K, 0, BK)
    G_bot = G_row(G, i_b, r0 + BC - 1, T, HG, i_hg, K, 0, BK)
    safe = tl.max(tl.abs(G_top - G_bot), axis=0) < SAFE_SPREAD
    mid = tl.where(safe, 0.5 * (G_top + G_bot), 0.0)
    Gs = tl.where(safe, Gi, 0.0)
    up = tl.exp(Gs - mid[None, :])
    kd = ki * tl.exp(mid[None, :] - Gs)
    Td = tl.where(o_c[:, None] > o_c[None, :], tl.dot(bki * up, tl.trans(kd), input_precision=PRECISION), 0.0)
    Qd = tl.where(o_c[:, None] >= o_c[None, :], tl.dot(qi * up, tl.trans(kd), input_precision=PRECISION), 0.0)
    put_block(Akk, Td, i_b, r0, i * BC, T, HV, i_hv, BT, BC)
    put_block(Aqk, Qd, i_b, r0, i * BC, T, HV, i_hv, BT, BC)
    return Gi, qi, bki, ki * tl.exp(G_bot[None, :] - Gi), G_bot


@triton.jit
def _gram_left(Akk, Aqk, Gi, qi, bki, kj, ref, T, i_b, i_hv, r0, c0, HV: tl.constexpr, BT: tl.constexpr,
               BC: tl.constexpr, PRECISION: tl.constexpr):
    """A block left of the diagonal (rows ``r0 ..``, in-chunk columns ``c0 ..``): decay about the last row ``ref``
    of the column block, whose keys ``kj`` are decayed to that row."""
    into = tl.exp(Gi - ref[None, :])
    put_block(Akk, tl.dot(bki * into, tl.trans(kj), input_precision=PRECISION), i_b, r0, c0, T, HV, i_hv, BT, BC)
    put_block(Aqk, tl.dot(qi * into, tl.trans(kj), input_precision=PRECISION), i_b, r0, c0, T, HV, i_hv, BT, BC)


@triton.jit
def _gram_kernel(
    q, k, G, b, Akk, Aqk, QG, KT, E, scale, T,
    H: tl.constexpr, HV: tl.constexpr, HG: tl.constexpr, HB: tl.constexpr, K: tl.constexpr,
    BK: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, PRECISION: tl.constexpr, SAFE_SPREAD: tl.constexpr,
    DECAYED_QK: tl.constexpr,
):
    """Row block i of the decayed Grams of one (chunk, value head): erase ``T`` (strictly lower) into ``Akk``,
    read-out ``A_qk`` (lower) into ``Aqk``, zeros above the diagonal in ``Aqk``. With ``DECAYED_QK`` it also writes
    the block's decayed read-out queries ``scale * exp(G) q`` and tail keys ``exp(G_C - G) k`` (from the rows it
    has loaded anyway), which the sequential passes then load instead of q, k and G. Every program also writes its
    rows of the decayed erase keys ``E = exp(G) b k`` for the WY launch (16-bit for 16-bit inputs: ``|E| <= |k|``,
    and the tf32 product that reads them keeps 10 mantissa bits, as fp16 does)."""
    i_tc, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_t, i = i_tc // (BT // BC), i_tc % (BT // BC)
    i_b, i_hv = i_bh // HV, i_bh % HV
    i_h, i_hg = i_hv // (HV // H), i_hv // (HV // HG)
    t0 = i_t * BT
    r0 = t0 + i * BC
    Gi, qi, bki, _, _ = _gram_diag(q, k, G, b, Akk, Aqk, QG, KT, E, scale, T, i_b, i_hv, t0, i, H, HV, HG, HB, K,
                                   BK, BT, BC, PRECISION, SAFE_SPREAD, DECAYED_QK)
    # blocks left of the diagonal: decay about the last row of the column block
    for j in range(0, i):
        rj = t0 + j * BC
        ref = G_row(G, i_b, rj + BC - 1, T, HG, i_hg, K, 0, BK)
        kj = tile_f32(k, i_b, rj, T, H, i_h, K, 0, BC, BK) * tl.exp(ref[None, :] - G_tile(G, i_b, rj, T, HG,
                                                                                             i_hg, K, 0, BC, BK))
        _gram_left(Akk, Aqk, Gi, qi, bki, kj, ref, T, i_b, i_hv, r0, j * BC, HV, BT, BC, PRECISION)
    # above the diagonal: zeros in A_qk, which the sequential passes read whole (the inverse never reads the
    # erase Gram's upper blocks)
    for j in range(i + 1, BT // BC):
        put_block(Aqk, tl.zeros([BC, BC], tl.float32), i_b, r0, j * BC, T, HV, i_hv, BT, BC)


@triton.jit
def _diag_fixup(
    q, k, G, b, Akk, Aqk, scale, T, i_b, i_hv, r0, c0,
    H: tl.constexpr, HV: tl.constexpr, HG: tl.constexpr, HB: tl.constexpr, K: tl.constexpr,
    BK: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, SAFE_SPREAD: tl.constexpr,
):
    """A diagonal block (rows ``r0 ..``, in-chunk columns ``c0 ..``) whose decay spreads too far for the Gram
    launch's one-product form: formed pairwise, column by column, every exponent <= 0. Most blocks only read two
    rows of G and return."""
    i_h, i_hg, i_hb = i_hv // (HV // H), i_hv // (HV // HG), i_hv // (HV // HB)
    G_top = G_row(G, i_b, r0, T, HG, i_hg, K, 0, BK)
    G_bot = G_row(G, i_b, r0 + BC - 1, T, HG, i_hg, K, 0, BK)
    if tl.max(tl.abs(G_top - G_bot), axis=0) >= SAFE_SPREAD:
        o_c = tl.arange(0, BC)
        Gi = G_tile(G, i_b, r0, T, HG, i_hg, K, 0, BC, BK)
        ki = tile_f32(k, i_b, r0, T, H, i_h, K, 0, BC, BK)
        qi = tile_f32(q, i_b, r0, T, H, i_h, K, 0, BC, BK) * scale
        bki = tile_f32(b, i_b, r0, T, HB, i_hb, K, 0, BC, BK) * ki
        Td = tl.zeros([BC, BC], tl.float32)
        Qd = tl.zeros([BC, BC], tl.float32)
        for c in range(BC):
            kc = row_f32(k, i_b, r0 + c, T, H, i_h, K, BK)
            Gc = G_row(G, i_b, r0 + c, T, HG, i_hg, K, 0, BK)
            d = tl.exp(tl.where((o_c >= c)[:, None], Gi - Gc[None, :], float("-inf")))
            kd = kc[None, :] * d
            col_t = tl.where(o_c > c, tl.sum(bki * kd, axis=1), 0.0)
            col_q = tl.sum(qi * kd, axis=1)
            Td = tl.where(o_c[None, :] == c, col_t[:, None], Td)
            Qd = tl.where(o_c[None, :] == c, col_q[:, None], Qd)
        put_block(Akk, Td, i_b, r0, c0, T, HV, i_hv, BT, BC)
        put_block(Aqk, Qd, i_b, r0, c0, T, HV, i_hv, BT, BC)


@triton.jit
def _inverse_kernel(
    q, k, G, b, Akk, Aqk, Linv, scale, T,
    H: tl.constexpr, HV: tl.constexpr, HG: tl.constexpr, HB: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, SAFE_SPREAD: tl.constexpr, ROWS_FROM_MEMORY: tl.constexpr,
):
    """L^-1 for L = I + T of one (chunk, value head): the unit lower diagonal blocks by forward substitution,
    then the blocks below them. ``ROWS_FROM_MEMORY`` loads each substitution row from the (cached) Gram instead of
    extracting it from registers, one cross-thread reduction per row instead of two. First, the few diagonal blocks
    whose decay spreads too far for the Gram launch are formed here (``_diag_fixup``). ``Akk`` may be 16-bit; the
    substitution runs in fp32."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_hv = i_bh // HV, i_bh % HV
    t0 = i_t * BT
    for c in tl.static_range(0, BT // BC):
        _diag_fixup(q, k, G, b, Akk, Aqk, scale, T, i_b, i_hv, t0 + c * BC, c * BC, H, HV, HG, HB, K, BK, BT, BC,
                    SAFE_SPREAD)
    tl.debug_barrier()  # the fixed blocks' stores are read back below by other threads of this program
    if ROWS_FROM_MEMORY:
        I00, I11, I22, I33 = _unit_lower_inverse4_rows(Akk, i_b, t0, T, HV, i_hv, BT, BC)
    else:
        I00, I11, I22, I33 = _unit_lower_inverse4(
            block(Akk, i_b, t0, 0, T, HV, i_hv, BT, BC), block(Akk, i_b, t0 + BC, BC, T, HV, i_hv, BT, BC),
            block(Akk, i_b, t0 + 2 * BC, 2 * BC, T, HV, i_hv, BT, BC),
            block(Akk, i_b, t0 + 3 * BC, 3 * BC, T, HV, i_hv, BT, BC), BC)
    T10 = block(Akk, i_b, t0 + BC, 0, T, HV, i_hv, BT, BC)
    T20 = block(Akk, i_b, t0 + 2 * BC, 0, T, HV, i_hv, BT, BC)
    T21 = block(Akk, i_b, t0 + 2 * BC, BC, T, HV, i_hv, BT, BC)
    T30 = block(Akk, i_b, t0 + 3 * BC, 0, T, HV, i_hv, BT, BC)
    T31 = block(Akk, i_b, t0 + 3 * BC, BC, T, HV, i_hv, BT, BC)
    T32 = block(Akk, i_b, t0 + 3 * BC, 2 * BC, T, HV, i_hv, BT, BC)
    I10 = -_dot(I11, _dot(T10, I00))
    I21 = -_dot(I22, _dot(T21, I11))
    I20 = -_dot(I22, _dot(T20, I00) + _dot(T21, I10))
    I32 = -_dot(I33, _dot(T32, I22))
    I31 = -_dot(I33, _dot(T31, I11) + _dot(T32, I21))
    I30 = -_dot(I33, _dot(T30, I00) + _dot(T31, I10) + _dot(T32, I20))
    zero = tl.zeros([BC, BC], tl.float32)
    put_block(Linv, I00, i_b, t0, 0, T, HV, i_hv, BT, BC)
    put_block(Linv, zero, i_b, t0, BC, T, HV, i_hv, BT, BC)
    put_block(Linv, zero, i_b, t0, 2 * BC, T, HV, i_hv, BT, BC)
    put_block(Linv, zero, i_b, t0, 3 * BC, T, HV, i_hv, BT, BC)
    put_block(Linv, I10, i_b, t0 + BC, 0, T, HV, i_hv, BT, BC)
    put_block(Linv, I11, i_b, t0 + BC, BC, T, HV, i_hv, BT, BC)
    put_block(Linv, zero, i_b, t0 + BC, 2 * BC, T, HV, i_hv, BT, BC)
    put_block(Linv, zero, i_b, t0 + BC, 3 * BC, T, HV, i_hv, BT, BC)
    put_block(Linv, I20, i_b, t0 + 2 * BC, 0, T, HV, i_hv, BT, BC)
    put_block(Linv, I21, i_b, t0 + 2 * BC, BC, T, HV, i_hv, BT, BC)
    put_block(Linv, I22, i_b, t0 + 2 * BC, 2 * BC, T, HV, i_hv, BT, BC)
    put_block(Linv, zero, i_b, t0 + 2 * BC, 3 * BC, T, HV, i_hv, BT, BC)
    put_block(Linv, I30, i_b, t0 + 3 * BC, 0, T, HV, i_hv, BT, BC)
    put_block(Linv, I31, i_b, t0 + 3 * BC, BC, T, HV, i_hv, BT, BC)
    put_block(Linv, I32, i_b, t0 + 3 * BC, 2 * BC, T, HV, i_hv, BT, BC)
    put_block(Linv, I33, i_b, t0 + 3 * BC, 3 * BC, T, HV, i_hv, BT, BC)


@triton.jit
def _dot(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _unit_lower_inverse4(A0, A1, A2, A3, BC: tl.constexpr):
    """(I + A)^-1 of four strictly lower ``A`` [BC, BC] at once (independent chains, interleaved), row by row:
    X_r = e_r - sum_{c<r} A[r, c] X_c."""
    o = tl.arange(0, BC)
    eye = tl.where(o[:, None] == o[None, :], 1.0, 0.0)
    X0, X1, X2, X3 = eye, eye, eye, eye
    for r in range(1, BC):
        here = o[:, None] == r
        X0 = tl.where(here, X0 - tl.sum(tl.sum(tl.where(here, A0, 0.0), axis=0)[:, None] * X0, axis=0)[None, :], X0)
        X1 = tl.where(here, X1 - tl.sum(tl.sum(tl.where(here, A1, 0.0), axis=0)[:, None] * X1, axis=0)[None, :], X1)
        X2 = tl.where(here, X2 - tl.sum(tl.sum(tl.where(here, A2, 0.0), axis=0)[:, None] * X2, axis=0)[None, :], X2)
        X3 = tl.where(here, X3 - tl.sum(tl.sum(tl.where(here, A3, 0.0), axis=0)[:, None] * X3, axis=0)[None, :], X3)
    return X0, X1, X2, X3


@triton.jit
def _gram_row(Akk, i_b, row, c0, r, T, heads, i_h, BT: tl.constexpr, BC: tl.constexpr):
    """Strictly-lower part (columns < r) of row ``row`` of a diagonal block starting at in-chunk column ``c0``."""
    o = tl.arange(0, BC)
    a = tl.load(Akk + ((i_b * T + row.to(tl.int64)) * heads + i_h) * BT + c0 + o, mask=(o < r) & (row < T),
                other=0.0)
    return a.to(tl.float32)


@triton.jit
def _unit_lower_inverse4_rows(Akk, i_b, t0, T, heads, i_h, BT: tl.constexpr, BC: tl.constexpr):
    """The four diagonal blocks' (I + A)^-1 as :func:`_unit_lower_inverse4`, reading row r of each A from memory:
    X_r = e_r - sum_{c<r} A[r, c] X_c is one reduction over the rows of X."""
    o = tl.arange(0, BC)
    eye = tl.where(o[:, None] == o[None, :], 1.0, 0.0)
    X0, X1, X2, X3 = eye, eye, eye, eye
    for r in range(1, BC):
        here = o[:, None] == r
        a0 = _gram_row(Akk, i_b, t0 + r, 0, r, T, heads, i_h, BT, BC)
        a1 = _gram_row(Akk, i_b, t0 + BC + r, BC, r, T, heads, i_h, BT, BC)
        a2 = _gram_row(Akk, i_b, t0 + 2 * BC + r, 2 * BC, r, T, heads, i_h, BT, BC)
        a3 = _gram_row(Akk, i_b, t0 + 3 * BC + r, 3 * BC, r, T, heads, i_h, BT, BC)
        X0 = tl.where(here, X0 - tl.sum(a0[:, None] * X0, axis=0)[None, :], X0)
        X1 = tl.where(here, X1 - tl.sum(a1[:, None] * X1, axis=0)[None, :], X1)
        X2 = tl.where(here, X2 - tl.sum(a2[:, None] * X2, axis=0)[None, :], X2)
        X3 = tl.where(here, X3 - tl.sum(a3[:, None] * X3, axis=0)[None, :], X3)
    return X0, X1, X2, X3


@triton.jit
def _wy_kernel(
    E, v, w, Linv, Y, U, T,
    HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One (chunk, value head) has ``1 + cdiv(V, BV)`` programs: the first forms ``Y = L^-1 E`` from the decayed
    erase keys ``E = exp(G) b k`` of the Gram launch, each other a value block of ``U = L^-1 (w v)`` (at
    K = V = BV the two halves are the same size of product)."""
    i_t, i_bh, i_v = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    i_b, i_hv = i_bh // HV, i_bh % HV
    t0 = i_t * BT
    L = tile_f32(Linv, i_b, t0, T, HV, i_hv, BT, 0, BT, BT)
    if i_v == 0:
        Et = tile_f32(E, i_b, t0, T, HV, i_hv, K, 0, BT, BK)
        put(Y, tl.dot(L, Et, input_precision=PRECISION).to(Y.dtype.element_ty), i_b, t0, T, HV, i_hv, K, 0,
                    BT, BK)
    else:
        rows = t0 + tl.arange(0, BT)
        o_v = (i_v - 1) * BV + tl.arange(0, BV)
        m = (rows < T)[:, None] & (o_v < V)[None, :]
        offs = ((i_b * T + rows.to(tl.int64)) * HV + i_hv)[:, None] * V + o_v[None, :]
        Z = tl.load(v + offs, mask=m, other=0.0).to(tl.float32) * tl.load(w + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(U + offs, tl.dot(L, Z, input_precision=PRECISION).to(U.dtype.element_ty), mask=m)


@triton.jit
def _state_kernel(
    q, k, G, Y, U, Aqk, o, h0, ht, h, Rs, QG, KT, E, v, w, Linv, chunk_lo, chunk_hi, scale, T,
    H: tl.constexpr, HV: tl.constexpr, HG: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
    SAVE: tl.constexpr, PRECISION: tl.constexpr, DECAYED_QK: tl.constexpr, VARLEN: tl.constexpr,
    LOWP: tl.constexpr, FUSED_WY: tl.constexpr, LINV_16: tl.constexpr,
):
    """With ``SAVE`` it also keeps, for the backward, each chunk's entry state in ``h`` ``[B, NT, HV, K, V]`` and
    the corrections ``R`` in ``Rs`` ``[B, T, HV, V]``. (Forming the output in a separate parallel launch from the
    kept states, as FLA does, measured 30-50 % slower in total on an H100.) With ``VARLEN`` the batch is one
    chunk-aligned packed row and the second grid axis runs over (sequence, value head): sequence ``n`` owns the
    chunks ``chunk_lo[n] .. chunk_hi[n]``, starts from its own initial state and stores its own final state.
    ``LOWP`` (with ``DECAYED_QK``): the key-side operands stay in their 16-bit storage dtype and the state and the
    corrections are rounded to it for the products (fp32 accumulation; the state itself stays fp32).
    ``FUSED_WY``: no ``Y`` and ``U``; the corrections come from the decayed erase keys ``E``, the gated values and
    ``L^-1`` directly, ``R = L^-1 (w v - E S)`` (one more product per chunk, and no WY launch)."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_hv = i_bh % HV
    i_b, lo, hi = chunk_range(chunk_lo, chunk_hi, i_bh, T, HV, BT, VARLEN)
    i_h, i_hg = i_hv // (HV // H), i_hv // (HV // HG)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_t = tl.arange(0, BT)
    m_s = (o_k < K)[:, None] & (o_v < V)[None, :]
    p_s = o_k[:, None] * V + o_v[None, :]
    S = tl.zeros([BK, BV], tl.float32)
    if HAS_H0:
        S = tl.load(h0 + i_bh * K * V + p_s, mask=m_s, other=0.0).to(tl.float32)
    for i_t in range(lo, hi):
        t0 = i_t * BT
        rows = t0 + o_t
        m_r = rows < T
        m_o = m_r[:, None] & (o_v < V)[None, :]
        p_o = ((i_b * T + rows.to(tl.int64)) * HV + i_hv)[:, None] * V + o_v[None, :]
        p_a = ((i_b * T + rows.to(tl.int64)) * HV + i_hv)[:, None] * BT + o_t[None, :]
        if FUSED_WY:
            Z = tl.load(v + p_o, mask=m_o, other=0.0).to(tl.float32) * tl.load(w + p_o, mask=m_o,
                                                                                other=0.0).to(tl.float32)
            Et = tile(E, i_b, t0, T, HV, i_hv, K, 0, BT, BK)
            if LOWP:
                S_lp = S.to(Et.dtype)
                Z = Z - tl.dot(Et, S_lp)
            else:
                Z = Z - tl.dot(Et.to(tl.float32), S, input_precision=PRECISION)
            Lt = tl.load(Linv + p_a, mask=m_r[:, None], other=0.0)
            if LINV_16:
                R = tl.dot(Lt, Z.to(Lt.dtype))
            else:
                R = tl.dot(Lt, Z, input_precision=PRECISION)
        elif LOWP:
            Ut = tl.load(U + p_o, mask=m_o, other=0.0).to(tl.float32)
            Yt = tile(Y, i_b, t0, T, HV, i_hv, K, 0, BT, BK)
            S_lp = S.to(Yt.dtype)
            R = Ut - tl.dot(Yt, S_lp)
        else:
            Ut = tl.load(U + p_o, mask=m_o, other=0.0).to(tl.float32)
            Yt = tile_f32(Y, i_b, t0, T, HV, i_hv, K, 0, BT, BK)
            R = Ut - tl.dot(Yt, S, input_precision=PRECISION)
        if not DECAYED_QK:
            Gt = G_tile(G, i_b, t0, T, HG, i_hg, K, 0, BT, BK)
        if SAVE:
            NT = tl.cdiv(T, BT)
            tl.store(h + ((i_b * NT + i_t) * HV + i_hv) * K * V + p_s, S, mask=m_s)
            tl.store(Rs + p_o, R, mask=m_o)
        if LOWP:
            qg = tile(QG, i_b, t0, T, HV, i_hv, K, 0, BT, BK)
            At = tl.load(Aqk + p_a, mask=m_r[:, None], other=0.0)
            R_lp = R.to(S_lp.dtype)
            ot = tl.dot(qg, S_lp) + tl.dot(At, R_lp)
        else:
            if DECAYED_QK:
                qg = tile_f32(QG, i_b, t0, T, HV, i_hv, K, 0, BT, BK)
            else:
                qg = tile_f32(q, i_b, t0, T, H, i_h, K, 0, BT, BK) * scale * tl.exp(Gt)
            At = tl.load(Aqk + p_a, mask=m_r[:, None], other=0.0).to(tl.float32)
            ot = tl.dot(qg, S, input_precision=PRECISION) + tl.dot(At, R, input_precision=PRECISION)
        tl.store(o + p_o, ot.to(o.dtype.element_ty), mask=m_o)
        # the last row of the chunk (or of the sequence) holds the chunk's total decay
        G_last = G_row(G, i_b, t0 + BT - 1, T, HG, i_hg, K, 0, BK)
        if LOWP:
            kt = tile(KT, i_b, t0, T, HV, i_hv, K, 0, BT, BK)
            S = S * tl.exp(G_last)[:, None] + tl.dot(tl.trans(kt), R_lp)
        else:
            if DECAYED_QK:
                kt = tile_f32(KT, i_b, t0, T, HV, i_hv, K, 0, BT, BK)
            else:
                kt = tile_f32(k, i_b, t0, T, H, i_h, K, 0, BT, BK) * tl.exp(G_last[None, :] - Gt)
            S = S * tl.exp(G_last)[:, None] + tl.dot(tl.trans(kt), R, input_precision=PRECISION)
    if STORE_HT:
        tl.store(ht + i_bh * K * V + p_s, S, mask=m_s)


def chunk_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
    scale: float, initial_state: torch.Tensor | None, output_final_state: bool,
    block_v: int | None = None, num_warps: int = 4, num_stages: int | None = None,
    out: torch.Tensor | None = None, save: bool = False, decayed_qk: bool | None = None,
    inverse_warps: int = 1, inverse_rows_from_memory: bool = False, gram_warps: int = 2, wy_warps: int = 2,
    saved_state_dtype: torch.dtype = torch.float32, chunk_lo: torch.Tensor | None = None,
    chunk_hi: torch.Tensor | None = None, key_dtype: torch.dtype | None = None, lowp: bool | None = None,
    u_dtype: torch.dtype | None = None, fused_wy: bool | None = None,
    linv_dtype: torch.dtype | None = None, akk_dtype: torch.dtype | None = None, gram_stages: int = 2,
) -> tuple[torch.Tensor, torch.Tensor | None] | tuple[torch.Tensor, torch.Tensor | None, dict]:
    """Chunked forward on validated, activated inputs ``[B, T, *, *]``; returns ``(o, final_state)``.

    Options left at ``None`` are chosen here (the choices measured fastest on an H100, ``docs/performance.md``):

    - ``lowp`` (the default for 16-bit inputs without ``save``): the sequential pass runs its products on 16-bit
      operands, the input dtype: the decayed queries and tail keys (``decayed_qk``), ``Y``, the read-out Gram
      ``A_qk`` and ``U`` are stored in it, and the state and the corrections are rounded to it for the products
      only (fp32 accumulation, fp32 state). Otherwise the intermediates are fp32 (``key_dtype``, ``u_dtype``) and
      16-bit inputs get tf32 products.
    - ``decayed_qk``: the Gram launch also writes the decayed read-out queries ``scale * exp(G) q`` and tail keys
      ``exp(G_C - G) k``, which the sequential passes load instead of q, k and G (16-bit for 16-bit inputs).
    - ``block_v`` / ``num_stages``: the state kernel's value block and load pipelining, by the number of
      (sequence, value head) pairs: wide blocks when there are many, narrow ones (more programs) when few.

    - ``fused_wy`` (the default with ``lowp``; never with ``save``): no WY launch; the state kernel forms the
      corrections as ``R = L^-1 (w v - E S)`` from the decayed erase keys (in ``key_dtype`` with ``lowp``) and
      ``L^-1``: one more in-chunk product per chunk on the sequential path, two fewer stored intermediates.
    - ``linv_dtype`` (by default ``key_dtype`` with ``fused_wy`` and ``lowp``, else fp32; 16 bits never with
      ``save``): the dtype ``L^-1`` is stored in; the state pass's product with it runs on that dtype (tf32 for
      fp32). fp32 with ``lowp`` takes 64-wide value blocks: narrower ones exceed the H100's shared memory and are
      refused.
    - ``akk_dtype`` (fp32, or fp16): the erase Gram's storage between the Gram launch and the inverse, which reads
      it into fp32.

    ``num_warps`` is the state kernel's; ``inverse_warps``, ``gram_warps`` and ``wy_warps`` those launches'
    (``gram_stages`` the Gram launch's load pipelining);
    ``inverse_rows_from_memory`` picks the inverse's substitution form. ``out``
    may supply the output buffer (tests poison it with NaN). ``save=True`` also returns what ``chunk_bwd`` needs (a
    dict of intermediates); ``saved_state_dtype`` is the dtype of the chunk entry states it keeps (the backward
    keeps their gradients in the same dtype). ``chunk_lo`` / ``chunk_hi`` (int32 ``[N]``, on the device) make the
    call varlen: ``B == 1``, sequence ``n`` fills chunks ``chunk_lo[n] .. chunk_hi[n]`` (each sequence starts on a
    chunk boundary; padding between sequences must be identity steps, zero ``g``, ``b``, ``w``), the initial and
    final states are ``[N, HV, K, V]`` (see ``gdn2ts.ops.gdn2.chunk_triton``). No host synchronization.
    """
    half = q.dtype in (torch.bfloat16, torch.float16)
    if lowp is None:
        lowp = half and not save and decayed_qk is not False and key_dtype is None
    if decayed_qk is None:
        decayed_qk = lowp
    if key_dtype is None:
        key_dtype = q.dtype if lowp else torch.float32
    if u_dtype is None:
        u_dtype = q.dtype if lowp else torch.float32
    if fused_wy is None:
        fused_wy = lowp and not save
    if linv_dtype is None:
        linv_dtype = key_dtype if fused_wy and lowp else torch.float32
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    if T == 0:
        h0 = torch.zeros(B, HV, K, V, device=q.device) if initial_state is None else initial_state.clone()
        if save:
            raise ValueError("chunk_fwd: save=True needs at least one token")
        return v.new_empty(B, 0, HV, V), (h0 if output_final_state else None)
    if lowp and not (decayed_qk and key_dtype in (torch.bfloat16, torch.float16)):
        raise ValueError("chunk_fwd: lowp=True needs decayed_qk=True and key_dtype bfloat16 or float16")
    if fused_wy and save:
        raise ValueError("chunk_fwd: fused_wy=True is an inference form; the backward needs Y and U (save=True)")
    if akk_dtype is None:  # the erase Gram, read by the inverse only (fp16 measured no faster on the H100)
        akk_dtype = torch.float32
    if akk_dtype not in (torch.float32, torch.float16):
        raise ValueError(f"chunk_fwd: akk_dtype {akk_dtype} is not float32 or float16")
    if linv_dtype not in (torch.float32, torch.bfloat16, torch.float16) or (linv_dtype != torch.float32 and save):
        raise ValueError(f"chunk_fwd: linv_dtype {linv_dtype} is not float32, or bfloat16/float16 without save")
    # an fp32 L^-1 in the 16-bit state pass: value blocks under 64 need more shared memory than the H100 has (one
    # such tiling faulted the device), so they are refused and the automatic choice stays at 64
    wide_linv = fused_wy and lowp and linv_dtype == torch.float32
    if wide_linv and block_v is not None and block_v < min(64, triton.next_power_of_2(v.shape[3])):
        raise ValueError(f"chunk_fwd: an fp32 L^-1 in the 16-bit state pass needs block_v >= 64, got {block_v}")
    HG, HB = g.shape[2], b.shape[2]
    q, k, v, g, b, w = (x.contiguous() for x in (q, k, v, g, b, w))
    dev = q.device
    NT = triton.cdiv(T, BT)
    BK, BVfull = triton.next_power_of_2(K), triton.next_power_of_2(V)
    # fp32 inputs get fp32 products; bf16/fp16 inputs use tf32 tensor cores (error well under their rounding)
    precision = "ieee" if q.dtype in (torch.float32, torch.float64) else "tf32"
    G = torch.empty(B, T, HG, K, device=dev, dtype=torch.float32)
    _cumsum_kernel[(NT, B * HG)](g, G, T, HG=HG, K=K, BT=BT, BK=BK)
    qk_dtype = torch.float16 if q.dtype in (torch.bfloat16, torch.float16) else torch.float32
    if lowp:
        qk_dtype = key_dtype
    QG = torch.empty(B, T, HV, K, device=dev, dtype=qk_dtype) if decayed_qk else G
    KT = torch.empty(B, T, HV, K, device=dev, dtype=qk_dtype) if decayed_qk else G
    # fused_wy: no Y and U (the state kernel forms the corrections from E and L^-1)
    Y = torch.empty(0 if fused_wy else B, T, HV, K, device=dev, dtype=key_dtype)
    U = torch.empty(0 if fused_wy else B, T, HV, V, device=dev, dtype=u_dtype)
    Aqk = torch.empty(B, T, HV, BT, device=dev, dtype=key_dtype)
    Akk = torch.empty(B, T, HV, BT, device=dev, dtype=akk_dtype)
    Linv = torch.empty(B, T, HV, BT, device=dev, dtype=linv_dtype)
    # E is read by a tf32 product (WY launch) or, fused with lowp, by a 16-bit product with the rounded state
    e_dtype = key_dtype if fused_wy and lowp else torch.float16 if half else torch.float32
    E = torch.empty(B, T, HV, K, device=dev, dtype=e_dtype)
    gram_args = (q, k, G, b, Akk, Aqk, QG, KT, E, scale, T)
    gram_consts = dict(H=H, HV=HV, HG=HG, HB=HB, K=K, BK=BK, BT=BT, BC=BC, PRECISION=precision,
                       SAFE_SPREAD=SAFE_SPREAD, DECAYED_QK=decayed_qk, num_warps=gram_warps, num_stages=gram_stages)
    _gram_kernel[(NT * (BT // BC), B * HV)](*gram_args, **gram_consts)
    _inverse_kernel[(NT, B * HV)](q, k, G, b, Akk, Aqk, Linv, scale, T, H=H, HV=HV, HG=HG, HB=HB, K=K, BK=BK, BT=BT,
                                  BC=BC, SAFE_SPREAD=SAFE_SPREAD, ROWS_FROM_MEMORY=inverse_rows_from_memory,
                                  num_warps=inverse_warps)
    del Akk
    if not fused_wy:
        BVw = min(128, BVfull)
        _wy_kernel[(NT, B * HV, 1 + triton.cdiv(V, BVw))](E, v, w, Linv, Y, U, T, HV=HV, K=K, V=V, BK=BK, BV=BVw,
                                                           BT=BT, PRECISION=precision, num_warps=wy_warps)
        del E
    varlen = chunk_lo is not None
    # varlen: rows past the last sequence's chunks are never run; zeros there (not stale memory) keep every
    # output deterministic
    alloc = torch.zeros if varlen else torch.empty
    o = alloc(v.shape, device=dev, dtype=v.dtype) if out is None else out
    N = chunk_lo.numel() if varlen else B
    if varlen and output_final_state:
        # sequences with no token keep their initial state (no program stores for them)
        ht = initial_state.clone() if initial_state is not None else torch.zeros(N, HV, K, V, device=dev)
    else:
        ht = torch.empty(B, HV, K, V, device=dev, dtype=torch.float32) if output_final_state else o
    # by default 32, and with few (sequence, head) pairs narrower value blocks put more programs on the sequential
    # state passing; an explicit block_v is taken as given
    pairs = N * HV
    if lowp:  # measured on an H100 at K = V = 128 (docs/performance.md): 2048 x 8 is 128 pairs, 16384 x 1 is 16
        auto_bv, auto_stages = ((64, 1) if pairs >= 128 else (64, 2) if pairs >= 64 else (32, 3) if pairs >= 32
                                else (16, 3))
    else:
        auto_bv, auto_stages = (32 if pairs * triton.cdiv(V, 32) >= 256 else 16), 2
    if wide_linv:
        auto_bv, auto_stages = 64, 1
    BV = min(auto_bv if block_v is None else block_v, BVfull)
    num_stages = auto_stages if num_stages is None else num_stages
    h = alloc(B, NT, HV, K, V, device=dev, dtype=saved_state_dtype) if save else o
    Rs = alloc(B, T, HV, V, device=dev, dtype=torch.float32) if save else o
    _state_kernel[(triton.cdiv(V, BV), N * HV)](
        q, k, G, Y, U, Aqk, o, initial_state if initial_state is not None else o, ht, h, Rs, QG, KT,
        E if fused_wy else o, v, w, Linv, chunk_lo if varlen else o, chunk_hi if varlen else o, scale, T,
        H=H, HV=HV, HG=HG, K=K, V=V, BK=BK, BV=BV, BT=BT, HAS_H0=initial_state is not None,
        STORE_HT=output_final_state, SAVE=save, num_warps=num_warps,
        num_stages=num_stages, PRECISION=precision, DECAYED_QK=decayed_qk, VARLEN=varlen,
        LOWP=lowp, FUSED_WY=fused_wy, LINV_16=Linv.dtype != torch.float32,
    )
    if save:
        saved = dict(G=G, Y=Y, U=U, Aqk=Aqk, Linv=Linv, h=h, R=Rs)
        if decayed_qk:
            saved.update(qg=QG, kt=KT)
        return o, (ht if output_final_state else None), saved
    return o, (ht if output_final_state else None)
