"""Argument checks shared by the public ops: every failure is a ``ValueError`` naming the argument, what was
expected and what was given."""

from __future__ import annotations

import math
import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def fail(op: str, arg: str, expected: str, got: object) -> None:
    raise ValueError(f"{op}: argument '{arg}' expected {expected}, got {got}")


def _shape(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}"


def check_values(t: torch.Tensor) -> bool:
    """Whether to check the values of index tensors (cu_seqlens, state slots). Reading values of a CUDA tensor
    synchronizes with the device (tens of microseconds, and impossible while a CUDA graph is captured), so on CUDA
    they are checked only when ``GDN2TS_CHECK_VALUES=1``; shapes, dtypes and devices are always checked."""
    return not t.is_cuda or os.environ.get("GDN2TS_CHECK_VALUES") == "1"


def check_sequence_inputs(op: str, q, k, v, g, b, w) -> tuple[int, int, int, int, int, int]:
    """Check q, k, v, g, b, w; return ``(B, T, H, HV, K, V)``."""
    named = {"q": q, "k": k, "v": v, "g": g, "b": b, "w": w}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            fail(op, name, "a torch.Tensor", type(t).__name__)
        if t.dim() != 4:
            fail(op, name, "a 4-D tensor [B, T, heads, dim]", f"{t.dim()}-D {_shape(t)}")
        if t.dtype not in FLOAT_DTYPES:
            fail(op, name, "a floating dtype (float16, bfloat16, float32, float64)", t.dtype)
        if t.device != q.device:
            fail(op, name, f"a tensor on {q.device} (the device of 'q')", t.device)
    for name in ("k", "v"):
        if named[name].dtype != q.dtype:
            fail(op, name, f"dtype {q.dtype} (the dtype of 'q')", named[name].dtype)
    B, T, H, K = q.shape
    if k.shape != q.shape:
        fail(op, "k", f"shape {tuple(q.shape)} (the shape of 'q', [B, T, H, K])", _shape(k))
    HV, V = v.shape[2], v.shape[3]
    if v.shape[:2] != (B, T) or HV % H != 0 or HV == 0:
        fail(op, "v", f"shape [B={B}, T={T}, HV, V] with HV a multiple of H={H}", _shape(v))
    if w.shape != v.shape:
        fail(op, "w", f"shape {tuple(v.shape)} (the shape of 'v', [B, T, HV, V])", _shape(w))
    for name in ("g", "b"):
        t = named[name]
        if t.shape[:2] != (B, T) or t.shape[2] not in (H, HV) or t.shape[3] != K:
            heads = f"{H}" if H == HV else f"{H} or {HV}"
            fail(op, name, f"shape [B={B}, T={T}, heads={heads}, K={K}]", _shape(t))
    if K == 0 or V == 0:
        fail(op, "q" if K == 0 else "v", "a non-empty head dimension", "0")
    return B, T, H, HV, K, V


def check_scale(op: str, scale, K: int) -> float:
    if scale is None:
        return K**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        fail(op, "scale", "a finite positive number (default K ** -0.5)", repr(scale))
    return float(scale)


def check_cu_seqlens(op: str, cu_seqlens, B: int, T: int, device: torch.device) -> int:
    """Check packed offsets; return the number of sequences."""
    if not isinstance(cu_seqlens, torch.Tensor):
        fail(op, "cu_seqlens", "a 1-D int32/int64 tensor of offsets", type(cu_seqlens).__name__)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        fail(op, "cu_seqlens", "a 1-D tensor [N + 1] with N >= 1", _shape(cu_seqlens))
    if cu_seqlens.dtype not in INDEX_DTYPES:
        fail(op, "cu_seqlens", "dtype int32 or int64", cu_seqlens.dtype)
    if cu_seqlens.device != device:
        fail(op, "cu_seqlens", f"a tensor on {device} (the device of 'q')", cu_seqlens.device)
    if B != 1:
        fail(op, "q", "batch size 1 when cu_seqlens packs the sequences ([1, total, H, K])", f"batch size {B}")
    if check_values(cu_seqlens) and not (cu_seqlens.is_cuda and torch.cuda.is_current_stream_capturing()):
        first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
        if first != 0 or last != T:
            fail(op, "cu_seqlens", f"offsets from 0 to T={T}", f"from {first} to {last}")
        if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            fail(op, "cu_seqlens", "non-decreasing offsets", cu_seqlens.tolist())
    return cu_seqlens.numel() - 1


def expected_state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_state(op: str, arg: str, state, N: int | None, HV: int, K: int, V: int, dtype, device,
                pool: bool = False, v_first: bool = False) -> None:
    """State ``[N, HV, K, V]`` (``[N, HV, V, K]`` with ``v_first``) in fp32 (fp64 for fp64 inputs); ``N=None``
    accepts any leading size. A state pool (``pool=True``) may also be bf16, for memory-bound serving (computed in
    fp32, stored rounded)."""
    if not isinstance(state, torch.Tensor):
        fail(op, arg, "a torch.Tensor [N, HV, V, K]" if v_first else "a torch.Tensor [N, HV, K, V]",
             type(state).__name__)
    n = state.shape[0] if (N is None and state.dim() == 4) else N
    want = (n, HV, V, K) if v_first else (n, HV, K, V)
    if tuple(state.shape) != want:
        lead = "P (pool size)" if N is None else f"N={N}"
        tail = f"V={V}, K={K}" if v_first else f"K={K}, V={V}"
        fail(op, arg, f"shape [{lead}, HV={HV}, {tail}]", _shape(state))
    sdt = expected_state_dtype(dtype)
    if pool and sdt == torch.float32 and state.dtype == torch.bfloat16:
        pass
    elif state.dtype != sdt:
        also = " or torch.bfloat16 for a pool" if pool and sdt == torch.float32 else ""
        fail(op, arg, f"dtype {sdt}{also} (the state is kept in {sdt} for {dtype} inputs)", state.dtype)
    if state.device != device:
        fail(op, arg, f"a tensor on {device} (the device of 'q')", state.device)


def check_gate_params(op: str, A_log, dt_bias, Hg: int, K: int, device, bounded: bool = False) -> None:
    """``A_log`` ``[Hg]`` (optional for the bounded gate) and ``dt_bias`` ``[Hg * K]`` / ``[Hg, K]`` or None."""
    if A_log is None and not bounded:
        fail(op, "A_log", f"a tensor [{Hg}] when use_gate_in_kernel=True (without lower_bound)", None)
    if A_log is not None:
        if not isinstance(A_log, torch.Tensor) or tuple(A_log.shape) != (Hg,):
            fail(op, "A_log", f"a tensor of shape [{Hg}] (one per head of 'g')", getattr(A_log, "shape", A_log))
        if A_log.device != device:
            fail(op, "A_log", f"a tensor on {device}", A_log.device)
    if dt_bias is not None:
        if not isinstance(dt_bias, torch.Tensor) or tuple(dt_bias.shape) not in ((Hg * K,), (Hg, K)):
            fail(op, "dt_bias", f"a tensor of shape [{Hg * K}] or [{Hg}, {K}]", getattr(dt_bias, "shape", dt_bias))
        if dt_bias.device != device:
            fail(op, "dt_bias", f"a tensor on {device}", dt_bias.device)
