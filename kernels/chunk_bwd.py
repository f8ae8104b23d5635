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

from . import buffers
from .bwd_intra import _dg_kernel, _dgram_chunk_kernel, _dgram_kernel, _dk_kernel
from .bwd_state import _dstate_kernel, _dv_kernel
from .tiles import BC, BT, SAFE_SPREAD
from .tiling import BwdTiling

__all__ = ["chunk_bwd"]


def _group_sum(x: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-value-head gradients ``[B, T, HV, D]`` summed over the value heads that share an input head."""
    B, T, HV, D = x.shape
    if heads != HV:
        x = x.view(B, T, heads, HV // heads, D).sum(3)
    return x.to(dtype)


def chunk_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
    scale: float, saved: dict, do: torch.Tensor, dht: torch.Tensor | None, need_dh0: bool,
    chunk_lo: torch.Tensor | None = None, chunk_hi: torch.Tensor | None = None, tiling: BwdTiling | None = None,
) -> tuple[torch.Tensor, ...]:
    """Gradients ``(dq, dk, dv, dg, db, dw, dh0)`` of the chunked forward from what ``chunk_fwd(..., save=True)``
    kept (``saved``), the output gradient ``do`` and the final-state gradient ``dht`` (None: zero). ``dh0`` is
    None unless ``need_dh0``. Gradients come in the inputs' dtypes; ``dh0`` is fp32. No host synchronization.
    ``tiling``: :class:`~gdn2ts.kernels.tiling.BwdTiling` (its defaults were measured on an H100)."""
    t = BwdTiling() if tiling is None else tiling
    block_v, num_warps, num_stages, intra_warps, dk_block_v, gram_warps = (
        t.block_v, t.num_warps, t.num_stages, t.intra_warps, t.dk_block_v, t.gram_warps)
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
    alloc = (lambda *shape, device, dtype: torch.zeros(shape, device=device, dtype=dtype)) if varlen else buffers.empty
    # the per-chunk state gradients are kept in the dtype the forward kept the chunk states in
    dSn = alloc(B, NT, HV, K, V, device=dev, dtype=h.dtype)
    dR = alloc(B, T, HV, V, device=dev, dtype=f32)
    N = chunk_lo.numel() if varlen else B
    # (varlen: sequences with no token pass their final-state gradient straight to their initial state)
    dh0 = (dht.clone() if dht is not None else torch.zeros(N, HV, K, V, device=dev)) if need_dh0 and varlen else \
        buffers.empty(B, HV, K, V, device=dev, dtype=f32) if need_dh0 else None
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
        return buffers.empty(B, T, HV, D, device=dev, dtype=dtype if heads_in == HV else f32)

    dv = buffers.empty(*v.shape, device=dev, dtype=v.dtype)
    dw = buffers.empty(*w.shape, device=dev, dtype=w.dtype)
    dAqk = buffers.empty(B, T, HV, BT, device=dev, dtype=f32)
    dAkv = buffers.empty(B, T, HV, BT, device=dev, dtype=f32)
    _dv_kernel[(NT, B * HV)](v, w, U, R, dR, do, Linv, dv, dw, dAqk, dAkv, T, HV=HV, V=V, BV=min(64, BVfull), BT=BT,
                             PRECISION=precision, num_warps=intra_warps)

    BKB = min(64, BK)
    NKB = triton.cdiv(K, BKB)
    P = buffers.empty(NKB, B, T, HV, BT, device=dev, dtype=f32)
    dq_part, dbk_part, dk_part, dg_part = (buffers.empty(B, T, HV, K, device=dev, dtype=f32) for _ in range(4))
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
