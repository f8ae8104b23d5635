"""The Triton chunked path as one autograd Function: ``chunk_fwd`` forward (keeping what the backward needs only
when a gradient is wanted) and ``chunk_bwd`` backward."""

from __future__ import annotations

import torch

__all__ = ["triton_chunk"]

# the training forward also keeps the decayed queries and tail keys (fp16 for 16-bit inputs), so that the
# backward's sequential passes load them instead of q, k and G: 8-13 % less backward time on an H100
_SAVED = ("G", "Y", "U", "Aqk", "Linv", "h", "R", "qg", "kt")


class _TritonChunkGDN2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, b, w, h0, scale, output_final_state):
        from gdn2ts.kernels.chunk_fwd import chunk_fwd

        # 16-bit inputs: the chunk states (and, in the backward, their gradients) are kept in bf16, as the
        # inputs' own precision; this keeps forward + backward memory under FLA's
        half = q.dtype in (torch.bfloat16, torch.float16)
        o, ht, saved = chunk_fwd(q, k, v, g, b, w, scale, h0, output_final_state, save=True, decayed_qk=True,
                                 wy_warps=8, saved_state_dtype=torch.bfloat16 if half else torch.float32)
        ctx.save_for_backward(q, k, v, g, b, w, *(saved[n] for n in _SAVED))
        ctx.scale, ctx.has_h0 = scale, h0 is not None
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        from gdn2ts.kernels.chunk_bwd import chunk_bwd

        q, k, v, g, b, w, *rest = ctx.saved_tensors
        # (inside an autocast region the few PyTorch ops here must keep their dtypes)
        with torch.autocast(do.device.type, enabled=False):
            grads = chunk_bwd(q, k, v, g, b, w, ctx.scale, dict(zip(_SAVED, rest, strict=True)), do, dht,
                              need_dh0=ctx.has_h0 and ctx.needs_input_grad[6])
        return (*grads, None, None)


def triton_chunk(q, k, v, g, b, w, scale: float, initial_state, output_final_state: bool):
    """``(o, final_state)`` of the chunked forward on the Triton kernels, differentiable in q, k, v, g, b, w and the
    initial state (validated, activated, fixed-length inputs with K, V <= 128)."""
    tensors = (q, k, v, g, b, w, initial_state)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        # inference: nothing to keep for a backward (ctx.needs_input_grad would still report requires_grad
        # under no_grad, and keeping the chunk states costs a sixth of the forward's time)
        from gdn2ts.kernels.chunk_fwd import chunk_fwd

        return chunk_fwd(q, k, v, g, b, w, scale, initial_state, output_final_state)
    return _TritonChunkGDN2.apply(q, k, v, g, b, w, initial_state, scale, output_final_state)
