"""``chunk_gdn2``: GDN-2 over whole sequences (training and prefill), differentiable in every tensor input.

Tensor contract (FLA's, so code can switch with one import)::

    q, k   [B, T, H, K]                  v, w   [B, T, HV, V]      (HV = G * H value heads; G = 1 is plain MHA)
    g, b   [B, T, H, K] or [B, T, HV, K]  state  [N, HV, K, V] fp32 (fp64 when the inputs are fp64)

With ``cu_seqlens`` ([N + 1] offsets) the batch holds N packed sequences: ``B == 1`` and ``T`` is their total.
"""

from __future__ import annotations

import torch

from gdn2ts.ops.gdn2.options import activate, gate, options, resolve
from gdn2ts.ops.gdn2.reference import chunk_reference, recurrent_reference, segmented
from gdn2ts.ops.validate import check_cu_seqlens, check_gate_params, check_sequence_inputs, check_state, fail

__all__ = ["chunk_gdn2", "TRITON_CHUNK_MAX_DIM", "TRITON_CHUNK_MAX_PAIRS", "STATE_CHUNK"]

# the Triton chunked kernels: forward and backward for fixed-length and packed batches, K and V <= 128
TRITON_CHUNK_MAX_DIM = 128
TRITON_CHUNK_MAX_PAIRS = 65_535
# the chunk whose entry states return_intermediate_states gives (the Triton kernels' chunk, and FLA's)
STATE_CHUNK = 64


def _triton_unsupported(q: torch.Tensor, v: torch.Tensor, N: int) -> str:
    """Why the Triton chunked kernels cannot take a call of ``N`` sequences ('' when they can)."""
    if q.dtype == torch.float64:
        return "fp16/bf16/fp32 inputs: fp64 runs backend='torch' with an fp64 state"
    if q.shape[-1] > TRITON_CHUNK_MAX_DIM or v.shape[-1] > TRITON_CHUNK_MAX_DIM:
        return f"K and V up to {TRITON_CHUNK_MAX_DIM}"
    if N * v.shape[2] > TRITON_CHUNK_MAX_PAIRS:
        # the chunked kernels put (sequence, value head) pairs on the second grid axis
        return f"at most {TRITON_CHUNK_MAX_PAIRS:,} (sequence, value head) pairs, got {N * v.shape[2]:,}"
    return ""


