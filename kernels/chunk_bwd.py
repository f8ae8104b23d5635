"""Triton kernels for the chunked GDN-2 backward, fixed-length or chunk-aligned packed batches (notation and
formulas of ``docs/gdn2.md`` section 3).

The forward (``chunk_fwd(..., save=True)``) keeps ``G``, the read-out Gram ``A_qk``, ``L^-1``, ``Y``, ``U``, each
chunk's entry state ``S0`` and the corrections ``R``. Five launches, each over chunks of 64 tokens:

1. ``_dstate_kernel``, one program per (sequence, value head, value block), backwards over chunks:
   ``dR = A_qk^T dO + (exp(G_C - G) k) dS``, ``dS <- exp(G_C) dS + (exp(G) q)^T dO - Y^T dR``; stores every
   chunk's exit-state gradient ``dS`` and ``dR``.
2. ``_dv_kernel``, per (chunk, value head): ``dZ = L^-T dR`` (``dv = dZ w``, ``dw = dZ v``), ``dA_qk = dO R^T`` and
   the value half ``dZ U^T`` of the erase-Gram gradient.
3. ``_dk_kernel``, per (chunk, value head, key block): the products over the value axis (``dO S0^T``,
   ``R dS^T``, ``dR S0^T``, ``sum(dS * S0)``), ``dE = -L^-T dR S0^T``, the key half ``dE Y^T`` of the erase-Gram
   gradient, and every gate term that does not pass through a Gram.
4. ``_dgram_kernel``, per (16-row block, chunk, value head, key block): the gradients of the two decayed Grams,
   with the same overflow-free decay references as the forward's ``_gram_kernel``; writes dq, dk, db.
5. ``_dg_kernel``: ``dg`` = the in-chunk reverse cumulative sum of the Gram terms plus the rest.

Plain pointer arithmetic with masks, int64 offsets, no ``tl.make_block_ptr``, no host synchronization.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk_fwd import BC, BT, SAFE_SPREAD
from .tiles import G_row, G_tile, chunk_range, put, tile_f32

__all__ = ["chunk_bwd"]

# tests set this to fill every buffer the backward allocates with NaN, so an element no kernel wrote shows up
POISON = False


def _empty(*shape, device, dtype) -> torch.Tensor:
    if POISON:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(*shape, device=device, dtype=dtype)


@triton.jit
def _state_tile(ptr, i_b, i_t, NT, i_hv, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, k0, v0,
                BK: tl.constexpr, BV: tl.constexpr):
    """Block ``[k0.., v0..]`` of chunk ``i_t``'s state in a ``[B, NT, HV, K, V]`` buffer."""
    o_k = k0 + tl.arange(0, BK)
    o_v = v0 + tl.arange(0, BV)
    base = ((i_b * NT + i_t) * HV + i_hv) * K * V
    return base + o_k[:, None] * V + o_v[None, :], (o_k < K)[:, None] & (o_v < V)[None, :]


