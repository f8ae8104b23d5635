"""Chunked backward, per-chunk stages: ``_dk_kernel`` (the products over the value axis and every gate term that
does not pass through a Gram), ``_dgram_chunk_kernel`` / ``_dgram_kernel`` (the decayed Grams' gradients, whole
chunks of tame decay or 16-row blocks) and ``_dg_kernel`` (the in-chunk reverse cumulative sum of the Gram terms).
Launched by :func:`gdn2ts.kernels.chunk_bwd.chunk_bwd`."""

from __future__ import annotations

import triton
import triton.language as tl

from .bwd_state import _state_tile
from .tiles import G_row, G_tile, put, tile_f32


@triton.jit
def _dk_kernel(
    q, k, b, G, Y, Linv, h, dSn, R, dR, do, P, dq_part, dbk_part, dk_part, dg_part, scale, T, NT, stride_p,
    H: tl.constexpr, HV: tl.constexpr, HG: tl.constexpr, HB: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BKB: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, PRECISION: tl.constexpr,
):
    i_t, i_bh, i_kb = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    i_b, i_hv = i_bh // HV, i_bh % HV
    i_h, i_hg, i_hb = i_hv // (HV // H), i_hv // (HV // HG), i_hv // (HV // HB)
    t0 = i_t * BT
    k0 = i_kb * BKB
    dgq = tl.zeros([BT, BKB], tl.float32)
    dkt = tl.zeros([BT, BKB], tl.float32)
    dRS = tl.zeros([BT, BKB], tl.float32)
    dd = tl.zeros([BKB], tl.float32)
    for v0 in range(0, V, BV):
        p_s, m_s = _state_tile(h, i_b, i_t, NT, i_hv, HV, K, V, k0, v0, BKB, BV)
        S0 = tl.load(h + p_s, mask=m_s, other=0.0).to(tl.float32)
        dS = tl.load(dSn + p_s, mask=m_s, other=0.0).to(tl.float32)
        dgq += tl.dot(tile_f32(do, i_b, t0, T, HV, i_hv, V, v0, BT, BV), tl.trans(S0), input_precision=PRECISION)
        dkt += tl.dot(tile_f32(R, i_b, t0, T, HV, i_hv, V, v0, BT, BV), tl.trans(dS), input_precision=PRECISION)
        dRS += tl.dot(tile_f32(dR, i_b, t0, T, HV, i_hv, V, v0, BT, BV), tl.trans(S0), input_precision=PRECISION)
        dd += tl.sum(dS * S0, axis=1)
    L = tile_f32(Linv, i_b, t0, T, HV, i_hv, BT, 0, BT, BT)
    dE = -tl.dot(tl.trans(L), dRS, input_precision=PRECISION)
    # this key block's share of the erase-Gram gradient; _dgram_kernel sums the shares
    Yb = tile_f32(Y, i_b, t0, T, HV, i_hv, K, k0, BT, BKB)
    share = tl.dot(dE, tl.trans(Yb), input_precision=PRECISION)
    put(P + i_kb.to(tl.int64) * stride_p, share, i_b, t0, T, HV, i_hv, BT, 0, BT, BT)
    Gt = G_tile(G, i_b, t0, T, HG, i_hg, K, k0, BT, BKB)
    G_last = G_row(G, i_b, t0 + BT - 1, T, HG, i_hg, K, k0, BKB)
    gamma = tl.exp(Gt)
    tail = tl.exp(G_last[None, :] - Gt)
    kk = tile_f32(k, i_b, t0, T, H, i_h, K, k0, BT, BKB)
    qs = tile_f32(q, i_b, t0, T, H, i_h, K, k0, BT, BKB) * scale
    bk = tile_f32(b, i_b, t0, T, HB, i_hb, K, k0, BT, BKB) * kk
    put(dq_part, gamma * dgq, i_b, t0, T, HV, i_hv, K, k0, BT, BKB)
    put(dbk_part, gamma * dE, i_b, t0, T, HV, i_hv, K, k0, BT, BKB)
    put(dk_part, tail * dkt, i_b, t0, T, HV, i_hv, K, k0, BT, BKB)
    # dg: the terms through exp(G_r) summed over r >= j; the tail factors exp(G_C - G_r) over r < j; the chunk
    # decay exp(G_C) for every j
    dGa = gamma * (bk * dE + qs * dgq)
    # (the sum over r < j as inclusive sum minus own term, in fp64 so that no cancellation is visible in fp32)
    tails = (kk * tail * dkt).to(tl.float64)
    dg = tl.cumsum(dGa, axis=0, reverse=True) + (tl.cumsum(tails, axis=0) - tails).to(tl.float32)
    put(dg_part, dg + (tl.exp(G_last) * dd)[None, :], i_b, t0, T, HV, i_hv, K, k0, BT, BKB)


