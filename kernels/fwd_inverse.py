"""Chunked forward, in-chunk stage 2: ``_inverse_kernel`` forms the diagonal blocks whose decay spreads too far for
the Gram launch's one-product form (``_diag_fixup``, pairwise) and then ``L^-1 = (I + T)^-1`` by blocked forward
substitution (four 16 x 16 diagonal inverses interleaved). Launched by :func:`gdn2ts.kernels.chunk_fwd.chunk_fwd`."""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import G_row, G_tile, block, put_block, row_f32, tile_f32


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