@triton.jit
def _dstate_kernel(
    q, k, G, Y, Aqk, do, dht, dh0, dSn, dR, QG, KT, chunk_lo, chunk_hi, scale, T, NT,
    H: tl.constexpr, HV: tl.constexpr, HG: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
    PRECISION: tl.constexpr, DECAYED_QK: tl.constexpr, VARLEN: tl.constexpr,
):
    """With ``VARLEN``, one program per (value block, sequence, value head) over its sequence's chunks
    ``chunk_lo[n] .. chunk_hi[n]`` (as the forward's state pass)."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_hv = i_bh % HV
    i_b, lo, hi = chunk_range(chunk_lo, chunk_hi, i_bh, T, HV, BT, VARLEN)
    i_h, i_hg = i_hv // (HV // H), i_hv // (HV // HG)
    v0 = i_v * BV
    o_k = tl.arange(0, BK)
    o_v = v0 + tl.arange(0, BV)
    o_t = tl.arange(0, BT)
    m_s = (o_k < K)[:, None] & (o_v < V)[None, :]
    p_s = o_k[:, None] * V + o_v[None, :]
    dS = tl.zeros([BK, BV], tl.float32)
    if HAS_DHT:
        dS = tl.load(dht + i_bh * K * V + p_s, mask=m_s, other=0.0).to(tl.float32)
    for j in range(hi - lo):
        i_t = hi - 1 - j
        t0 = i_t * BT
        p_n, m_n = _state_tile(dSn, i_b, i_t, NT, i_hv, HV, K, V, 0, v0, BK, BV)
        tl.store(dSn + p_n, dS, mask=m_n)
        if not DECAYED_QK:
            Gt = G_tile(G, i_b, t0, T, HG, i_hg, K, 0, BT, BK)
        G_last = G_row(G, i_b, t0 + BT - 1, T, HG, i_hg, K, 0, BK)
        dOt = tile_f32(do, i_b, t0, T, HV, i_hv, V, v0, BT, BV)
        rows = t0 + o_t
        At = tl.load(Aqk + ((i_b * T + rows.to(tl.int64)) * HV + i_hv)[:, None] * BT + o_t[None, :],
                     mask=(rows < T)[:, None], other=0.0).to(tl.float32)
        if DECAYED_QK:
            kt = tile_f32(KT, i_b, t0, T, HV, i_hv, K, 0, BT, BK)
        else:
            kt = tile_f32(k, i_b, t0, T, H, i_h, K, 0, BT, BK) * tl.exp(G_last[None, :] - Gt)
        dRt = tl.dot(kt, dS, input_precision=PRECISION) + tl.dot(tl.trans(At), dOt, input_precision=PRECISION)
        put(dR, dRt, i_b, t0, T, HV, i_hv, V, v0, BT, BV)
        if DECAYED_QK:
            qt = tile_f32(QG, i_b, t0, T, HV, i_hv, K, 0, BT, BK)
        else:
            qt = tile_f32(q, i_b, t0, T, H, i_h, K, 0, BT, BK) * (scale * tl.exp(Gt))
        Yt = tile_f32(Y, i_b, t0, T, HV, i_hv, K, 0, BT, BK)
        dS = dS * tl.exp(G_last)[:, None] + tl.dot(tl.trans(qt), dOt, input_precision=PRECISION) \
            - tl.dot(tl.trans(Yt), dRt, input_precision=PRECISION)
    if STORE_DH0:
        tl.store(dh0 + i_bh * K * V + p_s, dS, mask=m_s)


@triton.jit
def _dv_kernel(
    v, w, U, R, dR, do, Linv, dv, dw, dAqk, dAkv, T,
    HV: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, PRECISION: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_hv = i_bh // HV, i_bh % HV
    t0 = i_t * BT
    o_t = tl.arange(0, BT)
    L = tile_f32(Linv, i_b, t0, T, HV, i_hv, BT, 0, BT, BT)
    A_o = tl.zeros([BT, BT], tl.float32)
    A_v = tl.zeros([BT, BT], tl.float32)
    for v0 in range(0, V, BV):
        dRb = tile_f32(dR, i_b, t0, T, HV, i_hv, V, v0, BT, BV)
        dZ = tl.dot(tl.trans(L), dRb, input_precision=PRECISION)
        put(dv, dZ * tile_f32(w, i_b, t0, T, HV, i_hv, V, v0, BT, BV), i_b, t0, T, HV, i_hv, V, v0, BT, BV)
        put(dw, dZ * tile_f32(v, i_b, t0, T, HV, i_hv, V, v0, BT, BV), i_b, t0, T, HV, i_hv, V, v0, BT, BV)
        A_o += tl.dot(tile_f32(do, i_b, t0, T, HV, i_hv, V, v0, BT, BV),
                      tl.trans(tile_f32(R, i_b, t0, T, HV, i_hv, V, v0, BT, BV)), input_precision=PRECISION)
        A_v += tl.dot(dZ, tl.trans(tile_f32(U, i_b, t0, T, HV, i_hv, V, v0, BT, BV)), input_precision=PRECISION)
    # the read-out Gram is lower triangular (diagonal included), the erase Gram strictly lower
    put(dAqk, tl.where(o_t[:, None] >= o_t[None, :], A_o, 0.0), i_b, t0, T, HV, i_hv, BT, 0, BT, BT)
    put(dAkv, A_v, i_b, t0, T, HV, i_hv, BT, 0, BT, BT)


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


def _group_sum(x: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-value-head gradients ``[B, T, HV, D]`` summed over the value heads that share an input head."""
    B, T, HV, D = x.shape
    if heads != HV:
        x = x.view(B, T, heads, HV // heads, D).sum(3)
    return x.to(dtype)


def chunk_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
    scale: float, saved: dict, do: torch.Tensor, dht: torch.Tensor | None, need_dh0: bool,
    block_v: int = 32, num_warps: int = 4, num_stages: int = 2, intra_warps: int = 4, dk_block_v: int = 32,
    gram_warps: int = 8, chunk_lo: torch.Tensor | None = None, chunk_hi: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Gradients ``(dq, dk, dv, dg, db, dw, dh0)`` of the chunked forward from what ``chunk_fwd(..., save=True)``
    kept (``saved``), the output gradient ``do`` and the final-state gradient ``dht`` (None: zero). ``dh0`` is
    None unless ``need_dh0``. Gradients come in the inputs' dtypes; ``dh0`` is fp32. No host synchronization.

    Tiling (K = V = 128, chosen by ``python -m gdn2ts.bench.profile_chunk`` on an H100): 4 warps for the state
    and value-axis kernels (8 spill fewer registers but ran 2-4 % slower), the state kernel's loads 2 stages deep
    (3, or value blocks of 64, need more shared memory than an H100 has); 8 warps for the whole-chunk Gram kernel
    (4 ran 20 % slower)."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    HG, HB = g.shape[2], b.shape[2]
    dev = q.device
    NT = triton.cdiv(T, BT)
    BK, BVfull = triton.next_power_of_2(K), triton.next_power_of_2(V)
    precision = "ieee" if q.dtype in (torch.float32, torch.float64) else "tf32"
    f32 = torch.float32
    G, Y, U, Aqk, Linv, h, R = (saved[n] for n in ("G", "Y", "U", "Aqk", "Linv", "h", "R"))
    do = do.contiguous()

    varlen = chunk_lo is not None
    # varlen: chunks past the last sequence are never run by the sequential pass; zeros there (not stale memory)
    # keep every gradient the per-chunk kernels derive from them deterministic
    alloc = (lambda *shape, device, dtype: torch.zeros(shape, device=device, dtype=dtype)) if varlen else _empty
    # the per-chunk state gradients are kept in the dtype the forward kept the chunk states in
    dSn = alloc(B, NT, HV, K, V, device=dev, dtype=h.dtype)
    dR = alloc(B, T, HV, V, device=dev, dtype=f32)
    N = chunk_lo.numel() if varlen else B
    # (varlen: sequences with no token pass their final-state gradient straight to their initial state)
    dh0 = (dht.clone() if dht is not None else torch.zeros(N, HV, K, V, device=dev)) if need_dh0 and varlen else \
        _empty(B, HV, K, V, device=dev, dtype=f32) if need_dh0 else None
    # value blocks of 32 at least: with 16, triton 3.6 on Hopper computed wrong state gradients (measured on an
    # H100; the interpreter agrees with the reference for both)
    BV = min(max(block_v, 32), BVfull)
    _dstate_kernel[(triton.cdiv(V, BV), N * HV)](
        q, k, G, Y, Aqk, do, dht if dht is not None else dR, dh0 if need_dh0 else dR, dSn, dR,
        saved.get("qg", dR), saved.get("kt", dR), chunk_lo if varlen else dR, chunk_hi if varlen else dR, scale, T,
        NT, H=H, HV=HV, HG=HG, K=K, V=V, BK=BK, BV=BV, BT=BT, HAS_DHT=dht is not None, STORE_DH0=need_dh0,
        PRECISION=precision, DECAYED_QK="qg" in saved, VARLEN=varlen, num_warps=num_warps, num_stages=num_stages)

    def grad_buffer(heads_in: int, dtype: torch.dtype, D: int) -> torch.Tensor:
        # written in the input's dtype directly when no value heads need summing
        return _empty(B, T, HV, D, device=dev, dtype=dtype if heads_in == HV else f32)

    dv, dw = _empty(*v.shape, device=dev, dtype=v.dtype), _empty(*w.shape, device=dev, dtype=w.dtype)
    dAqk = _empty(B, T, HV, BT, device=dev, dtype=f32)
    dAkv = _empty(B, T, HV, BT, device=dev, dtype=f32)
    _dv_kernel[(NT, B * HV)](v, w, U, R, dR, do, Linv, dv, dw, dAqk, dAkv, T, HV=HV, V=V, BV=min(64, BVfull), BT=BT,
                             PRECISION=precision, num_warps=intra_warps)

    BKB = min(64, BK)
    NKB = triton.cdiv(K, BKB)
    P = _empty(NKB, B, T, HV, BT, device=dev, dtype=f32)
    dq_part, dbk_part, dk_part, dg_part = (_empty(B, T, HV, K, device=dev, dtype=f32) for _ in range(4))
    stride_p = B * T * HV * BT
    _dk_kernel[(NT, B * HV, NKB)](q, k, b, G, Y, Linv, h, dSn, R, dR, do, P, dq_part, dbk_part, dk_part, dg_part,
                                  scale, T, NT, stride_p, H=H, HV=HV, HG=HG, HB=HB, K=K, V=V, BKB=BKB,
                                  BV=min(dk_block_v, BVfull), BT=BT, PRECISION=precision, num_warps=intra_warps,
                                  num_stages=num_stages)

    del dSn, dR  # (their memory serves the gradients below)
    dq, dk, db = grad_buffer(H, q.dtype, K), grad_buffer(H, k.dtype, K), grad_buffer(HB, b.dtype, K)
    dg = grad_buffer(HG, g.dtype, K)
    # chunks of tame decay in one program each; the others by 16-row blocks, then their dg (each kernel decides
    # per (chunk, key block) from G alone, so exactly one of the two paths writes every element)
    _dgram_chunk_kernel[(NT, B * HV, NKB)](
        q, k, b, G, P, dAkv, dAqk, dq_part, dbk_part, dk_part, dg_part, dq, dk, db, dg, scale, T, stride_p, H=H, HV=HV,
        HG=HG, HB=HB, K=K, NKB=NKB, BKB=BKB, BT=BT, PRECISION=precision, SAFE_SPREAD=SAFE_SPREAD,
        num_warps=gram_warps)
    dGg = dbk_part  # each element is read (by its own program) before it is overwritten
    _dgram_kernel[(NT * (BT // BC), B * HV, NKB)](
        q, k, b, G, P, dAkv, dAqk, dq_part, dbk_part, dk_part, dq, dk, db, dGg, scale, T, stride_p, H=H, HV=HV, HG=HG,
        HB=HB, K=K, NKB=NKB, BKB=BKB, BT=BT, BC=BC, PRECISION=precision, SAFE_SPREAD=SAFE_SPREAD, num_warps=4)
    _dg_kernel[(NT, B * HV, NKB)](G, dGg, dg_part, dg, T, HV=HV, HG=HG, K=K, BKB=BKB, BT=BT, SAFE_SPREAD=SAFE_SPREAD,
                                  num_warps=4)
    return (_group_sum(dq, H, q.dtype), _group_sum(dk, H, k.dtype), dv, _group_sum(dg, HG, g.dtype),
            _group_sum(db, HB, b.dtype), dw, dh0)