@triton.jit
def _dA_block(P, dAkv, dAqk, i_b, r0, c0, T, HV: tl.constexpr, i_hv, NKB: tl.constexpr, stride_p,
              BT: tl.constexpr, BC: tl.constexpr, DIAG: tl.constexpr):
    """Block (rows r0.., in-chunk columns c0..) of the erase-Gram gradient ``-strict_lower(dE Y^T + dZ U^T)`` and
    of the read-out-Gram gradient (strictly lower on the diagonal block: its diagonal is handled apart)."""
    a_kk = tile_f32(dAkv, i_b, r0, T, HV, i_hv, BT, c0, BC, BC)
    for i in range(NKB):
        a_kk += tile_f32(P + i * stride_p.to(tl.int64), i_b, r0, T, HV, i_hv, BT, c0, BC, BC)
    a_qk = tile_f32(dAqk, i_b, r0, T, HV, i_hv, BT, c0, BC, BC)
    if DIAG:
        o = tl.arange(0, BC)
        lower = o[:, None] > o[None, :]
        a_kk = tl.where(lower, a_kk, 0.0)
        a_qk = tl.where(lower, a_qk, 0.0)
    return -a_kk, a_qk


@triton.jit
def _chunk_is_tame(G, i_b, t0, T, HG: tl.constexpr, i_hg, K: tl.constexpr, k0, BKB: tl.constexpr, BT: tl.constexpr,
                   SAFE_SPREAD: tl.constexpr):
    """Whether the decay of a chunk (this key block) spreads little enough for one product about its mid-point."""
    top = G_row(G, i_b, t0, T, HG, i_hg, K, k0, BKB)
    bot = G_row(G, i_b, t0 + BT - 1, T, HG, i_hg, K, k0, BKB)
    return tl.max(tl.abs(top - bot), axis=0) < SAFE_SPREAD


