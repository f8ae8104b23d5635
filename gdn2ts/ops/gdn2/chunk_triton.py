"""The Triton chunked path as torch.library custom ops (``gdn2ts::chunk_fwd_train`` with its autograd,
``gdn2ts::chunk_bwd``, and the inference-only ``gdn2ts::chunk_fwd``): the ``chunk_fwd`` forward (keeping what the
backward needs only when a gradient is wanted) and the ``chunk_bwd`` backward; packed sequences (``cu_seqlens``)
by a chunk-aligned re-layout, computed on the device (no host synchronization)."""

from __future__ import annotations

import torch

__all__ = ["chunk_layout", "triton_chunk", "triton_chunk_states"]

BT = 64  # the kernels' chunk

_F32 = torch.float32
_FWD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor g, Tensor b, Tensor w, Tensor? h0, float scale, "
               "bool output_final_state, Tensor? chunk_lo, Tensor? chunk_hi) -> Tensor[]")


# The kernels run as torch.library custom ops: torch.compile keeps them whole in its graph (no graph break at each
# layer, and inductor never re-traces the Triton launches), and the fake functions below give it their outputs'
# shapes. The ops return lists; a final state that was not asked for is an empty fp32 tensor.
def _fwd_train_impl(q, k, v, g, b, w, h0, scale, output_final_state, chunk_lo, chunk_hi):
    from gdn2ts.kernels.chunk_fwd import chunk_fwd
    from gdn2ts.kernels.tiling import FwdTiling

    # the storage forms of _saved_table
    half = q.dtype in (torch.bfloat16, torch.float16)
    tiling = FwdTiling(decayed_qk=True, wy_warps=8, saved_state_dtype=torch.bfloat16 if half else _F32)
    o, ht, saved = chunk_fwd(q, k, v, g, b, w, scale, h0, output_final_state, save=True, chunk_lo=chunk_lo,
                             chunk_hi=chunk_hi, tiling=tiling)
    ht = q.new_empty(0, dtype=_F32) if ht is None else ht
    return [o, ht, *(saved[n] for n in _SAVED)]


def _saved_table(q, v, g) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """What the training forward keeps for the backward, by name: ``(shape, dtype)``, the one description that the
    fake (meta) function builds from. 16-bit inputs keep the chunk states in bf16 (as the inputs' own precision:
    it keeps forward + backward memory under FLA's) and the decayed queries and tail keys in fp16, which the
    backward's sequential passes load instead of q, k and G (8-13 % less backward time on an H100)."""
    B, T, _, K = q.shape
    HG, HV, V = g.shape[2], v.shape[2], v.shape[3]
    NT = (T + BT - 1) // BT
    half = q.dtype in (torch.bfloat16, torch.float16)
    keys = torch.float16 if half else _F32
    return {"G": ((B, T, HG, K), _F32), "Y": ((B, T, HV, K), _F32), "U": ((B, T, HV, V), _F32),
            "Aqk": ((B, T, HV, BT), _F32), "Linv": ((B, T, HV, BT), _F32),
            "h": ((B, NT, HV, K, V), torch.bfloat16 if half else _F32), "R": ((B, T, HV, V), _F32),
            "qg": ((B, T, HV, K), keys), "kt": ((B, T, HV, K), keys)}


_SAVED = ("G", "Y", "U", "Aqk", "Linv", "h", "R", "qg", "kt")


def _fwd_train_fake(q, k, v, g, b, w, h0, scale, output_final_state, chunk_lo, chunk_hi):
    B, _, _, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    N = B if chunk_lo is None else chunk_lo.shape[0]
    ht = q.new_empty((N, HV, K, V) if output_final_state else (0,), dtype=_F32)
    saved = [q.new_empty(shape, dtype=dtype) for shape, dtype in _saved_table(q, v, g).values()]
    return [torch.empty_like(v, memory_format=torch.contiguous_format), ht, *saved]


def _fwd_infer_impl(q, k, v, g, b, w, h0, scale, output_final_state, chunk_lo, chunk_hi):
    from gdn2ts.kernels.chunk_fwd import chunk_fwd

    o, ht = chunk_fwd(q, k, v, g, b, w, scale, h0, output_final_state, chunk_lo=chunk_lo, chunk_hi=chunk_hi)
    return [o, q.new_empty(0, dtype=_F32) if ht is None else ht]


def _fwd_infer_fake(q, k, v, g, b, w, h0, scale, output_final_state, chunk_lo, chunk_hi):
    return _fwd_train_fake(q, k, v, g, b, w, h0, scale, output_final_state, chunk_lo, chunk_hi)[:2]


