"""Triton kernels for the chunked GDN-2 forward (prefill and inference), fixed-length batches.

Three launches, each over chunks of 64 tokens (notation of ``docs/gdn2.md``):

1. ``_cumsum_kernel``: ``G`` = in-chunk cumulative log-decay, fp32.
2. ``_intra_kernel``, one program per (chunk, value head): the decayed Grams ``T`` (erase) and ``A_qk`` (read-out)
   by 16 x 16 blocks, ``L^-1 = (I + T)^-1`` by blocked forward substitution, then ``Y = L^-1 (exp(G) b k)`` and
   ``U = L^-1 (w v)``. Off-diagonal blocks take the decay about the last position of their column block and
   diagonal blocks pairwise, so every exponent is <= 0: no overflow for any decay.
3. ``_state_kernel``, one program per (sequence, value head, value block): the sequential state passing
   ``R = U - Y S``, ``O = (exp(G) q) S + A_qk R``, ``S <- exp(G_C) S + (exp(G_C - G) k)^T R``.

Plain pointer arithmetic with masks, int64 offsets, no ``tl.make_block_ptr``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
def _load_rows(ptr, i_b, row0, T, heads, i_h, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """Rows ``row0 .. row0 + BR`` of a ``[B, T, heads, D]`` tensor for head ``i_h``, as fp32 (zeros past T)."""
    rows = row0 + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (rows < T)[:, None] & (o_d < D)[None, :]
    offs = ((i_b * T + rows.to(tl.int64)) * heads + i_h)[:, None] * D + o_d[None, :]
    return tl.load(ptr + offs, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _load_G_rows(G, i_b, row0, T, heads, i_h, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """Rows of the cumulative decay; rows past T repeat row T - 1 (padding is g = 0, an identity step), so
    every decay ratio stays <= 1 in the last, partial chunk."""
    rows = tl.minimum(row0 + tl.arange(0, BR), T - 1)
    o_d = tl.arange(0, BD)
    offs = ((i_b * T + rows.to(tl.int64)) * heads + i_h)[:, None] * D + o_d[None, :]
    return tl.load(G + offs, mask=(o_d < D)[None, :], other=0.0)


@triton.jit
def _load_row(ptr, i_b, row, T, heads, i_h, D: tl.constexpr, BD: tl.constexpr):
    o_d = tl.arange(0, BD)
    m = (o_d < D) & (row < T)
    return tl.load(ptr + ((i_b * T + row.to(tl.int64)) * heads + i_h) * D + o_d, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _load_G_row(G, i_b, row, T, heads, i_h, D: tl.constexpr, BD: tl.constexpr):
    o_d = tl.arange(0, BD)
    row = tl.minimum(row, T - 1)
    return tl.load(G + ((i_b * T + row.to(tl.int64)) * heads + i_h) * D + o_d, mask=o_d < D, other=0.0)


@triton.jit
def _intra_kernel(
    q, k, v, G, b, w, Y, U, Aqk, scale, T,
    H: tl.constexpr, HV: tl.constexpr, HG: tl.constexpr, HB: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, PRECISION: tl.constexpr,
    SAFE_SPREAD: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_hv = i_bh // HV, i_bh % HV
    i_h, i_hg, i_hb = i_hv // (HV // H), i_hv // (HV // HG), i_hv // (HV // HB)
    t0 = i_t * BT
    o_c = tl.arange(0, BC)

    # ---- decayed Grams by 16 x 16 blocks (4 x 4 blocks per chunk); lower-triangular, so block (i, j) with j <= i
    # T_ij: erase Gram (strictly lower in the diagonal blocks); Q_ij: read-out Gram (lower)
    T00 = tl.zeros([BC, BC], tl.float32)
    T10 = tl.zeros([BC, BC], tl.float32)
    T11 = tl.zeros([BC, BC], tl.float32)
    T20 = tl.zeros([BC, BC], tl.float32)
    T21 = tl.zeros([BC, BC], tl.float32)
    T22 = tl.zeros([BC, BC], tl.float32)
    T30 = tl.zeros([BC, BC], tl.float32)
    T31 = tl.zeros([BC, BC], tl.float32)
    T32 = tl.zeros([BC, BC], tl.float32)
    T33 = tl.zeros([BC, BC], tl.float32)
    for i in tl.static_range(4):
        r0 = t0 + i * BC
        Gi = _load_G_rows(G, i_b, r0, T, HG, i_hg, K, BC, BK)
        ki = _load_rows(k, i_b, r0, T, H, i_h, K, BC, BK)
        qi = _load_rows(q, i_b, r0, T, H, i_h, K, BC, BK) * scale
        bki = _load_rows(b, i_b, r0, T, HB, i_hb, K, BC, BK) * ki
        # diagonal block: one matrix product about the block's mid-point decay when its spread is small (every
        # factor <= exp(spread / 2)), otherwise pairwise, column by column (every exponent <= 0)
        G_top = _load_G_row(G, i_b, r0, T, HG, i_hg, K, BK)
        G_bot = _load_G_row(G, i_b, r0 + BC - 1, T, HG, i_hg, K, BK)
        if tl.max(tl.abs(G_top - G_bot), axis=0) < SAFE_SPREAD:
            mid = 0.5 * (G_top + G_bot)
            up = tl.exp(Gi - mid[None, :])
            kd = ki * tl.exp(mid[None, :] - Gi)
            lower = o_c[:, None] >= o_c[None, :]
            Td = tl.where(o_c[:, None] > o_c[None, :], tl.dot(bki * up, tl.trans(kd), input_precision=PRECISION),
                          0.0)
            Qd = tl.where(lower, tl.dot(qi * up, tl.trans(kd), input_precision=PRECISION), 0.0)
        else:
            Td = tl.zeros([BC, BC], tl.float32)
            Qd = tl.zeros([BC, BC], tl.float32)
            for c in range(BC):
                kc = _load_row(k, i_b, r0 + c, T, H, i_h, K, BK)
                Gc = _load_G_row(G, i_b, r0 + c, T, HG, i_hg, K, BK)
                below = (o_c >= c)[:, None]
                d = tl.exp(tl.where(below, Gi - Gc[None, :], float("-inf")))
                kd = kc[None, :] * d
                col_t = tl.where(o_c > c, tl.sum(bki * kd, axis=1), 0.0)
                col_q = tl.sum(qi * kd, axis=1)
                Td = tl.where(o_c[None, :] == c, col_t[:, None], Td)
                Qd = tl.where(o_c[None, :] == c, col_q[:, None], Qd)
        tl.store(Aqk + ((i_b * T + (r0 + o_c).to(tl.int64)) * HV + i_hv)[:, None] * BT + (i * BC + o_c)[None, :],
                 Qd, mask=((r0 + o_c) < T)[:, None])
        # off-diagonal blocks (i, j < i): decay about the last row of block j
        for j in tl.static_range(4):
            if j < i:
                rj = t0 + j * BC
                ref = _load_G_row(G, i_b, rj + BC - 1, T, HG, i_hg, K, BK)
                Gj = _load_G_rows(G, i_b, rj, T, HG, i_hg, K, BC, BK)
                kj = _load_rows(k, i_b, rj, T, H, i_h, K, BC, BK) * tl.exp(ref[None, :] - Gj)
                into = tl.exp(Gi - ref[None, :])
                Tij = tl.dot(bki * into, tl.trans(kj), input_precision=PRECISION)
                Qij = tl.dot(qi * into, tl.trans(kj), input_precision=PRECISION)
                tl.store(Aqk + ((i_b * T + (r0 + o_c).to(tl.int64)) * HV + i_hv)[:, None] * BT
                         + (j * BC + o_c)[None, :], Qij, mask=((r0 + o_c) < T)[:, None])
                if i == 1:
                    T10 = Tij
                elif i == 2:
                    if j == 0:
                        T20 = Tij
                    else:
                        T21 = Tij
                else:
                    if j == 0:
                        T30 = Tij
                    elif j == 1:
                        T31 = Tij
                    else:
                        T32 = Tij
        if i == 0:
            T00 = Td
        elif i == 1:
            T11 = Td
        elif i == 2:
            T22 = Td
        else:
            T33 = Td

    # ---- L^-1 for L = I + T: invert the unit lower diagonal blocks by forward substitution, then the blocks below
    I00 = _unit_lower_inverse(T00, BC)
    I11 = _unit_lower_inverse(T11, BC)
    I22 = _unit_lower_inverse(T22, BC)
    I33 = _unit_lower_inverse(T33, BC)
    I10 = -_dot(I11, _dot(T10, I00))
    I21 = -_dot(I22, _dot(T21, I11))
    I20 = -_dot(I22, _dot(T20, I00) + _dot(T21, I10))
    I32 = -_dot(I33, _dot(T32, I22))
    I31 = -_dot(I33, _dot(T31, I11) + _dot(T32, I21))
    I30 = -_dot(I33, _dot(T30, I00) + _dot(T31, I10) + _dot(T32, I20))

    # ---- Y = L^-1 (exp(G) b k), U = L^-1 (w v), one row block at a time (few tiles live at once)
    for i in tl.static_range(4):
        accY = tl.zeros([BC, BK], tl.float32)
        accU = tl.zeros([BC, BV], tl.float32)
        for j in tl.static_range(4):
            if j <= i:
                Iij = _pick(i, j, I00, I10, I11, I20, I21, I22, I30, I31, I32, I33)
                Ej, Zj = _rhs(k, b, G, v, w, i_b, t0 + j * BC, T, H, HB, HG, HV, i_h, i_hb, i_hg, i_hv, K, V, BC,
                              BK, BV)
                accY += tl.dot(Iij, Ej, input_precision=PRECISION)
                accU += tl.dot(Iij, Zj, input_precision=PRECISION)
        _store_rows(Y, accY, i_b, t0 + i * BC, T, HV, i_hv, K, BC, BK)
        _store_rows(U, accU, i_b, t0 + i * BC, T, HV, i_hv, V, BC, BV)
    # the read-out Gram above the diagonal blocks is zero
    for i in tl.static_range(4):
        for j in tl.static_range(4):
            if j > i:
                r0 = t0 + i * BC
                tl.store(Aqk + ((i_b * T + (r0 + o_c).to(tl.int64)) * HV + i_hv)[:, None] * BT
                         + (j * BC + o_c)[None, :], tl.zeros([BC, BC], tl.float32), mask=((r0 + o_c) < T)[:, None])


@triton.jit
def _dot(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _pick(i: tl.constexpr, j: tl.constexpr, I00, I10, I11, I20, I21, I22, I30, I31, I32, I33):
    """Block (i, j) of the lower block-triangular inverse (i, j known at compile time)."""
    if i == 0:
        return I00
    elif i == 1:
        if j == 0:
            return I10
        else:
            return I11
    elif i == 2:
        if j == 0:
            return I20
        elif j == 1:
            return I21
        else:
            return I22
    else:
        if j == 0:
            return I30
        elif j == 1:
            return I31
        elif j == 2:
            return I32
        else:
            return I33


@triton.jit
def _unit_lower_inverse(A, BC: tl.constexpr):
    """(I + A)^-1 for strictly lower ``A`` [BC, BC], row by row: X_r = e_r - sum_{c<r} A[r, c] X_c."""
    o = tl.arange(0, BC)
    X = tl.where(o[:, None] == o[None, :], 1.0, 0.0)
    for r in range(1, BC):
        a_r = tl.sum(tl.where(o[:, None] == r, A, 0.0), axis=0)  # row r of A
        x_r = tl.sum(a_r[:, None] * X, axis=0)
        X = tl.where(o[:, None] == r, X - x_r[None, :], X)
    return X


@triton.jit
def _rhs(k, b, G, v, w, i_b, r0, T, H, HB, HG, HV, i_h, i_hb, i_hg, i_hv, K: tl.constexpr, V: tl.constexpr,
         BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    kk = _load_rows(k, i_b, r0, T, H, i_h, K, BC, BK)
    E = tl.exp(_load_G_rows(G, i_b, r0, T, HG, i_hg, K, BC, BK)) * _load_rows(b, i_b, r0, T, HB, i_hb, K, BC, BK) * kk
    Z = _load_rows(v, i_b, r0, T, HV, i_hv, V, BC, BV) * _load_rows(w, i_b, r0, T, HV, i_hv, V, BC, BV)
    return E, Z


@triton.jit
def _store_rows(ptr, x, i_b, r0, T, heads, i_h, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    rows = r0 + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (rows < T)[:, None] & (o_d < D)[None, :]
    tl.store(ptr + ((i_b * T + rows.to(tl.int64)) * heads + i_h)[:, None] * D + o_d[None, :], x, mask=m)


@triton.jit
def _state_kernel(
    q, k, G, Y, U, Aqk, o, h0, ht, scale, T,
    H: tl.constexpr, HV: tl.constexpr, HG: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_hv = i_bh // HV, i_bh % HV
    i_h, i_hg = i_hv // (HV // H), i_hv // (HV // HG)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_t = tl.arange(0, BT)
    m_s = (o_k < K)[:, None] & (o_v < V)[None, :]
    p_s = o_k[:, None] * V + o_v[None, :]
    S = tl.zeros([BK, BV], tl.float32)
    if HAS_H0:
        S = tl.load(h0 + i_bh * K * V + p_s, mask=m_s, other=0.0).to(tl.float32)
    for i_t in range(tl.cdiv(T, BT)):
        t0 = i_t * BT
        rows = t0 + o_t
        m_r = rows < T
        Gt = _load_G_rows(G, i_b, t0, T, HG, i_hg, K, BT, BK)
        Yt = _load_rows(Y, i_b, t0, T, HV, i_hv, K, BT, BK)
        Ut = tl.load(U + ((i_b * T + rows.to(tl.int64)) * HV + i_hv)[:, None] * V + o_v[None, :],
                     mask=m_r[:, None] & (o_v < V)[None, :], other=0.0)
        R = Ut - tl.dot(Yt, S, input_precision=PRECISION)
        qt = _load_rows(q, i_b, t0, T, H, i_h, K, BT, BK) * scale
        At = tl.load(Aqk + ((i_b * T + rows.to(tl.int64)) * HV + i_hv)[:, None] * BT + o_t[None, :],
                     mask=m_r[:, None], other=0.0)
        ot = tl.dot(qt * tl.exp(Gt), S, input_precision=PRECISION) + tl.dot(At, R, input_precision=PRECISION)
        tl.store(o + ((i_b * T + rows.to(tl.int64)) * HV + i_hv)[:, None] * V + o_v[None, :],
                 ot.to(o.dtype.element_ty), mask=m_r[:, None] & (o_v < V)[None, :])
        # the last row of the chunk (or of the sequence) holds the chunk's total decay
        G_last = _load_G_row(G, i_b, t0 + BT - 1, T, HG, i_hg, K, BK)
        kt = _load_rows(k, i_b, t0, T, H, i_h, K, BT, BK) * tl.exp(G_last[None, :] - Gt)
        S = S * tl.exp(G_last)[:, None] + tl.dot(tl.trans(kt), R, input_precision=PRECISION)
    if STORE_HT:
        tl.store(ht + i_bh * K * V + p_s, S, mask=m_s)


def chunk_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
    scale: float, initial_state: torch.Tensor | None, output_final_state: bool,
    block_v: int = 32, num_warps: int = 4, num_stages: int = 2, out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked forward on validated, activated inputs ``[B, T, *, *]`` (no varlen); returns ``(o, final_state)``.

    Intermediates (G, Y, U and the read-out Gram) are fp32. ``block_v``, ``num_warps`` and ``num_stages`` set the
    state kernel's tiling (its loads are pipelined ``num_stages`` deep: 2 needs about 197 KB of shared memory at
    K = V = 128, 3 would not fit on an H100). ``out`` may supply the output buffer (tests poison it with NaN). No
    host synchronization.
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    if T == 0:
        h0 = torch.zeros(B, HV, K, V, device=q.device) if initial_state is None else initial_state.clone()
        return v.new_empty(B, 0, HV, V), (h0 if output_final_state else None)
    HG, HB = g.shape[2], b.shape[2]
    q, k, v, g, b, w = (x.contiguous() for x in (q, k, v, g, b, w))
    dev = q.device
    NT = triton.cdiv(T, BT)
    BK, BVfull = triton.next_power_of_2(K), triton.next_power_of_2(V)
    # fp32 inputs get fp32 products; bf16/fp16 inputs use tf32 tensor cores (error well under their rounding)
    precision = "ieee" if q.dtype in (torch.float32, torch.float64) else "tf32"
    G = torch.empty(B, T, HG, K, device=dev, dtype=torch.float32)
    _cumsum_kernel[(NT, B * HG)](g, G, T, HG=HG, K=K, BT=BT, BK=BK)
    Y = torch.empty(B, T, HV, K, device=dev, dtype=torch.float32)
    U = torch.empty(B, T, HV, V, device=dev, dtype=torch.float32)
    Aqk = torch.empty(B, T, HV, BT, device=dev, dtype=torch.float32)
    _intra_kernel[(NT, B * HV)](q, k, v, G, b, w, Y, U, Aqk, scale, T, H=H, HV=HV, HG=HG, HB=HB, K=K, V=V,
                                BK=BK, BV=BVfull, BT=BT, BC=BC, PRECISION=precision, SAFE_SPREAD=SAFE_SPREAD,
                                num_warps=num_warps)
    o = torch.empty_like(v) if out is None else out
    ht = torch.empty(B, HV, K, V, device=dev, dtype=torch.float32) if output_final_state else o
    BV = min(block_v, BVfull)
    _state_kernel[(triton.cdiv(V, BV), B * HV)](
        q, k, G, Y, U, Aqk, o, initial_state if initial_state is not None else o, ht, scale, T,
        H=H, HV=HV, HG=HG, K=K, V=V, BK=BK, BV=BV, BT=BT, HAS_H0=initial_state is not None,
        STORE_HT=output_final_state, num_warps=num_warps, num_stages=num_stages,
        PRECISION=precision,
    )
    return o, (ht if output_final_state else None)
