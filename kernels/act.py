"""Triton kernels for the GDN-2 op's input activations (the pre-pass before the chunked kernels) and their backward.

The op's options take raw inputs; one launch turns them into what the chunked kernels read:

    use_qk_l2norm:   q <- q / sqrt(sum_K q^2 + eps), k likewise       (rstd = 1 / sqrt(.) kept for the backward)
    use_gate:        g <- -exp(A_log[h]) * softplus(g + dt_bias[h, :])  (fp32)
    use_bw_sigmoid:  b <- erase_max * sigmoid(b),  w <- sigmoid(w)

and one launch gives the raw inputs' gradients from those of the activations (and ``A_log`` / ``dt_bias``'s as
per-program partial sums that the host adds in a fixed order: no float atomics):

    dq = rstd (dq_n - q_n sum_K(dq_n q_n))                 (from the normalized q_n and rstd: no raw q kept)
    dg = dg_a * (-exp(A_log)) * sigmoid(g + dt_bias)        dA_log = sum dg_a * g_a      ddt_bias = sum dg
    db = db_a * erase_max * s (1 - s),  s = sigmoid(b)      dw likewise (from the raw logits)

Grid: (block of ``BT`` tokens of the flattened ``B * T``, one (tensor, head) pair) on the second axis, covering the
heads of q and k (with the L2 norm), of g (with the gate), of b and w (with the sigmoid). Inputs may be strided
views (a head's channels may even have stride 0, as scalar gates expanded over a head come); outputs are dense
``[B, T, heads, D]``. Plain pointer arithmetic with masks, int64 offsets; runs in the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import buffers

__all__ = ["act_fwd", "act_bwd", "L2_EPS"]

L2_EPS = 1e-6
BLOCK_T = 64


@triton.jit
def _softplus(x):
    # log1p(exp(x)) in fp32 without overflow: above 20 it is x; log(v) * u / (v - 1) is log1p(u) to a rounding
    # (the plain log(1 + u) loses u where u is under the fp32 epsilon)
    u = tl.exp(tl.minimum(x, 20.0))
    v = 1.0 + u
    sp = tl.where(v == 1.0, u, tl.log(v) * (u / (v - 1.0)))
    return tl.where(x > 20.0, x, sp)


@triton.jit
def _offsets(n, T, s_b, s_t, s_h, s_d, h, o_d):
    """Element offsets ``[BT, BD]`` of tokens ``n`` (flattened ``b * T + t``) of head ``h`` in a strided tensor."""
    rows = (n // T) * s_b + (n % T) * s_t + h * s_h
    return rows[:, None] + o_d[None, :].to(tl.int64) * s_d


@triton.jit
def _dense(n, heads: tl.constexpr, h, D: tl.constexpr, o_d):
    return (n * heads + h)[:, None] * D + o_d[None, :]


@triton.jit
def _l2_fwd(x, y, rstd, n, m_n, m, T, s_b, s_t, s_h, s_d, h, heads: tl.constexpr, D: tl.constexpr, o_d, eps):
    v = tl.load(x + _offsets(n, T, s_b, s_t, s_h, s_d, h, o_d), mask=m, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(v * v, axis=1) + eps)
    tl.store(y + _dense(n, heads, h, D, o_d), (v * r[:, None]).to(y.dtype.element_ty), mask=m)
    tl.store(rstd + n * heads + h, r, mask=m_n)


@triton.jit
def _l2_bwd(y, rstd, dy, dx, n, m_n, m, heads: tl.constexpr, h, D: tl.constexpr, o_d):
    off = _dense(n, heads, h, D, o_d)
    yy = tl.load(y + off, mask=m, other=0.0).to(tl.float32)
    gy = tl.load(dy + off, mask=m, other=0.0).to(tl.float32)
    r = tl.load(rstd + n * heads + h, mask=m_n, other=0.0)
    gx = r[:, None] * (gy - yy * tl.sum(gy * yy, axis=1)[:, None])
    tl.store(dx + off, gx.to(dx.dtype.element_ty), mask=m)


@triton.jit
def _tokens(i_t, NTOK, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Block ``i_t``'s tokens (flattened ``b * T + t``, int64), the key and value channels and their masks."""
    n = i_t * BT + tl.arange(0, BT).to(tl.int64)
    o_k, o_v = tl.arange(0, BK), tl.arange(0, BV)
    return n, o_k, o_v, (n < NTOK)[:, None] & (o_k < K)[None, :], (n < NTOK)[:, None] & (o_v < V)[None, :]