def _bwd_impl(q, k, v, g, b, w, saved, do, dht, scale, need_dh0, chunk_lo, chunk_hi):
    from gdn2ts.kernels.chunk_bwd import chunk_bwd

    # (inside an autocast region the few PyTorch ops here must keep their dtypes)
    # (incoming gradients may be strided views; the kernels address them as dense tensors)
    do, dht = do.contiguous(), None if dht is None else dht.contiguous()
    with torch.autocast(do.device.type, enabled=False):
        *grads, dh0 = chunk_bwd(q, k, v, g, b, w, scale, dict(zip(_SAVED, saved, strict=True)), do, dht,
                                need_dh0=need_dh0, chunk_lo=chunk_lo, chunk_hi=chunk_hi)
    return [*grads, q.new_empty(0, dtype=_F32) if dh0 is None else dh0]


def _bwd_fake(q, k, v, g, b, w, saved, do, dht, scale, need_dh0, chunk_lo, chunk_hi):
    N = q.shape[0] if chunk_lo is None else chunk_lo.shape[0]
    dh0 = q.new_empty((N, v.shape[2], q.shape[3], v.shape[3]) if need_dh0 else (0,), dtype=_F32)
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v, g, b, w)] + [dh0]


_fwd_train = torch.library.custom_op("gdn2ts::chunk_fwd_train", _fwd_train_impl, mutates_args=(),
                                     schema=_FWD_SCHEMA)
_fwd_train.register_fake(_fwd_train_fake)
_fwd_infer = torch.library.custom_op("gdn2ts::chunk_fwd", _fwd_infer_impl, mutates_args=(), schema=_FWD_SCHEMA)
_fwd_infer.register_fake(_fwd_infer_fake)
_bwd = torch.library.custom_op(
    "gdn2ts::chunk_bwd", _bwd_impl, mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor g, Tensor b, Tensor w, Tensor[] saved, Tensor do, Tensor? dht, "
           "float scale, bool need_dh0, Tensor? chunk_lo, Tensor? chunk_hi) -> Tensor[]")
_bwd.register_fake(_bwd_fake)


def _setup_context(ctx, inputs, output):
    q, k, v, g, b, w, h0, scale, output_final_state, chunk_lo, chunk_hi = inputs
    # the backward reads the cumulative decay G (kept below), never g itself: only g's shape and dtype are kept,
    # as a tensor of one element broadcast over that shape (the fp32 g of a layer call is 128 MB at 16K tokens)
    g_meta = torch.empty_strided(g.shape, (0,) * g.dim(), dtype=g.dtype, device=g.device)
    ctx.save_for_backward(q, k, v, g_meta, b, w, chunk_lo, chunk_hi, *output[2:])
    # the kept intermediates are outputs of the op only to reach the backward: no gradient flows into them, and
    # none is materialized as zeros (that was 0.83 GB and 0.3 ms per call at 2048 x 8 x 16 heads)
    ctx.mark_non_differentiable(*output[2:])
    ctx.set_materialize_grads(False)
    ctx.scale, ctx.has_h0, ctx.has_ht = scale, h0 is not None, output_final_state


def _backward(ctx, grads):
    q, k, v, g, b, w, chunk_lo, chunk_hi, *saved = ctx.saved_tensors
    do, dht = grads[0], grads[1]
    if do is None:
        do = torch.zeros_like(v)
    dht = dht if ctx.has_ht and dht is not None else None
    need_dh0 = ctx.has_h0 and ctx.needs_input_grad[6]
    dq, dk, dv, dg, db, dw, dh0 = _bwd(q, k, v, g, b, w, saved, do, dht, ctx.scale, need_dh0, chunk_lo, chunk_hi)
    return dq, dk, dv, dg, db, dw, (dh0 if need_dh0 else None), None, None, None, None


_fwd_train.register_autograd(_backward, setup_context=_setup_context)