@triton.jit
def _dgram_chunk_kernel(
    q, k, b, G, P, dAkv, dAqk, dq_part, dbk_part, dk_part, dg_part, dq, dk, db, dg, scale, T, stride_p,
    H: tl.constexpr, HV: tl.constexpr, HG: tl.constexpr, HB: tl.constexpr, K: tl.constexpr,
    NKB: tl.constexpr, BKB: tl.constexpr, BT: tl.constexpr, PRECISION: tl.constexpr, SAFE_SPREAD: tl.constexpr,
):
    """The Gram gradients of a whole chunk as three products about the chunk's mid-point decay (every factor
    <= exp(SAFE_SPREAD / 2)), then dq, dk, db and dg. Chunks whose decay spreads further are left to
    _dgram_kernel and _dg_kernel."""
    i_t, i_bh, i_kb = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    i_b, i_hv = i_bh // HV, i_bh % HV
    i_h, i_hg, i_hb = i_hv // (HV // H), i_hv // (HV // HG), i_hv // (HV // HB)
    t0 = i_t * BT
    k0 = i_kb * BKB
    if _chunk_is_tame(G, i_b, t0, T, HG, i_hg, K, k0, BKB, BT, SAFE_SPREAD):
        o_t = tl.arange(0, BT)
        mid = 0.5 * (G_row(G, i_b, t0, T, HG, i_hg, K, k0, BKB) + G_row(G, i_b, t0 + BT - 1, T, HG, i_hg, K, k0,
                                                                          BKB))
        Gt = G_tile(G, i_b, t0, T, HG, i_hg, K, k0, BT, BKB)
        up = tl.exp(Gt - mid[None, :])
        dn = tl.exp(mid[None, :] - Gt)
        kk = tile_f32(k, i_b, t0, T, H, i_h, K, k0, BT, BKB)
        qs = tile_f32(q, i_b, t0, T, H, i_h, K, k0, BT, BKB) * scale
        bb = tile_f32(b, i_b, t0, T, HB, i_hb, K, k0, BT, BKB)
        bk = bb * kk
        a_kk = tile_f32(dAkv, i_b, t0, T, HV, i_hv, BT, 0, BT, BT)
        for i in range(NKB):
            a_kk += tile_f32(P + i * stride_p.to(tl.int64), i_b, t0, T, HV, i_hv, BT, 0, BT, BT)
        lower = o_t[:, None] > o_t[None, :]
        a_kk = tl.where(lower, -a_kk, 0.0)
        a_qk = tile_f32(dAqk, i_b, t0, T, HV, i_hv, BT, 0, BT, BT)
        diag = tl.sum(tl.where(o_t[:, None] == o_t[None, :], a_qk, 0.0), axis=1)
        a_qk = tl.where(lower, a_qk, 0.0)
        kd = kk * dn
        d_bk = up * tl.dot(a_kk, kd, input_precision=PRECISION)
        d_q = up * tl.dot(a_qk, kd, input_precision=PRECISION)
        d_k = dn * (tl.dot(tl.trans(a_kk), bk * up, input_precision=PRECISION)
                    + tl.dot(tl.trans(a_qk), qs * up, input_precision=PRECISION))
        dq_s = d_q + diag[:, None] * kk + tile_f32(dq_part, i_b, t0, T, HV, i_hv, K, k0, BT, BKB)
        dbk = d_bk + tile_f32(dbk_part, i_b, t0, T, HV, i_hv, K, k0, BT, BKB)
        dk_ = d_k + diag[:, None] * qs + tile_f32(dk_part, i_b, t0, T, HV, i_hv, K, k0, BT, BKB) + dbk * bb
        put(dq, dq_s * scale, i_b, t0, T, HV, i_hv, K, k0, BT, BKB)
        put(dk, dk_, i_b, t0, T, HV, i_hv, K, k0, BT, BKB)
        put(db, dbk * kk, i_b, t0, T, HV, i_hv, K, k0, BT, BKB)
        dGg = bk * d_bk + qs * d_q - kk * d_k
        dg_ = tl.cumsum(dGg, axis=0, reverse=True) + tile_f32(dg_part, i_b, t0, T, HV, i_hv, K, k0, BT, BKB)
        put(dg, dg_, i_b, t0, T, HV, i_hv, K, k0, BT, BKB)


