"""The public GDN-2 ops: ``chunk_gdn2`` (training and prefill, autograd) and ``recurrent_gdn2`` (decode and
streaming, forward only, explicit state, optional state pool).

Tensor contract (FLA's, so code can switch with one import)::

    q, k   [B, T, H, K]                  v, w   [B, T, HV, V]      (HV = G * H value heads; G = 1 is plain MHA)
    g, b   [B, T, H, K] or [B, T, HV, K]  state  [N, HV, K, V] fp32 (fp64 when the inputs are fp64)

With ``cu_seqlens`` ([N + 1] offsets) the batch holds N packed sequences: ``B == 1`` and ``T`` is their total.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gdn2ts.ops import reference
from gdn2ts.ops.validate import (
    INDEX_DTYPES,
    check_cu_seqlens,
    check_gate_params,
    check_scale,
    check_sequence_inputs,
    check_state,
    check_values,
    fail,
)

__all__ = ["GDN2Options", "chunk_gdn2", "recurrent_gdn2", "BACKENDS", "l2norm"]

BACKENDS = ("auto", "torch", "naive", "triton")
# backends each op has; "auto" picks the device's fast path
CHUNK_BACKENDS = ("auto", "torch", "naive", "triton")
# the Triton chunked kernels so far: forward and backward for fixed-length and packed batches, K and V <= 128
TRITON_CHUNK_MAX_DIM = 128
TRITON_CHUNK_MAX_PAIRS = 65_535
RECURRENT_BACKENDS = ("auto", "torch", "naive", "triton")
L2NORM_EPS = 1e-6


@dataclass(frozen=True)
class GDN2Options:
    """Non-tensor options of a GDN-2 op call."""

    scale: float
    """Multiplier of q in the read-out; ``K ** -0.5`` by default."""
    use_qk_l2norm: bool = False
    """L2-normalize q and k over K inside the op (``x / sqrt(sum x^2 + 1e-6)``)."""
    use_gate_in_kernel: bool = False
    """``g`` holds raw pre-activations: the op uses ``-exp(A_log[h]) * softplus(g + dt_bias)``."""
    use_bw_sigmoid: bool = False
    """``b`` and ``w`` hold logits: the op uses ``b = erase_max * sigmoid(b)`` and ``w = sigmoid(w)``."""
    erase_max: float = 1.0
    """Upper end of the erase gate's range with ``use_bw_sigmoid`` (2.0 allows negative eigenvalues)."""
    backend: str = "auto"
    """``auto`` (the device's fast path), ``torch`` (chunked PyTorch), ``naive`` (token-by-token) or ``triton``."""

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"argument 'backend' expected one of {BACKENDS}, got {self.backend!r}")
        if not (0.0 < self.erase_max <= 2.0):
            raise ValueError(f"argument 'erase_max' expected a value in (0, 2], got {self.erase_max!r}")