def chunk_gdn2(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    *,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    use_bw_sigmoid_in_kernel: bool = False,
    erase_max: float = 1.0,
    lower_bound: float | None = None,
    return_intermediate_states: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None] | tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """GDN-2 over whole sequences (training and prefill), differentiable in every tensor input.

    Args:
        q, k: ``[B, T, H, K]`` queries and keys.
        v: ``[B, T, HV, V]`` values; ``HV`` is a multiple of ``H`` (grouped value heads).
        g: ``[B, T, H or HV, K]`` log-decay (``<= 0``), or raw pre-activations with ``use_gate_in_kernel``.
        b: ``[B, T, H or HV, K]`` erase gate in ``[0, 1]`` (or logits with ``use_bw_sigmoid_in_kernel``).
        w: ``[B, T, HV, V]`` write gate in ``[0, 1]`` (or logits with ``use_bw_sigmoid_in_kernel``).
        scale: read-out scale, ``K ** -0.5`` by default.
        initial_state: ``[N, HV, K, V]`` fp32 (fp64 for fp64 inputs); zeros when omitted.
        output_final_state: also return the state after the last token of each sequence.
        cu_seqlens: ``[N + 1]`` int offsets of N sequences packed in a ``B == 1`` batch.
        use_qk_l2norm_in_kernel: L2-normalize q and k inside the op.
        use_gate_in_kernel: ``g`` is raw; the op applies ``-exp(A_log) * softplus(g + dt_bias)``.
        A_log: ``[heads of g]`` log of the decay rate (required with ``use_gate_in_kernel``).
        dt_bias: ``[heads of g * K]`` (or ``[heads, K]``) bias of the decay pre-activation.
        use_bw_sigmoid_in_kernel: ``b`` and ``w`` are logits; the op applies ``erase_max * sigmoid`` / ``sigmoid``.
        erase_max: range of the erase gate with logits; 2.0 is the negative-eigenvalue variant.
        lower_bound: with ``use_gate_in_kernel``, the bounded gate ``lower_bound * sigmoid(exp(A_log) * (g +
            dt_bias))`` (a finite negative number; ``A_log`` may then be None, a rate of 1). It is computed in
            PyTorch ahead of the kernels (one elementwise pass more than the default gate).
        return_intermediate_states: inference only (no gradient tracked): also return ``h``, the fp32 state
            entering each chunk of ``STATE_CHUNK`` = 64 tokens, ``[B, ceil(T / 64), HV, K, V]``; packed:
            ``[1, sum_n ceil(L_n / 64), HV, K, V]`` in sequence order (prefix caching at chunk boundaries).
        backend: ``auto`` (Triton on CUDA where the kernels apply, else ``torch``), ``torch`` (chunked PyTorch),
            ``naive`` (token-by-token reference) or ``triton`` (fixed-length or packed batches, K and V up to 128).

    Returns:
        ``(o, final_state)``: ``o`` is ``[B, T, HV, V]`` in v's dtype; ``final_state`` ``[N, HV, K, V]`` or None;
        ``(o, final_state, h)`` with ``return_intermediate_states``.

    Example:
        >>> import torch
        >>> from gdn2ts.ops import chunk_gdn2
        >>> B, T, H, K, V = 2, 100, 4, 16, 16
        >>> q, k, g, b = (torch.randn(B, T, H, K) for _ in range(4))
        >>> v, w = torch.randn(B, T, H, V), torch.randn(B, T, H, V)
        >>> A_log, dt_bias = torch.zeros(H), torch.zeros(H * K)
        >>> o, state = chunk_gdn2(q, k, v, g, b, w, output_final_state=True, use_qk_l2norm_in_kernel=True,
        ...                       use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias,
        ...                       use_bw_sigmoid_in_kernel=True)
        >>> o.shape, state.shape
        (torch.Size([2, 100, 4, 16]), torch.Size([2, 4, 16, 16]))
    """
    op = "chunk_gdn2"
    B, T, H, HV, K, V = check_sequence_inputs(op, q, k, v, g, b, w)
    opts = options(op, q, scale, use_qk_l2norm_in_kernel, use_gate_in_kernel, use_bw_sigmoid_in_kernel,
                    erase_max, backend, lower_bound)
    N = B if cu_seqlens is None else check_cu_seqlens(op, cu_seqlens, B, T, q.device)
    if initial_state is not None:
        check_state(op, "initial_state", initial_state, N, HV, K, V, q.dtype, q.device)
    if opts.use_gate_in_kernel:
        check_gate_params(op, A_log, dt_bias, g.shape[2], K, q.device, bounded=opts.lower_bound is not None)
    intermediate = bool(return_intermediate_states)
    tensors = (q, k, v, g, b, w, initial_state, A_log, dt_bias)
    if intermediate and torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                                        for t in tensors):
        raise RuntimeError(f"{op}: return_intermediate_states is for inference and an input requires grad; call "
                           "under torch.no_grad() or torch.inference_mode()")
    path = resolve(op, opts.backend, q.device)
    if path == "triton":
        why = _triton_unsupported(q, v, N)
        if why and opts.backend == "triton":
            fail(op, "backend", f"'triton' only where the Triton chunked kernels apply ({why})", "'triton'")
        path = "torch" if why else path
    # The op sets its own precision (fp32 accumulation, fp32 state); autocast must not push its products to bf16.
    with torch.autocast(q.device.type, enabled=False):
        if path == "triton":
            from gdn2ts.ops.gdn2.act_triton import triton_activate
            from gdn2ts.ops.gdn2.chunk_triton import triton_chunk, triton_chunk_states

            # one Triton pre-pass applies the options (fp32 arithmetic; q, k, b, w stored back in their dtypes, g in
            # fp32) and one post-pass gives their gradients: no PyTorch elementwise work around the kernels, except
            # for the bounded gate (lower_bound), which runs in PyTorch (differentiable) ahead of the pre-pass
            in_pass = opts.use_gate_in_kernel and opts.lower_bound is None
            if opts.use_gate_in_kernel and not in_pass:
                g = gate(g, A_log, dt_bias, opts.lower_bound, torch.float32)
            q, k, g, b, w = triton_activate(q, k, g, b, w, A_log, dt_bias, opts.use_qk_l2norm, in_pass,
                                            opts.use_bw_sigmoid, opts.erase_max)
            if intermediate:
                o, final, h = triton_chunk_states(q, k, v, g, b, w, opts.scale, initial_state, cu_seqlens)
            else:
                o, final = triton_chunk(q, k, v, g, b, w, opts.scale, initial_state, output_final_state, cu_seqlens)
        else:
            q, k, g, b, w = activate(q, k, g, b, w, opts, A_log, dt_bias)
            fn = recurrent_reference if path == "naive" else chunk_reference
            if intermediate:
                o, final, h = segmented(fn, q, k, v, g, b, w, opts.scale, initial_state, cu_seqlens, STATE_CHUNK)
            else:
                o, final = fn(q, k, v, g, b, w, opts.scale, initial_state, output_final_state, cu_seqlens)
    if not output_final_state:
        final = None
    if final is not None and final is initial_state:
        final = final.clone()  # no token ran: never hand back the caller's tensor itself
    return (o, final, h) if intermediate else (o, final)
