"""flash-linear-attention 0.6's GDN-2 functions over gdn2ts's op: switch with one import.

    from fla.ops.gdn2 import chunk_gdn2, fused_recurrent_gdn2      # before
    from gdn2ts.compat.fla import chunk_gdn2, fused_recurrent_gdn2  # after

``chunk_gdn2``, ``fused_recurrent_gdn2`` and ``fused_recurrent_gdn2_fwd`` take FLA 0.6.0's arguments in FLA's
positional order with FLA's defaults and return what FLA returns; each maps its arguments onto
:func:`gdn2ts.ops.chunk_gdn2` or :func:`gdn2ts.ops.recurrent_gdn2` (``docs/gdn2.md``, "FLA drop-in", has the
table). Where FLA 0.6.0 silently ignores an argument or computes something unintended, this module says so in the
docstring; keyword arguments FLA does not know are refused (FLA ignores them).
"""

from __future__ import annotations

import math
import warnings

import torch

from gdn2ts.ops.gdn2 import chunk_gdn2 as _chunk
from gdn2ts.ops.gdn2 import recurrent_gdn2 as _recurrent
from gdn2ts.ops.validate import (
    INDEX_DTYPES,
    check_cu_seqlens,
    check_sequence_inputs,
    check_state,
    check_values,
    fail,
)

__all__ = ["chunk_gdn2", "fused_recurrent_gdn2", "fused_recurrent_gdn2_fwd", "CHUNK_SIZE", "SAFE_GATE_RANGE"]

# FLA's GDN-2 chunk (its intra-chunk solver is built for 64; so are our kernels and the intermediate states)
CHUNK_SIZE = 64
# the range FLA's safe gate requires of lower_bound with use_gate_in_kernel=True
SAFE_GATE_RANGE = (-5.0, 0.0)


def _refuse_unknown(op: str, kwargs: dict) -> None:
    if kwargs:
        raise TypeError(f"{op}() got unexpected keyword arguments {sorted(kwargs)} (FLA 0.6.0 would ignore them "
                        "silently; this module refuses them)")


def _state_layout(op: str, state_v_first, kwargs: dict) -> bool:
    """``state_v_first``, or FLA's deprecated name for it ``transpose_state_layout`` (with FLA's warning)."""
    if "transpose_state_layout" in kwargs:
        if state_v_first:
            raise ValueError(f"{op}: pass either `state_v_first` or the deprecated `transpose_state_layout`, "
                             "not both")
        warnings.warn("`transpose_state_layout` is deprecated and renamed to `state_v_first`.", DeprecationWarning,
                      stacklevel=3)
        state_v_first = kwargs.pop("transpose_state_layout")
    return bool(state_v_first)


def _check_lower_bound(op: str, lower_bound) -> None:
    if lower_bound is None:
        return
    if isinstance(lower_bound, bool) or not isinstance(lower_bound, (int, float)) or not math.isfinite(lower_bound) \
            or lower_bound >= 0:
        fail(op, "lower_bound", "a finite negative number or None", repr(lower_bound))


def _check_cu_seqlens_cpu(op: str, cu_seqlens, cu_seqlens_cpu, T: int) -> None:
    """FLA passes ``cu_seqlens_cpu`` to its state kernel to avoid reading offsets from the device; our kernels never
    read them on the host, so here it is only checked: a CPU copy of ``cu_seqlens``."""
    if cu_seqlens is None:
        fail(op, "cu_seqlens_cpu", "None when cu_seqlens is None (it is the CPU copy of cu_seqlens)", "a tensor")
    t = cu_seqlens_cpu
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype not in INDEX_DTYPES or t.device.type != "cpu":
        fail(op, "cu_seqlens_cpu", "a 1-D int32/int64 CPU tensor (the CPU copy of cu_seqlens)",
             f"{getattr(t, 'dtype', type(t).__name__)} {getattr(t, 'shape', '')} on {getattr(t, 'device', '?')}")
    if isinstance(cu_seqlens, torch.Tensor) and t.numel() != cu_seqlens.numel():
        fail(op, "cu_seqlens_cpu", f"{cu_seqlens.numel()} offsets (as cu_seqlens)", f"{t.numel()}")
    if t.numel() < 2 or int(t[0]) != 0 or int(t[-1]) != T or bool((t[1:] < t[:-1]).any()):
        fail(op, "cu_seqlens_cpu", f"non-decreasing offsets from 0 to T={T}", t.tolist())
    if isinstance(cu_seqlens, torch.Tensor) and check_values(cu_seqlens) and \
            not torch.equal(cu_seqlens.cpu().long(), t.long()):
        fail(op, "cu_seqlens_cpu", f"the values of cu_seqlens {cu_seqlens.tolist()}", t.tolist())


