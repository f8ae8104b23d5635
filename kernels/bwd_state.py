"""Chunked backward, sequential stage and value axis: ``_dstate_kernel`` (backwards over chunks: every chunk's
exit-state gradient and ``dR``) and ``_dv_kernel`` (``dZ = L^-T dR``, dv, dw, ``dA_qk`` and the value half of the
erase-Gram gradient). Launched by :func:`gdn2ts.kernels.chunk_bwd.chunk_bwd`."""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import G_row, G_tile, chunk_range, put, tile_f32


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