@triton.jit
def _gate_input(g, A_log, dt_bias, n, m, T, s_b, s_t, s_h, s_d, s_ah, s_dh, s_dd, h, K: tl.constexpr, o_k,
                HAS_DT: tl.constexpr):
    """The decay pre-activation ``g + dt_bias`` (fp32 ``[BT, BK]``) of head ``h`` and its rate ``exp(A_log[h])``."""
    x = tl.load(g + _offsets(n, T, s_b, s_t, s_h, s_d, h, o_k), mask=m, other=0.0).to(tl.float32)
    if HAS_DT:
        x += tl.load(dt_bias + h * s_dh + o_k * s_dd, mask=o_k < K, other=0.0).to(tl.float32)[None, :]
    return x, tl.exp(tl.load(A_log + h * s_ah).to(tl.float32))


@triton.jit
def _act_fwd_kernel(
    q, k, g, b, w, qo, ko, go, bo, wo, rq, rk, A_log, dt_bias,
    sq_b, sq_t, sq_h, sq_d, sk_b, sk_t, sk_h, sk_d, sg_b, sg_t, sg_h, sg_d, sb_b, sb_t, sb_h, sb_d,
    sw_b, sw_t, sw_h, sw_d, s_ah, s_dh, s_dd, T, NTOK, erase_max, eps,
    H: tl.constexpr, HG: tl.constexpr, HB: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    L2: tl.constexpr, GATE: tl.constexpr, HAS_DT: tl.constexpr, BW: tl.constexpr,
):
    i_t, i_x = tl.program_id(0), tl.program_id(1)
    n, o_k, o_v, m_k, m_v = _tokens(i_t, NTOK, K, V, BT, BK, BV)
    if L2:
        if i_x < H:
            _l2_fwd(q, qo, rq, n, n < NTOK, m_k, T, sq_b, sq_t, sq_h, sq_d, i_x, H, K, o_k, eps)
        elif i_x < 2 * H:
            _l2_fwd(k, ko, rk, n, n < NTOK, m_k, T, sk_b, sk_t, sk_h, sk_d, i_x - H, H, K, o_k, eps)
        i_x -= 2 * H
    if GATE:
        if (i_x >= 0) & (i_x < HG):
            x, a = _gate_input(g, A_log, dt_bias, n, m_k, T, sg_b, sg_t, sg_h, sg_d, s_ah, s_dh, s_dd, i_x, K, o_k,
                               HAS_DT)
            tl.store(go + _dense(n, HG, i_x, K, o_k), -a * _softplus(x), mask=m_k)
        i_x -= HG
    if BW:
        if (i_x >= 0) & (i_x < HB):
            x = tl.load(b + _offsets(n, T, sb_b, sb_t, sb_h, sb_d, i_x, o_k), mask=m_k, other=0.0).to(tl.float32)
            tl.store(bo + _dense(n, HB, i_x, K, o_k), (erase_max * tl.sigmoid(x)).to(bo.dtype.element_ty), mask=m_k)
        elif (i_x >= HB) & (i_x < HB + HV):
            x = tl.load(w + _offsets(n, T, sw_b, sw_t, sw_h, sw_d, i_x - HB, o_v), mask=m_v, other=0.0)
            tl.store(wo + _dense(n, HV, i_x - HB, V, o_v), tl.sigmoid(x.to(tl.float32)).to(wo.dtype.element_ty),
                     mask=m_v)