def _v_first_state(op: str, q, k, v, g, b, w, state, cu_seqlens):
    """A ``[N, HV, V, K]`` initial state checked in its own layout, as the ``[N, HV, K, V]`` the op takes."""
    B, T, _, HV, K, V = check_sequence_inputs(op, q, k, v, g, b, w)
    N = B if cu_seqlens is None else check_cu_seqlens(op, cu_seqlens, B, T, q.device)
    check_state(op, "initial_state", state, N, HV, K, V, q.dtype, q.device, v_first=True)
    return state.transpose(-1, -2).contiguous()


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
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    cu_seqlens_cpu: torch.LongTensor | None = None,
    safe_gate: bool = False,
    lower_bound: float | None = None,
    disable_recompute: bool = False,
    return_intermediate_states: bool = False,
    state_v_first: bool = False,
    cp_context=None,
    **kwargs,
):
    """FLA 0.6.0's ``fla.ops.gdn2.chunk_gdn2`` on :func:`gdn2ts.ops.chunk_gdn2`: differentiable in q, k, v, g, b,
    w, the initial state, ``A_log`` and ``dt_bias``.

    Shapes as FLA's: q, k, g, b ``[B, T, H, K]``; v, w ``[B, T, H, V]`` (grouped value heads ``[B, T, HV, V]``
    are accepted too); states ``[N, H, K, V]`` fp32, ``[N, H, V, K]`` with ``state_v_first``.

    Keyword-only through ``**kwargs``, as in FLA: ``A_log`` ``[H]`` and ``dt_bias`` ``[H * K]`` (read only with
    ``use_gate_in_kernel``), ``chunk_size`` (must be 64) and ``transpose_state_layout`` (the deprecated name of
    ``state_v_first``). ``safe_gate`` selects a kernel variant in FLA and changes nothing here (our kernels are
    exact for any decay); its argument checks are kept: with ``use_gate_in_kernel``, ``lower_bound`` is required
    and must lie in ``[-5, 0)``. ``lower_bound`` with ``use_gate_in_kernel`` gives the bounded gate
    ``lower_bound * sigmoid(exp(A_log) * (g + dt_bias))`` (``A_log`` may be None); without it, it is ignored, as
    in FLA. ``cu_seqlens_cpu`` is checked and otherwise unused (no kernel here reads offsets on the host);
    ``disable_recompute`` changes nothing (what the backward keeps is fixed). ``cp_context`` (context parallelism
    across devices) is not implemented: anything but None is refused.

    Returns:
        ``(o, final_state)`` (``final_state`` None unless ``output_final_state``); with
        ``return_intermediate_states`` (inside ``torch.inference_mode()`` only) ``(o, final_state, h)``, ``h`` the
        state entering each 64-token chunk, ``[B, NT, H, K, V]`` in k's dtype (packed: ``[1, sum_n ceil(L_n /
        64), H, K, V]``).

    Example:
        >>> import torch
        >>> from gdn2ts.compat.fla import chunk_gdn2
        >>> B, T, H, K, V = 1, 70, 2, 16, 16
        >>> q, k, b = torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.rand(B, T, H, K)
        >>> g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K))
        >>> v, w = torch.randn(B, T, H, V), torch.rand(B, T, H, V)
        >>> with torch.inference_mode():
        ...     o, ht, h = chunk_gdn2(q, k, v, g, b, w, None, None, True, True, return_intermediate_states=True)
        >>> o.shape, ht.shape, h.shape
        (torch.Size([1, 70, 2, 16]), torch.Size([1, 2, 16, 16]), torch.Size([1, 2, 2, 16, 16]))
    """
    op = "chunk_gdn2"
    v_first = _state_layout(op, state_v_first, kwargs)
    A_log, dt_bias = kwargs.pop("A_log", None), kwargs.pop("dt_bias", None)
    chunk_size = kwargs.pop("chunk_size", CHUNK_SIZE)
    _refuse_unknown(op, kwargs)
    if cp_context is not None:
        fail(op, "cp_context", "None (context parallelism across devices is not implemented in gdn2ts)",
             type(cp_context).__name__)
    if chunk_size != CHUNK_SIZE:
        raise ValueError(f"{op}: `chunk_size` must be 64 for GDN-2, got {chunk_size!r} (the chunk of the kernels "
                         "and of the intermediate states)")
    _check_lower_bound(op, lower_bound)
    if safe_gate and use_gate_in_kernel:
        lo, hi = SAFE_GATE_RANGE
        if lower_bound is None:
            fail(op, "lower_bound", "a value in [-5, 0) with safe_gate=True and use_gate_in_kernel=True", None)
        if not lo <= lower_bound < hi:
            fail(op, "lower_bound", "a value in the safe range [-5, 0) with safe_gate=True", repr(lower_bound))
    if cu_seqlens_cpu is not None:
        _check_cu_seqlens_cpu(op, cu_seqlens, cu_seqlens_cpu, q.shape[1] if isinstance(q, torch.Tensor) else -1)
    if return_intermediate_states:
        if not torch.is_inference_mode_enabled():
            fail(op, "return_intermediate_states", "True only inside torch.inference_mode() (as FLA)", "True")
        if disable_recompute:
            fail(op, "disable_recompute", "False with return_intermediate_states=True (as FLA)", "True")
    h0 = initial_state
    if v_first and initial_state is not None:
        h0 = _v_first_state(op, q, k, v, g, b, w, initial_state, cu_seqlens)
    res = _chunk(q, k, v, g, b, w, scale, h0, output_final_state, cu_seqlens,
                 use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, use_gate_in_kernel=use_gate_in_kernel,
                 A_log=A_log if use_gate_in_kernel else None, dt_bias=dt_bias if use_gate_in_kernel else None,
                 lower_bound=lower_bound if use_gate_in_kernel else None,
                 return_intermediate_states=bool(return_intermediate_states))
    o, final = res[0], res[1]
    if v_first and final is not None:
        final = final.transpose(-1, -2).contiguous()
    if not return_intermediate_states:
        return o, final
    h = res[2].to(k.dtype)
    return o, final, (h.transpose(-1, -2).contiguous() if v_first else h)