def chunk_layout(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Where the packed tokens go in the chunk-aligned row the kernels run: ``(dest [total] int64, chunk_lo [N]
    int32, chunk_hi [N] int32, padded_len)``. Sequence ``n`` starts at a multiple of the chunk, so no chunk holds
    two sequences; ``padded_len = total + (BT - 1) N`` is an upper bound known without reading ``cu_seqlens`` on
    the host (the tail past the last sequence is never run).

    Example:
        >>> import torch
        >>> dest, lo, hi, T = chunk_layout(torch.tensor([0, 3, 3, 70]), 70)
        >>> dest[:4].tolist(), lo.tolist(), hi.tolist(), T
        ([0, 1, 2, 64], [0, 1, 1], [1, 1, 3], 259)
    """
    cu = cu_seqlens.to(torch.int64)
    N = cu.numel() - 1
    lens = cu[1:] - cu[:-1]
    chunks = (lens + BT - 1) // BT
    hi = torch.cumsum(chunks, 0)
    lo = hi - chunks
    tok = torch.arange(total, device=cu.device)
    seq = torch.searchsorted(cu[1:], tok, right=True)
    dest = lo[seq] * BT + tok - cu[seq]
    return dest, lo.to(torch.int32), hi.to(torch.int32), total + (BT - 1) * N


def triton_chunk(q, k, v, g, b, w, scale: float, initial_state, output_final_state: bool,
                 cu_seqlens: torch.Tensor | None = None):
    """``(o, final_state)`` of the chunked forward on the Triton kernels, differentiable in q, k, v, g, b, w and the
    initial state (validated, activated inputs with K, V <= 128). With ``cu_seqlens`` (``B == 1``), each sequence
    is moved to its own run of chunks (zero ``g``, ``b``, ``w`` in between: identity steps), run, and gathered
    back; its states are ``[N, HV, K, V]``."""
    # the kernels address every input as a dense [B, T, heads, D] tensor, in the forward and in the backward (which
    # reads the tensors saved here): broadcast gates (scalar decay, erase or write expanded over a head's channels)
    # are materialized once
    q, k, v, g, b, w = (x.contiguous() for x in (q, k, v, g, b, w))
    initial_state = None if initial_state is None else initial_state.contiguous()
    chunk_lo = chunk_hi = None
    if cu_seqlens is not None:
        total = q.shape[1]
        dest, chunk_lo, chunk_hi, padded = chunk_layout(cu_seqlens, total)

        def pad(x):
            return x.new_zeros(1, padded, *x.shape[2:]).index_copy(1, dest, x)

        q, k, v, g, b, w = (pad(x) for x in (q, k, v, g, b, w))
    tensors = (q, k, v, g, b, w, initial_state)
    # inference keeps nothing for a backward (keeping the chunk states costs a sixth of the forward's time)
    train = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    o, final = (_fwd_train if train else _fwd_infer)(q, k, v, g, b, w, initial_state, scale, output_final_state,
                                                      chunk_lo, chunk_hi)[:2]
    final = final if output_final_state else None
    if cu_seqlens is not None:
        o = o.index_select(1, dest)
    return o, final


def triton_chunk_states(q, k, v, g, b, w, scale: float, initial_state, cu_seqlens: torch.Tensor | None = None):
    """Inference only: ``(o, final_state, h)`` of the chunked forward with ``h`` the fp32 state entering each chunk
    of ``BT`` tokens, ``[B, NT, HV, K, V]``, or for packed sequences ``[1, sum_n ceil(L_n / BT), HV, K, V]`` in
    sequence order (the forward that keeps them for the backward; reading the packed count synchronizes with the
    device once)."""
    from gdn2ts.kernels.chunk_fwd import chunk_fwd
    from gdn2ts.kernels.tiling import FwdTiling

    B, T = q.shape[:2]
    HV, K, V = v.shape[2], q.shape[3], v.shape[3]
    if T == 0:
        N = B if cu_seqlens is None else cu_seqlens.numel() - 1
        h0 = initial_state.clone() if initial_state is not None else q.new_zeros(N, HV, K, V, dtype=_F32)
        return v.new_empty(B, 0, HV, V), h0, q.new_zeros(B, 0, HV, K, V, dtype=_F32)
    q, k, v, g, b, w = (x.contiguous() for x in (q, k, v, g, b, w))
    initial_state = None if initial_state is None else initial_state.contiguous()
    chunk_lo = chunk_hi = None
    if cu_seqlens is not None:
        dest, chunk_lo, chunk_hi, padded = chunk_layout(cu_seqlens, T)

        def pad(x):
            return x.new_zeros(1, padded, *x.shape[2:]).index_copy(1, dest, x)

        q, k, v, g, b, w = (pad(x) for x in (q, k, v, g, b, w))
    o, final, saved = chunk_fwd(q, k, v, g, b, w, scale, initial_state, True, save=True, chunk_lo=chunk_lo,
                                chunk_hi=chunk_hi, tiling=FwdTiling(saved_state_dtype=_F32))
    h = saved["h"]
    if cu_seqlens is not None:
        o = o.index_select(1, dest)
        # each sequence's chunks lie in order from chunk_lo[n] to chunk_hi[n]; those past the last are never run
        h = h[:, : int(chunk_hi[-1])]
    return o, final, h