@triton.jit
def _act_bwd_kernel(
    qn, kn, rq, rk, dqn, dkn, dq, dk, g, dga, dg, dA_part, ddt_part, A_log, dt_bias, b, dba, db, w, dwa, dw,
    sg_b, sg_t, sg_h, sg_d, sb_b, sb_t, sb_h, sb_d, sw_b, sw_t, sw_h, sw_d, s_ah, s_dh, s_dd, T, NTOK, erase_max,
    H: tl.constexpr, HG: tl.constexpr, HB: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    L2: tl.constexpr, GATE: tl.constexpr, HAS_DT: tl.constexpr, BW: tl.constexpr,
):
    i_t, i_x = tl.program_id(0), tl.program_id(1)
    n, o_k, o_v, m_k, m_v = _tokens(i_t, NTOK, K, V, BT, BK, BV)
    if L2:
        if i_x < H:
            _l2_bwd(qn, rq, dqn, dq, n, n < NTOK, m_k, H, i_x, K, o_k)
        elif i_x < 2 * H:
            _l2_bwd(kn, rk, dkn, dk, n, n < NTOK, m_k, H, i_x - H, K, o_k)
        i_x -= 2 * H
    if GATE:
        if (i_x >= 0) & (i_x < HG):
            x, a = _gate_input(g, A_log, dt_bias, n, m_k, T, sg_b, sg_t, sg_h, sg_d, s_ah, s_dh, s_dd, i_x, K, o_k,
                               HAS_DT)
            off = _dense(n, HG, i_x, K, o_k)
            d = tl.load(dga + off, mask=m_k, other=0.0).to(tl.float32)
            gx = tl.where(m_k, -a * d * tl.sigmoid(x), 0.0)
            tl.store(dg + off, gx.to(dg.dtype.element_ty), mask=m_k)
            # per-program partial sums: dA_log over the block's tokens and channels, dt_bias per channel
            tl.store(dA_part + i_t * HG + i_x, tl.sum(tl.sum(tl.where(m_k, -a * d * _softplus(x), 0.0), axis=1)))
            tl.store(ddt_part + (i_t * HG + i_x) * K + o_k, tl.sum(gx, axis=0), mask=o_k < K)
        i_x -= HG
    if BW:
        if (i_x >= 0) & (i_x < HB):
            x = tl.load(b + _offsets(n, T, sb_b, sb_t, sb_h, sb_d, i_x, o_k), mask=m_k, other=0.0).to(tl.float32)
            off = _dense(n, HB, i_x, K, o_k)
            s = tl.sigmoid(x)
            d = tl.load(dba + off, mask=m_k, other=0.0).to(tl.float32)
            tl.store(db + off, (d * erase_max * s * (1.0 - s)).to(db.dtype.element_ty), mask=m_k)
        elif (i_x >= HB) & (i_x < HB + HV):
            x = tl.load(w + _offsets(n, T, sw_b, sw_t, sw_h, sw_d, i_x - HB, o_v), mask=m_v, other=0.0)
            off = _dense(n, HV, i_x - HB, V, o_v)
            s = tl.sigmoid(x.to(tl.float32))
            d = tl.load(dwa + off, mask=m_v, other=0.0).to(tl.float32)
            tl.store(dw + off, (d * s * (1.0 - s)).to(dw.dtype.element_ty), mask=m_v)