def fused_recurrent_gdn2_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
    output_final_state: bool = False,
    inplace_final_state: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    ssm_state_indices: torch.Tensor | None = None,
    num_accepted_tokens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    lower_bound: float | None = None,
    out: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """FLA 0.6.0's ``fused_recurrent_gdn2_fwd`` (the serving entry: continuous batching and speculative decoding)
    on :func:`gdn2ts.ops.recurrent_gdn2`. Forward only: outputs carry no gradient, as FLA's.

    - ``ssm_state_indices`` ``[N]``: sequence i starts from ``initial_state[ssm_state_indices[i]]`` (a state pool)
      and its state after its last token goes back to that slot (``inplace_final_state``) or to row i of a new
      state. ``-1`` marks a padding row (zeros in, nothing written).
    - ``ssm_state_indices`` ``[N, S]`` (speculative decoding): sequence i starts from the slot in column
      ``num_accepted_tokens[i] - 1`` (column 0 without ``num_accepted_tokens``) and the state after its token j goes
      to the slot in column j (``inplace_final_state``) or to row ``bos_i + j`` of a new ``[B * T, H, K, V]``.
    - ``inplace_final_state`` without ``ssm_state_indices``: the final states overwrite ``initial_state`` row by
      row.
    - ``out`` (``[B, T, HV, V]`` like v) receives the output and is returned.

    FLA 0.6.0 defines ``[N]`` indices for one token per sequence only (with more it writes token j to slot
    ``ssm_state_indices[i + j]``) and, without ``inplace_final_state``, allocates only N rows for the per-token
    states; here both are as described above, which agrees with FLA wherever FLA's result is defined. Its kernel
    reads ``A_log`` as 1 when it is None with ``use_gate_in_kernel`` and no ``lower_bound`` (a rate of e); here
    that is refused.

    Returns:
        ``(o, final_state)``: the pool itself with ``inplace_final_state``, the new state(s) with
        ``output_final_state``, else None.
    """
    op = "fused_recurrent_gdn2_fwd"
    v_first = _state_layout(op, state_v_first, kwargs)
    _refuse_unknown(op, kwargs)
    _check_lower_bound(op, lower_bound)
    indices = ssm_state_indices
    if inplace_final_state:
        if initial_state is None:
            fail(op, "initial_state", "a state (pool) when inplace_final_state=True", None)
        if indices is None:
            # the final states overwrite the initial ones row by row: the initial state is the pool, slot i row i
            N = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
            if initial_state.shape[0] != N:
                fail(op, "initial_state", f"{N} rows (one per sequence) with inplace_final_state=True and no "
                     "ssm_state_indices", f"shape {tuple(initial_state.shape)}")
            indices = torch.arange(N, device=initial_state.device)
    with torch.no_grad():
        return _recurrent(q, k, v, g, b, w, scale, initial_state, output_final_state, cu_seqlens, indices,
                          num_accepted_tokens=num_accepted_tokens, inplace_final_state=bool(inplace_final_state),
                          state_v_first=v_first, out=out, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                          use_gate_in_kernel=use_gate_in_kernel, A_log=A_log if use_gate_in_kernel else None,
                          dt_bias=dt_bias if use_gate_in_kernel else None,
                          lower_bound=lower_bound if use_gate_in_kernel else None)


