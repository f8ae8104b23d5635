"""Chunked forward, in-chunk stage 1: the cumulative log-decay (``_cumsum_kernel``) and the decayed Grams
(``_gram_kernel``: the erase Gram ``T`` and read-out Gram ``A_qk`` per 16-row block, with the decayed erase keys
``E = exp(G) b k`` and, for the sequential pass, the decayed queries and tail keys). Launched by
:func:`gdn2ts.kernels.chunk_fwd.chunk_fwd`."""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import G_row, G_tile, put, put_block, tile_f32


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