def l2norm(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x / sqrt(sum(x^2, -1) + 1e-6)`` computed in ``dtype`` (default: x's)."""
    x = x if dtype is None else x.to(dtype)
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + L2NORM_EPS)


def _activate(q, k, g, b, w, opts: GDN2Options, A_log, dt_bias):
    """Apply the in-op options in PyTorch (differentiable, so A_log and dt_bias get gradients)."""
    dt = reference.compute_dtype(q.dtype)
    if opts.use_qk_l2norm:
        q, k = l2norm(q, dt), l2norm(k, dt)
    if opts.use_gate_in_kernel:
        x = g.to(dt)
        if dt_bias is not None:
            x = x + dt_bias.to(dt).reshape(g.shape[2], g.shape[3])
        g = -A_log.to(dt).exp()[:, None] * F.softplus(x)
    if opts.use_bw_sigmoid:
        b = opts.erase_max * torch.sigmoid(b.to(dt))
        w = torch.sigmoid(w.to(dt))
    return q, k, g, b, w


def _triton_usable(device: torch.device) -> bool:
    """Triton runs CUDA tensors, or CPU tensors under its interpreter (``TRITON_INTERPRET=1``, for tests)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _resolve(op: str, backend: str, device: torch.device, allowed: tuple[str, ...]) -> str:
    if backend not in allowed:
        fail(op, "backend", f"one of {allowed}", repr(backend))
    if backend == "auto":
        return "triton" if "triton" in allowed and device.type == "cuda" else "torch"
    if backend == "triton" and not _triton_usable(device):
        fail(op, "backend", "'triton' only for CUDA tensors (or under TRITON_INTERPRET=1)", f"tensors on {device}")
    return backend


def _triton_chunk_unsupported(q, k, v, g, b, w, initial_state, A_log, dt_bias, cu_seqlens) -> str:
    """Why the Triton chunked kernels cannot take this call ('' when they can)."""
    if q.dtype == torch.float64:
        return "fp16/bf16/fp32 inputs: fp64 runs backend='torch' with an fp64 state"
    if q.shape[-1] > TRITON_CHUNK_MAX_DIM or v.shape[-1] > TRITON_CHUNK_MAX_DIM:
        return f"K and V up to {TRITON_CHUNK_MAX_DIM}"
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    if N * v.shape[2] > TRITON_CHUNK_MAX_PAIRS:
        # the chunked kernels put (sequence, value head) pairs on the second grid axis
        return f"at most {TRITON_CHUNK_MAX_PAIRS:,} (sequence, value head) pairs, got {N * v.shape[2]:,}"
    return ""


def _options(op, q, scale, use_qk_l2norm_in_kernel, use_gate_in_kernel, use_bw_sigmoid_in_kernel, erase_max,
             backend) -> GDN2Options:
    try:
        return GDN2Options(
            scale=check_scale(op, scale, q.shape[-1]),
            use_qk_l2norm=bool(use_qk_l2norm_in_kernel),
            use_gate_in_kernel=bool(use_gate_in_kernel),
            use_bw_sigmoid=bool(use_bw_sigmoid_in_kernel),
            erase_max=float(erase_max),
            backend=backend,
        )
    except ValueError as e:
        if str(e).startswith(op):
            raise
        raise ValueError(f"{op}: {e}") from None


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
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
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
        backend: ``auto`` (Triton on CUDA where the kernels apply, else ``torch``), ``torch`` (chunked PyTorch),
            ``naive`` (token-by-token reference) or ``triton`` (fixed-length or packed batches, K and V up to 128).

    Returns:
        ``(o, final_state)``: ``o`` is ``[B, T, HV, V]`` in v's dtype; ``final_state`` ``[N, HV, K, V]`` or None.

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
    opts = _options(op, q, scale, use_qk_l2norm_in_kernel, use_gate_in_kernel, use_bw_sigmoid_in_kernel,
                    erase_max, backend)
    N = B if cu_seqlens is None else check_cu_seqlens(op, cu_seqlens, B, T, q.device)
    if initial_state is not None:
        check_state(op, "initial_state", initial_state, N, HV, K, V, q.dtype, q.device)
    if opts.use_gate_in_kernel:
        check_gate_params(op, A_log, dt_bias, g.shape[2], K, q.device)
    path = _resolve(op, opts.backend, q.device, CHUNK_BACKENDS)
    if path == "triton":
        why = _triton_chunk_unsupported(q, k, v, g, b, w, initial_state, A_log, dt_bias, cu_seqlens)
        if why and opts.backend == "triton":
            fail(op, "backend", f"'triton' only where the Triton chunked kernels apply ({why})", "'triton'")
        path = "torch" if why else path
    # The op sets its own precision (fp32 accumulation, fp32 state); autocast must not push its products to bf16.
    with torch.autocast(q.device.type, enabled=False):
        if path == "triton":
            from gdn2ts.ops.act_triton import triton_activate
            from gdn2ts.ops.chunk_triton import triton_chunk

            # one Triton pre-pass applies the options (fp32 arithmetic; q, k, b, w stored back in their dtypes, g in
            # fp32) and one post-pass gives their gradients: no PyTorch elementwise work around the kernels
            q, k, g, b, w = triton_activate(q, k, g, b, w, A_log, dt_bias, opts.use_qk_l2norm, opts.use_gate_in_kernel,
                                            opts.use_bw_sigmoid, opts.erase_max)
            o, final = triton_chunk(q, k, v, g, b, w, opts.scale, initial_state, output_final_state, cu_seqlens)
        else:
            q, k, g, b, w = _activate(q, k, g, b, w, opts, A_log, dt_bias)
            fn = reference.recurrent_reference if path == "naive" else reference.chunk_reference
            o, final = fn(q, k, v, g, b, w, opts.scale, initial_state, output_final_state, cu_seqlens)
    if final is not None and final is initial_state:
        final = final.clone()  # no token ran: never hand back the caller's tensor itself
    return o, final


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
    sdt = reference.state_dtype(q.dtype)
    if state_indices is not None:
        pool = initial_state
        valid = state_indices >= 0
        slots = state_indices.long().clamp(min=0)
        h0 = torch.where(valid[:, None, None, None], pool[slots], pool.new_zeros(()))
    else:
        h0 = initial_state if initial_state is not None else q.new_zeros(N, HV, K, V, dtype=sdt)
    o, final = reference.recurrent_reference(q, k, v, g, b, w, scale, h0, True, cu_seqlens)
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
    opts = _options(op, q, scale, use_qk_l2norm_in_kernel, use_gate_in_kernel, use_bw_sigmoid_in_kernel,
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
    path = _resolve(op, opts.backend, q.device, RECURRENT_BACKENDS)
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
            q, k, g, b, w = _activate(q, k, g, b, w, opts, A_log, dt_bias)
            o, final = _recurrent_torch(q, k, v, g, b, w, opts.scale, initial_state, cu_seqlens, state_indices)
    if state_indices is None and final is initial_state:
        final = final.clone()  # no token ran: never hand back the caller's tensor itself
    return o, (final if output_final_state or state_indices is not None else None)