def fused_recurrent_gdn2(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    lower_bound: float | None = None,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """FLA 0.6.0's ``fla.ops.gdn2.fused_recurrent_gdn2`` (token by token, decode) on
    :func:`gdn2ts.ops.recurrent_gdn2`. Forward only: outputs carry no gradient, as FLA's.

    q, k ``[B, T, H, K]``; g, b ``[B, T, HV, K]`` (or H heads); v, w ``[B, T, HV, V]``; ``A_log`` ``[HV]`` and
    ``dt_bias`` ``[HV * K]`` with ``use_gate_in_kernel``; ``lower_bound`` as in :func:`chunk_gdn2`. The final state is
    returned only with ``output_final_state`` (FLA's default is False). Through ``**kwargs``: ``ssm_state_indices``,
    ``num_accepted_tokens``, ``inplace_final_state`` and ``out`` act as in :func:`fused_recurrent_gdn2_fwd` (FLA
    0.6.0's ``fused_recurrent_gdn2`` accepts and drops them), and ``transpose_state_layout`` is the deprecated name
    of ``state_v_first``.

    Example:
        >>> import torch
        >>> from gdn2ts.compat.fla import fused_recurrent_gdn2
        >>> q, k, b = torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8), torch.rand(2, 1, 2, 8)
        >>> g, v, w = -torch.rand(2, 1, 2, 8), torch.randn(2, 1, 2, 4), torch.rand(2, 1, 2, 4)
        >>> o, ht = fused_recurrent_gdn2(q, k, v, g, b, w)
        >>> o.shape, ht
        (torch.Size([2, 1, 2, 4]), None)
        >>> pool = torch.zeros(5, 2, 8, 4)
        >>> o, pool = fused_recurrent_gdn2(q, k, v, g, b, w, initial_state=pool,
        ...                                ssm_state_indices=torch.tensor([3, 0]), inplace_final_state=True)
        >>> bool(pool[3].abs().sum() > 0), bool(pool[1].abs().sum() == 0)
        (True, True)
    """
    op = "fused_recurrent_gdn2"
    v_first = _state_layout(op, state_v_first, kwargs)
    serving = {name: kwargs.pop(name) for name in ("ssm_state_indices", "num_accepted_tokens",
                                                   "inplace_final_state", "out") if name in kwargs}
    _refuse_unknown(op, kwargs)
    return fused_recurrent_gdn2_fwd(q, k, v, g, b, w, A_log, dt_bias, initial_state, scale, output_final_state,
                                    state_v_first=v_first, cu_seqlens=cu_seqlens,
                                    use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                                    use_gate_in_kernel=use_gate_in_kernel, lower_bound=lower_bound, **serving)
