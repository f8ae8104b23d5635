"""The Triton chunked path as one autograd Function: ``chunk_fwd`` forward (keeping what the backward needs only
when a gradient is wanted) and ``chunk_bwd`` backward; packed sequences (``cu_seqlens``) by a chunk-aligned
re-layout, computed on the device (no host synchronization)."""

from __future__ import annotations

import torch

__all__ = ["chunk_layout", "triton_chunk"]

BT = 64  # the kernels' chunk

# the training forward also keeps the decayed queries and tail keys (fp16 for 16-bit inputs), so that the
# backward's sequential passes load them instead of q, k and G: 8-13 % less backward time on an H100
_SAVED = ("G", "Y", "U", "Aqk", "Linv", "h", "R", "qg", "kt")


class _TritonChunkGDN2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, b, w, h0, scale, output_final_state, chunk_lo, chunk_hi):
        from gdn2ts.kernels.chunk_fwd import chunk_fwd

        # 16-bit inputs: the chunk states (and, in the backward, their gradients) are kept in bf16, as the
        # inputs' own precision; this keeps forward + backward memory under FLA's
        half = q.dtype in (torch.bfloat16, torch.float16)
        o, ht, saved = chunk_fwd(q, k, v, g, b, w, scale, h0, output_final_state, save=True, decayed_qk=True,
                                 wy_warps=8, saved_state_dtype=torch.bfloat16 if half else torch.float32,
                                 chunk_lo=chunk_lo, chunk_hi=chunk_hi)
        ctx.save_for_backward(q, k, v, g, b, w, chunk_lo, chunk_hi, *(saved[n] for n in _SAVED))
        ctx.scale, ctx.has_h0 = scale, h0 is not None
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        from gdn2ts.kernels.chunk_bwd import chunk_bwd

        q, k, v, g, b, w, chunk_lo, chunk_hi, *rest = ctx.saved_tensors
        # (inside an autocast region the few PyTorch ops here must keep their dtypes)
        with torch.autocast(do.device.type, enabled=False):
            grads = chunk_bwd(q, k, v, g, b, w, ctx.scale, dict(zip(_SAVED, rest, strict=True)), do, dht,
                              need_dh0=ctx.has_h0 and ctx.needs_input_grad[6], chunk_lo=chunk_lo,
                              chunk_hi=chunk_hi)
        return (*grads, None, None, None, None)


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


# torch.compile must not trace into the launches: inductor re-types the kernels' float arguments (fp64 against
# fp32 operands in tl.dot), and the kernels are fused already. A compiled model breaks its graph here and runs
# this Function as it is; what surrounds it (projections, gates, norms) still compiles.
@torch.compiler.disable
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
    chunk_lo = chunk_hi = None
    if cu_seqlens is not None:
        total = q.shape[1]
        dest, chunk_lo, chunk_hi, padded = chunk_layout(cu_seqlens, total)

        def pad(x):
            return x.new_zeros(1, padded, *x.shape[2:]).index_copy(1, dest, x)

        q, k, v, g, b, w = (pad(x) for x in (q, k, v, g, b, w))
    tensors = (q, k, v, g, b, w, initial_state)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        # inference: nothing to keep for a backward (ctx.needs_input_grad would still report requires_grad
        # under no_grad, and keeping the chunk states costs a sixth of the forward's time)
        from gdn2ts.kernels.chunk_fwd import chunk_fwd

        o, final = chunk_fwd(q, k, v, g, b, w, scale, initial_state, output_final_state, chunk_lo=chunk_lo,
                             chunk_hi=chunk_hi)
    else:
        o, final = _TritonChunkGDN2.apply(q, k, v, g, b, w, initial_state, scale, output_final_state, chunk_lo,
                                          chunk_hi)
    if cu_seqlens is not None:
        o = o.index_select(1, dest)
    return o, final