def _strides(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def _dt_strides(dt_bias: torch.Tensor | None, K: int) -> tuple[int, int]:
    """(head, channel) strides of ``dt_bias`` given as ``[HG * K]`` or ``[HG, K]``."""
    if dt_bias is None:
        return 0, 0
    if dt_bias.dim() == 1:
        return K * dt_bias.stride(0), dt_bias.stride(0)
    return dt_bias.stride(0), dt_bias.stride(1)


def _grid(NTOK, H, HG, HB, HV, l2, gate, bw):
    return triton.cdiv(NTOK, BLOCK_T), (2 * H if l2 else 0) + (HG if gate else 0) + ((HB + HV) if bw else 0)


def act_fwd(
    q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
    A_log: torch.Tensor | None, dt_bias: torch.Tensor | None, l2: bool, gate: bool, bw: bool, erase_max: float,
) -> tuple[torch.Tensor | None, ...]:
    """One launch: ``(q_n, k_n, rstd_q, rstd_k)`` with ``l2``, ``g_a`` (fp32) with ``gate``, ``(b_a, w_a)`` with
    ``bw``; None for what an option does not produce. ``q, k`` ``[B, T, H, K]``, ``g, b`` ``[B, T, HG / HB, K]``,
    ``w`` ``[B, T, HV, V]`` (any strides); ``A_log`` ``[HG]``, ``dt_bias`` ``[HG * K]`` / ``[HG, K]`` or None.
    Outputs are dense, in the inputs' dtypes (g: fp32); ``rstd`` is fp32 ``[B, T, H]``."""
    B, T, H, K = q.shape
    HG, HB, HV, V = g.shape[2], b.shape[2], w.shape[2], w.shape[3]
    NTOK, dev = B * T, q.device
    qo = buffers.empty(B, T, H, K, device=dev, dtype=q.dtype) if l2 else None
    ko = buffers.empty(B, T, H, K, device=dev, dtype=k.dtype) if l2 else None
    rq = buffers.empty(B, T, H, device=dev, dtype=torch.float32) if l2 else None
    rk = buffers.empty(B, T, H, device=dev, dtype=torch.float32) if l2 else None
    go = buffers.empty(B, T, HG, K, device=dev, dtype=torch.float32) if gate else None
    bo = buffers.empty(B, T, HB, K, device=dev, dtype=b.dtype) if bw else None
    wo = buffers.empty(B, T, HV, V, device=dev, dtype=w.dtype) if bw else None
    grid = _grid(NTOK, H, HG, HB, HV, l2, gate, bw)
    if NTOK == 0 or grid[1] == 0:
        return qo, ko, rq, rk, go, bo, wo
    anyt = q
    _act_fwd_kernel[grid](
        q, k, g, b, w, *(anyt if t is None else t for t in (qo, ko, go, bo, wo, rq, rk, A_log, dt_bias)),
        *_strides(q), *_strides(k), *_strides(g), *_strides(b), *_strides(w),
        A_log.stride(0) if A_log is not None else 0, *_dt_strides(dt_bias, K), T, NTOK, float(erase_max), L2_EPS,
        H=H, HG=HG, HB=HB, HV=HV, K=K, V=V, BT=BLOCK_T, BK=triton.next_power_of_2(K), BV=triton.next_power_of_2(V),
        L2=l2, GATE=gate, HAS_DT=dt_bias is not None, BW=bw, num_warps=4,
    )
    return qo, ko, rq, rk, go, bo, wo


def act_bwd(
    qn, kn, rq, rk, dqn, dkn, g, dga, A_log, dt_bias, b, dba, w, dwa, erase_max: float,
) -> tuple[torch.Tensor | None, ...]:
    """One launch: ``(dq, dk, dg, dA_log, ddt_bias, db, dw)`` of the raw inputs from the activations' gradients.

    ``qn, kn, rq, rk`` as :func:`act_fwd` returned them and ``dqn, dkn`` their gradients (all None without the L2
    norm); ``g`` the raw gate input, ``dga`` the gradient of ``g_a`` (None without the gate); ``b, w`` the raw
    logits, ``dba, dwa`` the gradients of ``b_a, w_a`` (None without the sigmoid). Gradients come in the raw
    inputs' dtypes; ``dA_log`` and ``ddt_bias`` in those of ``A_log`` and ``dt_bias`` (summed in fp32)."""
    l2, gate, bw = qn is not None, g is not None, b is not None
    ref = qn if l2 else g if gate else b
    B, T = ref.shape[:2]
    H = qn.shape[2] if l2 else 1
    K = (qn if l2 else g if gate else b).shape[3]
    HG = g.shape[2] if gate else 1
    HB, HV, V = (b.shape[2], w.shape[2], w.shape[3]) if bw else (1, 1, 1)
    NTOK, dev = B * T, ref.device
    dq = buffers.empty(*qn.shape, device=dev, dtype=qn.dtype) if l2 else None
    dk = buffers.empty(*kn.shape, device=dev, dtype=kn.dtype) if l2 else None
    dg = buffers.empty(*g.shape, device=dev, dtype=g.dtype) if gate else None
    db = buffers.empty(*b.shape, device=dev, dtype=b.dtype) if bw else None
    dw = buffers.empty(*w.shape, device=dev, dtype=w.dtype) if bw else None
    grid = _grid(NTOK, H, HG, HB, HV, l2, gate, bw)
    dA_part = buffers.empty(grid[0], HG, device=dev, dtype=torch.float32) if gate else None
    ddt_part = buffers.empty(grid[0], HG, K, device=dev, dtype=torch.float32) if gate else None
    if NTOK > 0 and grid[1] > 0:
        dqn, dkn = (None if t is None else t.contiguous() for t in (dqn, dkn))
        dga, dba, dwa = (None if t is None else t.contiguous() for t in (dga, dba, dwa))
        anyt = ref
        _act_bwd_kernel[grid](
            *(anyt if t is None else t for t in (qn, kn, rq, rk, dqn, dkn, dq, dk, g, dga, dg, dA_part, ddt_part,
                                                 A_log, dt_bias, b, dba, db, w, dwa, dw)),
            *_strides(g), *_strides(b), *_strides(w), A_log.stride(0) if A_log is not None else 0,
            *_dt_strides(dt_bias, K), T, NTOK, float(erase_max),
            H=H, HG=HG, HB=HB, HV=HV, K=K, V=V, BT=BLOCK_T, BK=triton.next_power_of_2(K),
            BV=triton.next_power_of_2(V), L2=l2, GATE=gate, HAS_DT=dt_bias is not None, BW=bw, num_warps=4,
        )
    dA_log = ddt = None
    if gate:
        # the per-program partial sums, added in a fixed order
        dA_log = (dA_part.sum(0) if NTOK else torch.zeros(HG, device=dev)).to(A_log.dtype)
        if dt_bias is not None:
            ddt = ddt_part.sum(0) if NTOK else torch.zeros(HG, K, device=dev)
            ddt = ddt.reshape(dt_bias.shape).to(dt_bias.dtype)
    return dq, dk, dg, dA_log, ddt, db, dw
