"""``recurrent_gdn2``: GDN-2 for a few tokens of N sequences (decode, streaming), forward only, with the state
in and out explicitly or kept in a state pool (continuous batching)."""

from __future__ import annotations

import torch

from gdn2ts.ops.gdn2.options import activate, options, resolve
from gdn2ts.ops.gdn2.reference import recurrent_reference, state_dtype
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


def _check_indices(op: str, state_indices, N: int, pool: torch.Tensor) -> None:
    if not isinstance(state_indices, torch.Tensor) or state_indices.dim() != 1 or state_indices.numel() != N:
        fail(op, "state_indices", f"a 1-D integer tensor [N={N}] of pool slots", getattr(state_indices, "shape",
                                                                                          state_indices))
    if state_indices.dtype not in INDEX_DTYPES:
        fail(op, "state_indices", "dtype int32 or int64", state_indices.dtype)
    if state_indices.device != pool.device:
        fail(op, "state_indices", f"a tensor on {pool.device} (the device of the pool)", state_indices.device)
    if not check_values(state_indices) or (state_indices.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    P = pool.shape[0]
    if bool(((state_indices < -1) | (state_indices >= P)).any()):
        fail(op, "state_indices", f"slots in [0, {P}) or -1 (padding row)", state_indices.tolist())
    used = state_indices[state_indices >= 0]
    if used.unique().numel() != used.numel():
        fail(op, "state_indices", "distinct slots (two rows may not write the same slot)", state_indices.tolist())


@torch.no_grad()
def _recurrent_torch(q, k, v, g, b, w, scale, initial_state, cu_seqlens, state_indices):
    HV, K, V = v.shape[2], q.shape[3], v.shape[3]
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    sdt = state_dtype(q.dtype)
    if state_indices is not None:
        pool = initial_state
        valid = state_indices >= 0
        slots = state_indices.long().clamp(min=0)
        h0 = torch.where(valid[:, None, None, None], pool[slots], pool.new_zeros(()))
    else:
        h0 = initial_state if initial_state is not None else q.new_zeros(N, HV, K, V, dtype=sdt)
    o, final = recurrent_reference(q, k, v, g, b, w, scale, h0, True, cu_seqlens)
    if state_indices is None:
        return o, final
    rows = valid.nonzero(as_tuple=True)[0]
    pool.index_copy_(0, slots[rows], final[rows].to(pool.dtype))
    return o, pool


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
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    use_bw_sigmoid_in_kernel: bool = False,
    erase_max: float = 1.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GDN-2 for a few tokens of N sequences (decode, streaming): forward only, state in and out explicitly.

    Without ``state_indices``, ``initial_state`` is ``[N, HV, K, V]`` (zeros when omitted) and is not modified;
    the new state is returned. With ``state_indices`` (``[N]`` int), ``initial_state`` is a state pool
    ``[P, HV, K, V]``: row i starts from ``pool[state_indices[i]]`` and its final state is written back there in
    place (continuous batching); slot ``-1`` marks a padding row that starts from zeros and writes nothing. The
    returned state is then the pool itself. Other arguments are as in :func:`chunk_gdn2`.

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
                    erase_max, backend)
    N = B if cu_seqlens is None else check_cu_seqlens(op, cu_seqlens, B, T, q.device)
    if state_indices is not None:
        if initial_state is None:
            fail(op, "initial_state", "a state pool [P, HV, K, V] when state_indices is given", None)
        check_state(op, "initial_state", initial_state, None, HV, K, V, q.dtype, q.device, pool=True)
        _check_indices(op, state_indices, N, initial_state)
    elif initial_state is not None:
        check_state(op, "initial_state", initial_state, N, HV, K, V, q.dtype, q.device)
    if opts.use_gate_in_kernel:
        check_gate_params(op, A_log, dt_bias, g.shape[2], K, q.device)
    path = resolve(op, opts.backend, q.device)
    if path == "triton" and q.dtype == torch.float64:
        # the kernel computes in fp32 with an fp32 state; fp64 inputs keep their fp64 state on the PyTorch path
        if opts.backend == "triton":
            fail(op, "backend", "'triton' only for fp16/bf16/fp32 inputs (fp64 runs backend='torch')", "'triton'")
        path = "torch"
    with torch.autocast(q.device.type, enabled=False):
        if path == "triton":
            from gdn2ts.kernels.recurrent import recurrent_fwd

            o, final = recurrent_fwd(
                q, k, v, g, b, w, opts.scale, initial_state, cu_seqlens, state_indices,
                use_qk_l2norm=opts.use_qk_l2norm, A_log=A_log if opts.use_gate_in_kernel else None,
                dt_bias=dt_bias if opts.use_gate_in_kernel else None, use_bw_sigmoid=opts.use_bw_sigmoid,
                erase_max=opts.erase_max,
            )
        else:
            q, k, g, b, w = activate(q, k, g, b, w, opts, A_log, dt_bias)
            o, final = _recurrent_torch(q, k, v, g, b, w, opts.scale, initial_state, cu_seqlens, state_indices)
    if state_indices is None and final is initial_state:
        final = final.clone()  # no token ran: never hand back the caller's tensor itself
    return o, (final if output_final_state or state_indices is not None else None)