@triton.jit
def _dgram_kernel(
    q, k, b, G, P, dAkv, dAqk, dq_part, dbk_part, dk_part, dq, dk, db, dGg, scale, T, stride_p,
    H: tl.constexpr, HV: tl.constexpr, HG: tl.constexpr, HB: tl.constexpr, K: tl.constexpr,
    NKB: tl.constexpr, BKB: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, PRECISION: tl.constexpr,
    SAFE_SPREAD: tl.constexpr,
):
    """The Gram gradients of chunks whose decay spreads too far for _dgram_chunk_kernel, one 16-row block at a
    time: left of the diagonal about the last row of the column block, the diagonal block about its mid-point or
    pairwise (every exponent bounded). Writes dq, dk, db and the Gram terms of dg for _dg_kernel."""
    i_tc, i_bh, i_kb = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    i_t, i = i_tc // (BT // BC), i_tc % (BT // BC)
    i_b, i_hv = i_bh // HV, i_bh % HV
    i_h, i_hg, i_hb = i_hv // (HV // H), i_hv // (HV // HG), i_hv // (HV // HB)
    t0 = i_t * BT
    r0 = t0 + i * BC
    k0 = i_kb * BKB
    if not _chunk_is_tame(G, i_b, t0, T, HG, i_hg, K, k0, BKB, BT, SAFE_SPREAD):
        o_c = tl.arange(0, BC)
        Gi = G_tile(G, i_b, r0, T, HG, i_hg, K, k0, BC, BKB)
        ki = tile_f32(k, i_b, r0, T, H, i_h, K, k0, BC, BKB)
        qi = tile_f32(q, i_b, r0, T, H, i_h, K, k0, BC, BKB) * scale
        bki = tile_f32(b, i_b, r0, T, HB, i_hb, K, k0, BC, BKB) * ki
        d_bk = tl.zeros([BC, BKB], tl.float32)
        d_q = tl.zeros([BC, BKB], tl.float32)
        # rows of block i against column blocks j < i: decay about the last row of block j (every factor <= 1)
        for j in range(0, i):
            rj = t0 + j * BC
            ref = G_row(G, i_b, rj + BC - 1, T, HG, i_hg, K, k0, BKB)
            kj = tile_f32(k, i_b, rj, T, H, i_h, K, k0, BC, BKB) * tl.exp(ref[None, :] - G_tile(G, i_b, rj, T, HG, i_hg,
                                                                                                K, k0, BC, BKB))
            a_kk, a_qk = _dA_block(P, dAkv, dAqk, i_b, r0, j * BC, T, HV, i_hv, NKB, stride_p, BT, BC, False)
            into = tl.exp(Gi - ref[None, :])
            d_bk += into * tl.dot(a_kk, kj, input_precision=PRECISION)
            d_q += into * tl.dot(a_qk, kj, input_precision=PRECISION)
        # column block i against the row blocks l > i: decay about the last row of block i
        ref_i = G_row(G, i_b, r0 + BC - 1, T, HG, i_hg, K, k0, BKB)
        d_k = tl.zeros([BC, BKB], tl.float32)
        for l in range(i + 1, BT // BC):
            rl = t0 + l * BC
            a_l = tl.exp(G_tile(G, i_b, rl, T, HG, i_hg, K, k0, BC, BKB) - ref_i[None, :])
            kl = tile_f32(k, i_b, rl, T, H, i_h, K, k0, BC, BKB)
            bkl = tile_f32(b, i_b, rl, T, HB, i_hb, K, k0, BC, BKB) * kl * a_l
            ql = tile_f32(q, i_b, rl, T, H, i_h, K, k0, BC, BKB) * (scale * a_l)
            a_kk, a_qk = _dA_block(P, dAkv, dAqk, i_b, rl, i * BC, T, HV, i_hv, NKB, stride_p, BT, BC, False)
            d_k += tl.dot(tl.trans(a_kk), bkl, input_precision=PRECISION) + \
                tl.dot(tl.trans(a_qk), ql, input_precision=PRECISION)
        d_k = d_k * tl.exp(ref_i[None, :] - Gi)
        # the diagonal block: about its mid-point when the decay spread allows, pairwise otherwise
        a_kk, a_qk = _dA_block(P, dAkv, dAqk, i_b, r0, i * BC, T, HV, i_hv, NKB, stride_p, BT, BC, True)
        diag = tl.sum(tl.where(o_c[:, None] == o_c[None, :], tile_f32(dAqk, i_b, r0, T, HV, i_hv, BT, i * BC, BC, BC),
                               0.0), axis=1)
        G_top = G_row(G, i_b, r0, T, HG, i_hg, K, k0, BKB)
        if tl.max(tl.abs(ref_i - G_top), axis=0) < SAFE_SPREAD:
            mid = 0.5 * (G_top + ref_i)
            up = tl.exp(Gi - mid[None, :])
            dn = tl.exp(mid[None, :] - Gi)
            d_bk += up * tl.dot(a_kk, ki * dn, input_precision=PRECISION)
            d_q += up * tl.dot(a_qk, ki * dn, input_precision=PRECISION)
            d_k += dn * (tl.dot(tl.trans(a_kk), bki * up, input_precision=PRECISION)
                         + tl.dot(tl.trans(a_qk), qi * up, input_precision=PRECISION))
        else:
            for c in range(BC):
                Gc = G_row(G, i_b, r0 + c, T, HG, i_hg, K, k0, BKB)
                kc = tl.sum(tl.where(o_c[:, None] == c, ki, 0.0), axis=0)
                d = tl.exp(tl.where((o_c > c)[:, None], Gi - Gc[None, :], float("-inf")))
                col_kk = tl.sum(tl.where(o_c[None, :] == c, a_kk, 0.0), axis=1)
                col_qk = tl.sum(tl.where(o_c[None, :] == c, a_qk, 0.0), axis=1)
                d_bk += col_kk[:, None] * kc[None, :] * d
                d_q += col_qk[:, None] * kc[None, :] * d
                row = tl.sum((col_kk[:, None] * bki + col_qk[:, None] * qi) * d, axis=0)
                d_k = tl.where(o_c[:, None] == c, d_k + row[None, :], d_k)
        bi = tile_f32(b, i_b, r0, T, HB, i_hb, K, k0, BC, BKB)
        dq_s = d_q + diag[:, None] * ki + tile_f32(dq_part, i_b, r0, T, HV, i_hv, K, k0, BC, BKB)
        dbk = d_bk + tile_f32(dbk_part, i_b, r0, T, HV, i_hv, K, k0, BC, BKB)
        dk_ = d_k + diag[:, None] * qi + tile_f32(dk_part, i_b, r0, T, HV, i_hv, K, k0, BC, BKB) + dbk * bi
        put(dq, dq_s * scale, i_b, r0, T, HV, i_hv, K, k0, BC, BKB)
        put(dk, dk_, i_b, r0, T, HV, i_hv, K, k0, BC, BKB)
        put(db, dbk * ki, i_b, r0, T, HV, i_hv, K, k0, BC, BKB)
        put(dGg, bki * d_bk + qi * d_q - ki * d_k, i_b, r0, T, HV, i_hv, K, k0, BC, BKB)


@triton.jit
def _dg_kernel(G, dGg, dg_part, dg, T, HV: tl.constexpr, HG: tl.constexpr, K: tl.constexpr, BKB: tl.constexpr,
               BT: tl.constexpr, SAFE_SPREAD: tl.constexpr):
    """dg = in-chunk reverse cumulative sum of the Gram terms + the terms gathered by _dk_kernel (for the chunks
    _dgram_kernel took)."""
    i_t, i_bh, i_kb = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    i_b, i_hv = i_bh // HV, i_bh % HV
    i_hg = i_hv // (HV // HG)
    t0 = i_t * BT
    k0 = i_kb * BKB
    if not _chunk_is_tame(G, i_b, t0, T, HG, i_hg, K, k0, BKB, BT, SAFE_SPREAD):
        x = tl.cumsum(tile_f32(dGg, i_b, t0, T, HV, i_hv, K, k0, BT, BKB), axis=0, reverse=True)
        put(dg, x + tile_f32(dg_part, i_b, t0, T, HV, i_hv, K, k0, BT, BKB), i_b, t0, T, HV, i_hv, K, k0, BT, BKB)
