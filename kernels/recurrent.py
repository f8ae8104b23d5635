"""Triton kernel for the GDN-2 step (decode and streaming): a few tokens for each of N sequences.

One program owns one (sequence, value head, value block): it loads its ``[K, BV]`` slice of the state once (fp32
in registers, from a state, a state pool slot or zeros), runs the sequence's tokens through it, and writes the
slice back once (in place into the pool slot when one is given), or after every token into the slots of a
per-token table (speculative decoding). States may be laid out ``[K, V]`` or ``[V, K]``. Plain pointer
arithmetic with masks, int64 offsets, no ``tl.make_block_ptr``: it runs on triton 3.6 through 3.9 and in the
interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["recurrent_fwd"]


@triton.jit
def _softplus(x):
    # log(1 + exp(x)) without overflow; above 20 it equals x in fp32
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _recurrent_fwd_kernel(
    q, k, v, g, b, w, o, h0, ht, A_log, dt_bias, cu_seqlens, slots, accepted,
    scale, T, slot_cols,
    H: tl.constexpr, HV: tl.constexpr, HG: tl.constexpr, HB: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
    USE_L2NORM: tl.constexpr, USE_GATE: tl.constexpr, HAS_DT_BIAS: tl.constexpr, USE_BW_SIGMOID: tl.constexpr,
    ERASE_MAX: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr,
    USE_SLOTS: tl.constexpr, PER_TOKEN: tl.constexpr, SPEC: tl.constexpr, INPLACE: tl.constexpr,
    STATE_V_FIRST: tl.constexpr, EVICT: tl.constexpr,
):
    """``USE_SLOTS``: the state comes from a pool row ``slots[n]`` (-1: zeros); with ``PER_TOKEN`` the slots are a
    table ``[N, slot_cols]``: the state comes from ``slots[n, accepted[n] - 1]`` (``SPEC``) or ``slots[n, 0]``, and
    the state after token j is stored to ``slots[n, j]`` (-1: not stored). ``INPLACE`` stores into the pool
    (``ht`` is the pool), otherwise into row n of ``ht`` (row ``bos + j``, the token, with ``PER_TOKEN``).
    ``STATE_V_FIRST``: states are laid out ``[V, K]``."""
    i_nh = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1)
    i_n = i_nh // HV
    i_hv = i_nh % HV
    i_h = i_hv // (HV // H)  # key head of this value head
    i_hg = i_hv // (HV // HG)  # head of g (HG is H or HV)
    i_hb = i_hv // (HV // HB)  # head of b
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n * T
        eos = bos + T

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    if STATE_V_FIRST:
        p_state = o_v[None, :] * K + o_k[:, None]
    else:
        p_state = o_k[:, None] * V + o_v[None, :]

    if USE_SLOTS:
        if PER_TOKEN:
            col = 0
            if SPEC:
                col = tl.maximum(tl.load(accepted + i_n).to(tl.int64) - 1, 0)
            slot = tl.load(slots + i_n * slot_cols + col).to(tl.int64)
        else:
            slot = tl.load(slots + i_n).to(tl.int64)
        has_slot = slot >= 0
        row = tl.maximum(slot, 0)
    else:
        has_slot = True
        row = i_n
    h = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        h = tl.load(h0 + (row * HV + i_hv) * K * V + p_state, mask=m_h & has_slot, other=0.0,
                    eviction_policy=EVICT).to(tl.float32)

    if USE_GATE:
        rate = tl.exp(tl.load(A_log + i_hg).to(tl.float32))
        if HAS_DT_BIAS:
            bias = tl.load(dt_bias + i_hg * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    for t in range(bos, eos):
        b_q = tl.load(q + (t * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(k + (t * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_g = tl.load(g + (t * HG + i_hg) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_b = tl.load(b + (t * HB + i_hb) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + (t * HV + i_hv) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_w = tl.load(w + (t * HV + i_hv) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        if USE_L2NORM:
            b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + 1e-6)
            b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + 1e-6)
        if USE_GATE:
            if HAS_DT_BIAS:
                b_g = b_g + bias
            b_g = tl.where(m_k, -rate * _softplus(b_g), 0.0)
        if USE_BW_SIGMOID:
            b_b = tl.where(m_k, ERASE_MAX * tl.sigmoid(b_b), 0.0)
            b_w = tl.sigmoid(b_w)
        # decay, read what the erase gate selects, write the gated correction, read out
        h = h * tl.exp(b_g)[:, None]
        r = tl.sum((b_b * b_k)[:, None] * h, axis=0)
        u = b_w * b_v - r
        h = h + b_k[:, None] * u[None, :]
        b_o = tl.sum((b_q * scale)[:, None] * h, axis=0)
        tl.store(o + (t * HV + i_hv) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
        if PER_TOKEN:
            # every token's state (speculative decoding keeps one per draft token)
            if INPLACE:
                dst = tl.load(slots + i_n * slot_cols + (t - bos)).to(tl.int64)
                tl.store(ht + (tl.maximum(dst, 0) * HV + i_hv) * K * V + p_state, h.to(ht.dtype.element_ty),
                         mask=m_h & (dst >= 0), eviction_policy=EVICT)
            else:
                tl.store(ht + (t * HV + i_hv) * K * V + p_state, h.to(ht.dtype.element_ty), mask=m_h)

    if STORE_HT and not PER_TOKEN:
        if USE_SLOTS and INPLACE:
            tl.store(ht + (row * HV + i_hv) * K * V + p_state, h.to(ht.dtype.element_ty), mask=m_h & has_slot,
                     eviction_policy=EVICT)
        else:
            tl.store(ht + (i_n * HV + i_hv) * K * V + p_state, h.to(ht.dtype.element_ty), mask=m_h,
                     eviction_policy=EVICT)


def recurrent_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
    scale: float, initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
    state_indices: torch.Tensor | None, use_qk_l2norm: bool = False, A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None, use_bw_sigmoid: bool = False, erase_max: float = 1.0,
    block_v: int | None = None, num_warps: int = 4, evict: str = "", out: torch.Tensor | None = None,
    out_state: torch.Tensor | None = None, num_accepted_tokens: torch.Tensor | None = None, inplace: bool = True,
    state_v_first: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the step kernel on validated inputs (see ``gdn2ts.ops.recurrent_gdn2`` for the contract).

    Returns ``(o, state)``: with ``state_indices`` (``[N]``, or a per-token table ``[N, S]`` read from column
    ``num_accepted_tokens - 1``) and ``inplace`` the state is the pool itself, updated in place; otherwise a new fp32
    tensor (or ``out_state``): ``[N, HV, K, V]``, or with a table every token's state ``[B * T, HV, K, V]``. With
    ``state_v_first`` every state is laid out ``[..., V, K]``. ``block_v``, ``num_warps`` and ``evict`` (a cache
    eviction policy for the state, e.g. ``"evict_first"``) override the tiling for tuning. ``out`` may supply the output
    buffer (tests poison it with NaN to catch unwritten elements). No host synchronization: the launch can be
    captured in a CUDA graph.
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    q, k, v, g, b, w = (x.contiguous() for x in (q, k, v, g, b, w))
    # (the kernel indexes A_log and dt_bias as dense vectors: a broadcast view is materialized)
    A_log, dt_bias = (None if t is None else t.contiguous() for t in (A_log, dt_bias))
    o = torch.empty_like(v) if out is None else out
    if initial_state is not None and not (state_indices is not None and inplace):
        initial_state = initial_state.contiguous()  # read only: the kernel addresses a dense [rows, HV, K, V]
    per_token = state_indices is not None and state_indices.dim() == 2
    if per_token:
        state_indices = state_indices.contiguous()  # the kernel reads row n's column j at n * S + j
    if state_indices is not None and inplace:
        ht = initial_state
    elif out_state is not None:
        ht = out_state
    else:
        rows = B * T if per_token else N
        ht = torch.empty(rows, HV, *((V, K) if state_v_first else (K, V)), dtype=torch.float32, device=q.device)
    BK = triton.next_power_of_2(K)
    # Many streams: whole [K, V] tiles (H100, N = 4096, K = V = 128: 2.9 TB/s of state traffic against 2.6 with
    # [K, 32]); few streams: narrower tiles so that more programs share the latency. A tile stays <= 16K floats.
    widest = min(triton.next_power_of_2(V), max(16, 16384 // BK))
    BV = block_v or (widest if N * HV >= 2048 else min(32, widest))
    grid = (N * HV, triton.cdiv(V, BV))
    dummy = o
    _recurrent_fwd_kernel[grid](
        q, k, v, g, b, w, o,
        initial_state if initial_state is not None else dummy, ht,
        A_log if A_log is not None else dummy, dt_bias if dt_bias is not None else dummy,
        cu_seqlens if cu_seqlens is not None else dummy, state_indices if state_indices is not None else dummy,
        num_accepted_tokens if num_accepted_tokens is not None else dummy,
        scale, T, state_indices.stride(0) if per_token else 0,
        H=H, HV=HV, HG=g.shape[2], HB=b.shape[2], K=K, V=V, BK=BK, BV=BV,
        USE_L2NORM=use_qk_l2norm, USE_GATE=A_log is not None, HAS_DT_BIAS=dt_bias is not None,
        USE_BW_SIGMOID=use_bw_sigmoid, ERASE_MAX=float(erase_max), HAS_H0=initial_state is not None,
        STORE_HT=True, IS_VARLEN=cu_seqlens is not None, USE_SLOTS=state_indices is not None, PER_TOKEN=per_token,
        SPEC=num_accepted_tokens is not None, INPLACE=inplace, STATE_V_FIRST=state_v_first, EVICT=evict,
        num_warps=num_warps,
    )
    return o, ht
