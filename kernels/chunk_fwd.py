"""Triton kernels for the chunked GDN-2 forward (prefill and inference), fixed-length or chunk-aligned packed batches.

Launches over chunks of 64 tokens (notation of ``docs/gdn2.md``):

1. ``_cumsum_kernel``: ``G`` = in-chunk cumulative log-decay, fp32.
2. ``_gram_kernel``, one program per (16-row block, chunk, value head): the decayed Grams ``T`` (erase) and
   ``A_qk`` (read-out). Blocks left of the diagonal take the decay about the last position of their column block, a
   diagonal block about its mid-point, so no factor overflows (a diagonal block whose decay spreads too far for
   that is left to the inverse launch, which forms it pairwise). It also writes the decayed erase keys
   ``E = exp(G) b k`` and, for the sequential pass, the decayed queries and tail keys.
3. ``_inverse_kernel``: the far-spread diagonal blocks, then ``L^-1 = (I + T)^-1`` by blocked forward
   substitution.
4. ``_wy_kernel`` (training, and when asked for): ``Y = L^-1 E`` and ``U = L^-1 (w v)``, in programs of their
   own.
5. ``_state_kernel``, one program per (sequence, value head, value block): the sequential state passing
   ``R = U - Y S`` (or, for 16-bit inference, without the WY launch, ``R = L^-1 (w v - E S)``),
   ``O = (exp(G) q) S + A_qk R``, ``S <- exp(G_C) S + (exp(G_C - G) k)^T R``; for 16-bit inference its products
   run on 16-bit operands (fp32 accumulation and state).

Plain pointer arithmetic with masks, int64 offsets, no ``tl.make_block_ptr``.
"""

from __future__ import annotations

import torch
import triton

from .fwd_gram import _cumsum_kernel, _gram_kernel
from .fwd_inverse import _inverse_kernel
from .fwd_state import _state_kernel, _wy_kernel
from .tiles import BC, BT, SAFE_SPREAD
from .tiling import FwdTiling

__all__ = ["chunk_fwd"]

