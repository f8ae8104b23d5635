"""Chunked forward, sequential stage: ``_wy_kernel`` (``Y = L^-1 E``, ``U = L^-1 (w v)``, training) and
``_state_kernel`` (the state passing over chunks, with the output). Launched by
:func:`gdn2ts.kernels.chunk_fwd.chunk_fwd`."""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import G_row, G_tile, chunk_range, put, tile, tile_f32


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
