"""``recurrent_gdn2``: GDN-2 for a few tokens of N sequences (decode, streaming), forward only, with the state
in and out explicitly or kept in a state pool (continuous batching)."""

from __future__ import annotations

import torch

from gdn2ts.ops.gdn2.options import activate, gate, options, resolve
from gdn2ts.ops.gdn2.reference import pad_packed, recurrent_reference, state_dtype, unpad_packed
from gdn2ts.ops.validate import (
    INDEX_DTYPES,
    check_cu_seqlens,
    check_gate_params,
    check_sequence_inputs,
    check_state,
    check_values,
    fail,
)

__all__ = ["recurrent_gdn2"]


def _check_indices(op: str, state_indices, N: int, pool: torch.Tensor, lengths) -> None:
    """``state_indices``: ``[N]`` slots, or a per-token table ``[N, S]`` whose row n holds at least the slots of
    its tokens; ``lengths`` gives the tokens of each sequence (an int, or a function giving the list)."""
    if not isinstance(state_indices, torch.Tensor) or state_indices.dim() not in (1, 2) or \
            state_indices.shape[0] != N:
        fail(op, "state_indices", f"an integer tensor [N={N}] of pool slots, or [N={N}, S] with a slot per token",
             getattr(state_indices, "shape", state_indices))
    if state_indices.dtype not in INDEX_DTYPES:
        fail(op, "state_indices", "dtype int32 or int64", state_indices.dtype)
    if state_indices.device != pool.device:
        fail(op, "state_indices", f"a tensor on {pool.device} (the device of the pool)", state_indices.device)
    table = state_indices.dim() == 2
    if table and isinstance(lengths, int) and lengths > state_indices.shape[1]:
        fail(op, "state_indices", f"a slot for each of the T={lengths} tokens of a sequence ([N, S] with S >= T)",
             f"shape {tuple(state_indices.shape)}")
    if not check_values(state_indices) or (state_indices.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    P = pool.shape[0]
    if bool(((state_indices < -1) | (state_indices >= P)).any()):
        fail(op, "state_indices", f"slots in [0, {P}) or -1 (padding)", state_indices.tolist())
    if table:
        lens = [lengths] * N if isinstance(lengths, int) else lengths()
        if max(lens, default=0) > state_indices.shape[1]:
            fail(op, "state_indices", "a slot for every token of each sequence ([N, S] with S >= the longest)",
                 f"shape {tuple(state_indices.shape)} for lengths {lens}")
        used = torch.cat([state_indices[n, :L] for n, L in enumerate(lens)]) if N else state_indices.new_zeros(0)
    else:
        used = state_indices
    used = used[used >= 0]
    if used.unique().numel() != used.numel():
        fail(op, "state_indices", "distinct slots (two rows or tokens may not write the same slot)",
             state_indices.tolist())


def _check_accepted(op: str, accepted, state_indices, N: int) -> None:
    if state_indices is None or state_indices.dim() != 2:
        fail(op, "num_accepted_tokens", "None unless state_indices is a per-token table [N, S]", "a value")
    if not isinstance(accepted, torch.Tensor) or tuple(accepted.shape) != (N,):
        fail(op, "num_accepted_tokens", f"an integer tensor [N={N}]", getattr(accepted, "shape", accepted))
    if accepted.dtype not in INDEX_DTYPES:
        fail(op, "num_accepted_tokens", "dtype int32 or int64", accepted.dtype)
    if accepted.device != state_indices.device:
        fail(op, "num_accepted_tokens", f"a tensor on {state_indices.device}", accepted.device)
    if check_values(accepted) and not (accepted.is_cuda and torch.cuda.is_current_stream_capturing()):
        S = state_indices.shape[1]
        if bool(((accepted < 1) | (accepted > S)).any()):
            fail(op, "num_accepted_tokens", f"counts in [1, {S}] (the state is read from column count - 1)",
                 accepted.tolist())


def _lengths(B: int, T: int, cu_seqlens) -> torch.Tensor:
    if cu_seqlens is None:
        return torch.full((B,), T, dtype=torch.long)
    cu = cu_seqlens.long().cpu()
    return cu[1:] - cu[:-1]


@torch.no_grad()
def _recurrent_torch(q, k, v, g, b, w, scale, initial_state, cu_seqlens, state_indices, accepted, inplace,
                     v_first):
    B, T = q.shape[:2]
    HV, K, V = v.shape[2], q.shape[3], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    sdt = state_dtype(q.dtype)

    def kv(x):  # a state in its layout -> a [.., K, V] view
        return x.transpose(-1, -2) if v_first else x

    table = state_indices is not None and state_indices.dim() == 2
    if state_indices is not None:
        pool = initial_state
        read = state_indices.long()
        if table:
            col = accepted.long() - 1 if accepted is not None else read.new_zeros(N)
            read = read.gather(1, col[:, None]).squeeze(1)
        h0 = torch.where((read >= 0)[:, None, None, None], kv(pool)[read.clamp(min=0)].to(sdt), 0.0)
    else:
        h0 = kv(initial_state) if initial_state is not None else q.new_zeros(N, HV, K, V, dtype=sdt)
    if not table:
        o, final = recurrent_reference(q, k, v, g, b, w, scale, h0, True, cu_seqlens)
        if state_indices is None or not inplace:
            return o, kv(final).contiguous()
        rows = (read >= 0).nonzero(as_tuple=True)[0]
        kv(pool)[read[rows]] = final[rows].to(pool.dtype)
        return o, pool
    # a per-token table: the state after every token, from the padded sequences one step at a time
    if cu_seqlens is None:
        xs, index = (q, k, v, g, b, w), None
    else:
        q_, index = pad_packed(q, cu_seqlens)
        xs = (q_, *(pad_packed(t, cu_seqlens)[0] for t in (k, v, g, b, w)))
    L = xs[0].shape[1]
    S, outs, states = h0, [], []
    for j in range(L):
        o_j, S = recurrent_reference(*(x[:, j:j + 1] for x in xs), scale, S, True)
        outs.append(o_j)
        states.append(S)
    o = torch.cat(outs, 1) if outs else xs[2].new_zeros(N, 0, HV, V)
    o = o if index is None else unpad_packed(o, index, T)
    lengths = _lengths(B, T, cu_seqlens).to(q.device)
    valid = torch.arange(L, device=q.device)[None, :] < lengths[:, None]  # [N, L]
    every = torch.stack(states, 1) if states else h0.new_zeros(N, 0, HV, K, V)  # [N, L, HV, K, V]
    if inplace:
        slots = state_indices[:, :L].long()
        keep = valid & (slots >= 0)
        kv(pool)[slots[keep]] = every[keep].to(pool.dtype)
        return o, pool
    # every token's state in token order, [B * T, HV, K, V]
    starts = torch.arange(N, device=q.device) * T if cu_seqlens is None else cu_seqlens[:-1].long()
    rows = (starts[:, None] + torch.arange(L, device=q.device)[None, :])[valid]
    out = every.new_zeros(B * T, HV, K, V)
    out[rows] = every[valid]
    return o, kv(out).contiguous()


def recurrent_gdn2(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    state_indices: torch.Tensor | None = None,
    *,
    num_accepted_tokens: torch.Tensor | None = None,
    inplace_final_state: bool = True,
    state_v_first: bool = False,
    out: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    use_bw_sigmoid_in_kernel: bool = False,
    erase_max: float = 1.0,
    lower_bound: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GDN-2 for a few tokens of N sequences (decode, streaming): forward only, state in and out explicitly.

    Without ``state_indices``, ``initial_state`` is ``[N, HV, K, V]`` (zeros when omitted) and is not modified;
    the new state is returned. With ``state_indices`` (``[N]`` int), ``initial_state`` is a state pool
    ``[P, HV, K, V]``: row i starts from ``pool[state_indices[i]]`` and its final state is written back there in
    place (continuous batching); slot ``-1`` marks a padding row that starts from zeros and writes nothing. The
    returned state is then the pool itself.

    Speculative decoding: ``state_indices`` may be a per-token table ``[N, S]`` (``S`` at least each sequence's
    token count): sequence i starts from ``pool[state_indices[i, num_accepted_tokens[i] - 1]]`` (column 0 without
    ``num_accepted_tokens``) and the state after its token j is written to ``pool[state_indices[i, j]]`` (-1: not
    written), so the state after any accepted prefix of the draft is kept.

    ``inplace_final_state=False`` leaves the pool untouched and returns the new states instead: ``[N, HV, K, V]``,
    or with a table every token's state ``[B * T, HV, K, V]`` in token order. ``state_v_first`` lays every state
    (initial, pool, returned) out as ``[..., V, K]``. ``out`` (``[B, T, HV, V]`` in v's dtype) receives the output
    and is returned. Other arguments are as in :func:`chunk_gdn2`.

    Raises:
        RuntimeError: when gradients are requested (use :func:`chunk_gdn2` for training).

    Example:
        >>> import torch
        >>> from gdn2ts.ops import recurrent_gdn2
        >>> N, H, K, V = 3, 2, 8, 8
        >>> pool = torch.zeros(10, H, K, V)
        >>> q, k, b = (torch.rand(N, 1, H, K) for _ in range(3))
        >>> g = -torch.rand(N, 1, H, K)
        >>> v, w = torch.randn(N, 1, H, V), torch.rand(N, 1, H, V)
        >>> o, pool = recurrent_gdn2(q, k, v, g, b, w, initial_state=pool, state_indices=torch.tensor([4, -1, 7]))
        >>> o.shape, bool(pool[4].abs().sum() > 0), bool(pool[0].abs().sum() == 0)
        (torch.Size([3, 1, 2, 8]), True, True)
    """
    op = "recurrent_gdn2"
    B, T, H, HV, K, V = check_sequence_inputs(op, q, k, v, g, b, w)
    tensors = (q, k, v, g, b, w, initial_state, A_log, dt_bias)
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        raise RuntimeError(
            f"{op} is forward-only (decode/streaming) and an input requires grad; use chunk_gdn2 for training, "
            "or call under torch.no_grad()"
        )
    opts = options(op, q, scale, use_qk_l2norm_in_kernel, use_gate_in_kernel, use_bw_sigmoid_in_kernel,
                    erase_max, backend, lower_bound)
    N = B if cu_seqlens is None else check_cu_seqlens(op, cu_seqlens, B, T, q.device)
    v_first, inplace = bool(state_v_first), bool(inplace_final_state)
    if state_indices is not None:
        if initial_state is None:
            fail(op, "initial_state", "a state pool [P, HV, K, V] when state_indices is given", None)
        check_state(op, "initial_state", initial_state, None, HV, K, V, q.dtype, q.device, pool=True,
                    v_first=v_first)
        if inplace and not initial_state.is_contiguous():
            fail(op, "initial_state", "a contiguous state pool (it is written in place)", "a strided view")
        _check_indices(op, state_indices, N, initial_state,
                       T if cu_seqlens is None else (lambda: _lengths(B, T, cu_seqlens).tolist()))
    elif initial_state is not None:
        check_state(op, "initial_state", initial_state, N, HV, K, V, q.dtype, q.device, v_first=v_first)
    if num_accepted_tokens is not None:
        _check_accepted(op, num_accepted_tokens, state_indices, N)
    if out is not None and (not isinstance(out, torch.Tensor) or out.shape != v.shape or out.dtype != v.dtype
                            or out.device != v.device):
        fail(op, "out", f"a {v.dtype} tensor of shape {tuple(v.shape)} on {v.device} (the output, like 'v')",
             f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}")
    if opts.use_gate_in_kernel:
        check_gate_params(op, A_log, dt_bias, g.shape[2], K, q.device, bounded=opts.lower_bound is not None)
    path = resolve(op, opts.backend, q.device)
    if path == "triton" and q.dtype == torch.float64:
        # the kernel computes in fp32 with an fp32 state; fp64 inputs keep their fp64 state on the PyTorch path
        if opts.backend == "triton":
            fail(op, "backend", "'triton' only for fp16/bf16/fp32 inputs (fp64 runs backend='torch')", "'triton'")
        path = "torch"
    with torch.autocast(q.device.type, enabled=False):
        if path == "triton":
            from gdn2ts.kernels.recurrent import recurrent_fwd

            # the kernel applies the default gate itself; the bounded gate (lower_bound) is computed ahead of it
            in_kernel = opts.use_gate_in_kernel and opts.lower_bound is None
            if opts.use_gate_in_kernel and not in_kernel:
                g = gate(g, A_log, dt_bias, opts.lower_bound, torch.float32)
            o, final = recurrent_fwd(
                q, k, v, g, b, w, opts.scale, initial_state, cu_seqlens, state_indices,
                use_qk_l2norm=opts.use_qk_l2norm, A_log=A_log if in_kernel else None,
                dt_bias=dt_bias if in_kernel else None, use_bw_sigmoid=opts.use_bw_sigmoid,
                erase_max=opts.erase_max, out=out, num_accepted_tokens=num_accepted_tokens, inplace=inplace,
                state_v_first=v_first,
            )
        else:
            q, k, g, b, w = activate(q, k, g, b, w, opts, A_log, dt_bias)
            o, final = _recurrent_torch(q, k, v, g, b, w, opts.scale, initial_state, cu_seqlens, state_indices,
                                        num_accepted_tokens, inplace, v_first)
            if out is not None:
                o = out.copy_(o)
    if final is initial_state and (state_indices is None or not inplace):
        final = final.clone()  # no token ran: never hand back the caller's tensor itself
    pool_returned = state_indices is not None and inplace
    return o, (final if output_final_state or pool_returned else None)