def chunk_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
    scale: float, initial_state: torch.Tensor | None, output_final_state: bool, save: bool = False,
    chunk_lo: torch.Tensor | None = None, chunk_hi: torch.Tensor | None = None, out: torch.Tensor | None = None,
    tiling: FwdTiling | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None] | tuple[torch.Tensor, torch.Tensor | None, dict]:
    """Chunked forward on validated, activated inputs ``[B, T, *, *]``; returns ``(o, final_state)``.

    ``tiling`` (:class:`~gdn2ts.kernels.tiling.FwdTiling`) holds the launch shapes and storage forms; the fields
    left at ``None`` are chosen here (the choices measured fastest on an H100, ``docs/performance.md``):

    - ``lowp`` (the default for 16-bit inputs without ``save``): the sequential pass runs its products on 16-bit
      operands, the input dtype: the decayed queries and tail keys (``decayed_qk``), ``Y``, the read-out Gram
      ``A_qk`` and ``U`` are stored in it, and the state and the corrections are rounded to it for the products
      only (fp32 accumulation, fp32 state). Otherwise the intermediates are fp32 (``key_dtype``, ``u_dtype``) and
      16-bit inputs get tf32 products.
    - ``decayed_qk``: the Gram launch also writes the decayed read-out queries ``scale * exp(G) q`` and tail keys
      ``exp(G_C - G) k``, which the sequential passes load instead of q, k and G (16-bit for 16-bit inputs).
    - ``block_v`` / ``num_stages``: the state kernel's value block and load pipelining, by the number of
      (sequence, value head) pairs: wide blocks when there are many, narrow ones (more programs) when few.
    - ``fused_wy`` (the default with ``lowp``; never with ``save``): no WY launch; the state kernel forms the
      corrections as ``R = L^-1 (w v - E S)`` from the decayed erase keys (in ``key_dtype`` with ``lowp``) and
      ``L^-1``: one more in-chunk product per chunk on the sequential path, two fewer stored intermediates.
    - ``linv_dtype`` (by default ``key_dtype`` with ``fused_wy`` and ``lowp``, else fp32; 16 bits never with
      ``save``): the dtype ``L^-1`` is stored in; the state pass's product with it runs on that dtype (tf32 for
      fp32). fp32 with ``lowp`` takes 64-wide value blocks: narrower ones exceed the H100's shared memory and are
      refused.
    - ``akk_dtype`` (fp32, or fp16): the erase Gram's storage between the Gram launch and the inverse, which reads
      it into fp32.

    ``out`` may supply the output buffer (tests poison it with NaN). ``save=True`` also returns what ``chunk_bwd``
    needs (a dict of intermediates); ``tiling.saved_state_dtype`` is the dtype of the chunk entry states it keeps
    (the backward keeps their gradients in the same dtype). ``chunk_lo`` / ``chunk_hi`` (int32 ``[N]``, on the
    device) make the call varlen: ``B == 1``, sequence ``n`` fills chunks ``chunk_lo[n] .. chunk_hi[n]`` (each
    sequence starts on a chunk boundary; padding between sequences must be identity steps, zero ``g``, ``b``,
    ``w``), the initial and final states are ``[N, HV, K, V]`` (see ``gdn2ts.ops.gdn2.chunk_triton``). No host
    synchronization.
    """
    t = FwdTiling() if tiling is None else tiling
    block_v, num_warps, num_stages, gram_warps, gram_stages = (t.block_v, t.num_warps, t.num_stages, t.gram_warps,
                                                               t.gram_stages)
    inverse_warps, inverse_rows_from_memory, wy_warps = t.inverse_warps, t.inverse_rows_from_memory, t.wy_warps
    decayed_qk, lowp, key_dtype, u_dtype, fused_wy = t.decayed_qk, t.lowp, t.key_dtype, t.u_dtype, t.fused_wy
    linv_dtype, akk_dtype, saved_state_dtype = t.linv_dtype, t.akk_dtype, t.saved_state_dtype
    half = q.dtype in (torch.bfloat16, torch.float16)
    if lowp is None:
        lowp = half and not save and decayed_qk is not False and key_dtype is None
    if decayed_qk is None:
        decayed_qk = lowp
    if key_dtype is None:
        key_dtype = q.dtype if lowp else torch.float32
    if u_dtype is None:
        u_dtype = q.dtype if lowp else torch.float32
    if fused_wy is None:
        fused_wy = lowp and not save
    if linv_dtype is None:
        linv_dtype = key_dtype if fused_wy and lowp else torch.float32
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    if T == 0:
        h0 = torch.zeros(B, HV, K, V, device=q.device) if initial_state is None else initial_state.clone()
        if save:
            raise ValueError("chunk_fwd: save=True needs at least one token")
        return v.new_empty(B, 0, HV, V), (h0 if output_final_state else None)
    if lowp and not (decayed_qk and key_dtype in (torch.bfloat16, torch.float16)):
        raise ValueError("chunk_fwd: lowp=True needs decayed_qk=True and key_dtype bfloat16 or float16")
    if fused_wy and save:
        raise ValueError("chunk_fwd: fused_wy=True is an inference form; the backward needs Y and U (save=True)")
    if akk_dtype is None:  # the erase Gram, read by the inverse only (fp16 measured no faster on the H100)
        akk_dtype = torch.float32
    if akk_dtype not in (torch.float32, torch.float16):
        raise ValueError(f"chunk_fwd: akk_dtype {akk_dtype} is not float32 or float16")
    if linv_dtype not in (torch.float32, torch.bfloat16, torch.float16) or (linv_dtype != torch.float32 and save):
        raise ValueError(f"chunk_fwd: linv_dtype {linv_dtype} is not float32, or bfloat16/float16 without save")
    # an fp32 L^-1 in the 16-bit state pass: value blocks under 64 need more shared memory than the H100 has (one
    # such tiling faulted the device), so they are refused and the automatic choice stays at 64
    wide_linv = fused_wy and lowp and linv_dtype == torch.float32
    if wide_linv and block_v is not None and block_v < min(64, triton.next_power_of_2(v.shape[3])):
        raise ValueError(f"chunk_fwd: an fp32 L^-1 in the 16-bit state pass needs block_v >= 64, got {block_v}")
    HG, HB = g.shape[2], b.shape[2]
    q, k, v, g, b, w = (x.contiguous() for x in (q, k, v, g, b, w))
    dev = q.device
    NT = triton.cdiv(T, BT)
    BK, BVfull = triton.next_power_of_2(K), triton.next_power_of_2(V)
    # fp32 inputs get fp32 products; bf16/fp16 inputs use tf32 tensor cores (error well under their rounding)
    precision = "ieee" if q.dtype in (torch.float32, torch.float64) else "tf32"
    G = torch.empty(B, T, HG, K, device=dev, dtype=torch.float32)
    _cumsum_kernel[(NT, B * HG)](g, G, T, HG=HG, K=K, BT=BT, BK=BK)
    qk_dtype = torch.float16 if q.dtype in (torch.bfloat16, torch.float16) else torch.float32
    if lowp:
        qk_dtype = key_dtype
    QG = torch.empty(B, T, HV, K, device=dev, dtype=qk_dtype) if decayed_qk else G
    KT = torch.empty(B, T, HV, K, device=dev, dtype=qk_dtype) if decayed_qk else G
    # fused_wy: no Y and U (the state kernel forms the corrections from E and L^-1)
    Y = torch.empty(0 if fused_wy else B, T, HV, K, device=dev, dtype=key_dtype)
    U = torch.empty(0 if fused_wy else B, T, HV, V, device=dev, dtype=u_dtype)
    Aqk = torch.empty(B, T, HV, BT, device=dev, dtype=key_dtype)
    Akk = torch.empty(B, T, HV, BT, device=dev, dtype=akk_dtype)
    Linv = torch.empty(B, T, HV, BT, device=dev, dtype=linv_dtype)
    # E is read by a tf32 product (WY launch) or, fused with lowp, by a 16-bit product with the rounded state
    e_dtype = key_dtype if fused_wy and lowp else torch.float16 if half else torch.float32
    E = torch.empty(B, T, HV, K, device=dev, dtype=e_dtype)
    gram_args = (q, k, G, b, Akk, Aqk, QG, KT, E, scale, T)
    gram_consts = dict(H=H, HV=HV, HG=HG, HB=HB, K=K, BK=BK, BT=BT, BC=BC, PRECISION=precision,
                       SAFE_SPREAD=SAFE_SPREAD, DECAYED_QK=decayed_qk, num_warps=gram_warps, num_stages=gram_stages)
    _gram_kernel[(NT * (BT // BC), B * HV)](*gram_args, **gram_consts)
    _inverse_kernel[(NT, B * HV)](q, k, G, b, Akk, Aqk, Linv, scale, T, H=H, HV=HV, HG=HG, HB=HB, K=K, BK=BK, BT=BT,
                                  BC=BC, SAFE_SPREAD=SAFE_SPREAD, ROWS_FROM_MEMORY=inverse_rows_from_memory,
                                  num_warps=inverse_warps)
    del Akk
    if not fused_wy:
        BVw = min(128, BVfull)
        _wy_kernel[(NT, B * HV, 1 + triton.cdiv(V, BVw))](E, v, w, Linv, Y, U, T, HV=HV, K=K, V=V, BK=BK, BV=BVw,
                                                           BT=BT, PRECISION=precision, num_warps=wy_warps)
        del E
    varlen = chunk_lo is not None
    # varlen: rows past the last sequence's chunks are never run; zeros there (not stale memory) keep every
    # output deterministic
    alloc = torch.zeros if varlen else torch.empty
    o = alloc(v.shape, device=dev, dtype=v.dtype) if out is None else out
    N = chunk_lo.numel() if varlen else B
    if varlen and output_final_state:
        # sequences with no token keep their initial state (no program stores for them)
        ht = initial_state.clone() if initial_state is not None else torch.zeros(N, HV, K, V, device=dev)
    else:
        ht = torch.empty(B, HV, K, V, device=dev, dtype=torch.float32) if output_final_state else o
    # by default 32, and with few (sequence, head) pairs narrower value blocks put more programs on the sequential
    # state passing; an explicit block_v is taken as given
    pairs = N * HV
    if lowp:  # measured on an H100 at K = V = 128 (docs/performance.md): 2048 x 8 is 128 pairs, 16384 x 1 is 16
        auto_bv, auto_stages = ((64, 1) if pairs >= 128 else (64, 2) if pairs >= 64 else (32, 3) if pairs >= 32
                                else (16, 3))
    else:
        auto_bv, auto_stages = (32 if pairs * triton.cdiv(V, 32) >= 256 else 16), 2
    if wide_linv:
        auto_bv, auto_stages = 64, 1
    BV = min(auto_bv if block_v is None else block_v, BVfull)
    num_stages = auto_stages if num_stages is None else num_stages
    h = alloc(B, NT, HV, K, V, device=dev, dtype=saved_state_dtype) if save else o
    Rs = alloc(B, T, HV, V, device=dev, dtype=torch.float32) if save else o
    _state_kernel[(triton.cdiv(V, BV), N * HV)](
        q, k, G, Y, U, Aqk, o, initial_state if initial_state is not None else o, ht, h, Rs, QG, KT,
        E if fused_wy else o, v, w, Linv, chunk_lo if varlen else o, chunk_hi if varlen else o, scale, T,
        H=H, HV=HV, HG=HG, K=K, V=V, BK=BK, BV=BV, BT=BT, HAS_H0=initial_state is not None,
        STORE_HT=output_final_state, SAVE=save, num_warps=num_warps,
        num_stages=num_stages, PRECISION=precision, DECAYED_QK=decayed_qk, VARLEN=varlen,
        LOWP=lowp, FUSED_WY=fused_wy, LINV_16=Linv.dtype != torch.float32,
    )
    if save:
        saved = dict(G=G, Y=Y, U=U, Aqk=Aqk, Linv=Linv, h=h, R=Rs)
        if decayed_qk:
            saved.update(qg=QG, kt=KT)
        return o, (ht if output_final_state else None), saved
    return o, (ht if output_final_state else None)
