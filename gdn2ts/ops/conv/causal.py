"""``causal_conv1d``: causal depthwise short convolution with an explicit tail (the last ``width - 1`` inputs of each
sequence), the op under the GDN-2 layer's ``ShortConv``.

The tail is what a streaming conv has to remember: running a sequence in two parts, the second starting from the
tail left by the first, equals running it in one part.

Two paths compute it: PyTorch (``F.conv1d`` on the tail and the transposed input, concatenated) and the Triton
kernels of ``gdn2ts.kernels.conv``, which read ``x`` in place (rows of any stride, channels contiguous), fuse the
SiLU and recompute the pre-activation in the backward. Both take rows of different lengths (``lengths``) and packed
sequences (``cu_seqlens``; the kernels find each row's sequence on the device, with no padding and no host
synchronization). ``backend="auto"`` takes the kernels for CUDA tensors whenever they cover the call
(fp16/bf16/fp32, width up to 8) and PyTorch otherwise.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from gdn2ts.ops.gdn2.reference import pad_packed, unpad_packed
from gdn2ts.ops.validate import fail

__all__ = ["causal_conv1d", "CONV_BACKENDS", "ACTIVATIONS"]

CONV_BACKENDS = ("auto", "torch", "triton")
ACTIVATIONS = (None, "silu")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNEL_MAX_WIDTH = 8  # gdn2ts.kernels.conv.MAX_WIDTH (not imported here: that would load Triton with the layer)


class _TritonConv(torch.autograd.Function):
    """The kernels' forward and backward; ``weight`` ``[C, 1, W]`` as nn.Conv1d keeps it."""

    @staticmethod
    def forward(ctx, x, weight, tail, silu, lengths, cu_seqlens):
        from gdn2ts.kernels.conv import conv_fwd

        y, new_tail = conv_fwd(x, weight.reshape(weight.shape[0], -1), tail, silu, lengths=lengths,
                               cu_seqlens=cu_seqlens)
        ctx.save_for_backward(x, weight, tail, lengths, cu_seqlens)
        ctx.silu = silu
        # an unused output (often the new tail) then arrives as None and costs the backward nothing
        ctx.set_materialize_grads(False)
        return y, new_tail

    @staticmethod
    def backward(ctx, dy, dnew_tail):
        from gdn2ts.kernels.conv import conv_bwd

        x, weight, tail, lengths, cu_seqlens = ctx.saved_tensors
        need_dx, need_dw, need_dtail = ctx.needs_input_grad[:3]
        if dy is None and dnew_tail is None:
            return None, None, None, None, None, None
        # (inside an autocast region the few PyTorch ops here must keep their dtypes)
        with torch.autocast(x.device.type, enabled=False):
            # only the new tail has a gradient: the weight has none (as on the PyTorch path)
            need_dw = need_dw and dy is not None
            if dy is None:
                dy = torch.zeros(x.shape, device=x.device, dtype=x.dtype)
            dx, dw, dtail = conv_bwd(x, weight.reshape(weight.shape[0], -1), tail, dy, dnew_tail, ctx.silu,
                                     need_dx=need_dx, need_dtail=need_dtail and tail is not None, lengths=lengths,
                                     cu_seqlens=cu_seqlens)
        return dx, dw.reshape(weight.shape).to(weight.dtype) if need_dw else None, dtail, None, None, None


# torch.compile must not trace into the launches; a compiled model breaks its graph here (as for the chunked op)
@torch.compiler.disable
def _triton_conv(x, weight, tail, silu: bool, lengths=None, cu_seqlens=None):
    # (rows are read in place through their strides; only channels must be contiguous)
    x = x if x.stride(-1) == 1 else x.contiguous()
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, tail)):
        return _TritonConv.apply(x, weight, tail, silu, lengths, cu_seqlens)
    from gdn2ts.kernels.conv import conv_fwd

    return conv_fwd(x, weight.reshape(weight.shape[0], -1), tail, silu, lengths=lengths, cu_seqlens=cu_seqlens)


def _depthwise(xt: torch.Tensor, weight: torch.Tensor, L: int) -> torch.Tensor:
    """``xt`` ``[N, C, W - 1 + L]`` (tail then inputs), ``weight`` ``[C, 1, W]`` -> ``[N, C, L]``.

    Short windows on the CPU take ``W`` shifted multiply-adds: the CPU's depthwise ``conv1d`` backward costs about
    three times as much there (many short rows, as in patched forecasting windows); longer ones take ``conv1d``.
    """
    C, W = weight.shape[0], weight.shape[-1]
    if xt.device.type != "cpu" or L > 128:
        return F.conv1d(xt, weight, groups=C)
    y = xt[..., W - 1:] * weight[:, :, W - 1]
    for j in range(W - 1):
        y = y.addcmul(xt[..., j:j + L], weight[:, :, j])
    return y


def _kernel_unsupported(x, weight) -> str:
    """Why the Triton kernels cannot take this call ('' when they can)."""
    if x.dtype not in KERNEL_DTYPES:
        return f"fp16/bf16/fp32 inputs (got {x.dtype}; fp64 runs backend='torch')"
    if weight.shape[-1] > KERNEL_MAX_WIDTH:
        return f"width up to {KERNEL_MAX_WIDTH} (got {weight.shape[-1]})"
    return ""


def _check(op: str, x, weight, tail, lengths, cu_seqlens, activation, backend) -> None:
    if backend not in CONV_BACKENDS:
        fail(op, "backend", f"one of {CONV_BACKENDS}", repr(backend))
    if activation not in ACTIVATIONS:
        fail(op, "activation", f"one of {ACTIVATIONS}", repr(activation))
    if x.dim() != 3:
        fail(op, "x", "a 3-D tensor [N, L, C]", f"shape {tuple(x.shape)}")
    N, _, C = x.shape
    if cu_seqlens is not None:
        if lengths is not None:
            fail(op, "lengths", "None when cu_seqlens is given (use one of the two)", "a tensor")
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 \
                or cu_seqlens.dtype not in (torch.int32, torch.int64):
            fail(op, "cu_seqlens", "a 1-D int32/int64 tensor [N + 1] of offsets", getattr(cu_seqlens, "shape", None))
        if N != 1:
            fail(op, "x", "batch size 1 when cu_seqlens packs the sequences ([1, total, C])", f"shape {tuple(x.shape)}")
        if cu_seqlens.device != x.device:
            fail(op, "cu_seqlens", f"a tensor on x's device ({x.device})", f"one on {cu_seqlens.device}")
        N = cu_seqlens.numel() - 1
    if weight.dim() != 3 or weight.shape[0] != C or weight.shape[1] != 1 or weight.shape[2] < 1:
        fail(op, "weight", f"shape [C={C}, 1, W >= 1] (depthwise, as nn.Conv1d keeps it)",
             f"shape {tuple(weight.shape)}")
    W = weight.shape[-1]
    if tail is not None and tuple(tail.shape) != (N, C, W - 1):
        fail(op, "tail", f"shape [N={N}, C={C}, W-1={W - 1}]", f"shape {tuple(tail.shape)}")
    if lengths is not None and tuple(lengths.shape) != (N,):
        fail(op, "lengths", f"shape [N={N}]", f"shape {tuple(lengths.shape)}")
    if lengths is not None and lengths.device != x.device:
        fail(op, "lengths", f"a tensor on x's device ({x.device})", f"one on {lengths.device}")
    for name, t in (("weight", weight), ("tail", tail)):
        if t is not None and t.device != x.device:
            fail(op, name, f"a tensor on x's device ({x.device})", f"one on {t.device}")


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    tail: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    activation: str | None = None,
    backend: str = "auto",
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv of ``x`` continuing from ``tail``; returns ``(y, new_tail)``.

    Args:
        x: ``[N, L, C]`` inputs; with ``lengths``, row ``n`` holds ``lengths[n]`` valid tokens then padding; with
            ``cu_seqlens``, ``[1, total, C]`` holding N packed sequences.
        weight: ``[C, 1, W]`` depthwise kernel (no bias); ``y_t = sum_j weight[:, 0, j] * x_{t - W + 1 + j}``.
        tail: ``[N, C, W - 1]`` the inputs before ``x[:, 0]`` (zeros when omitted).
        lengths: ``[N]`` valid tokens per row (all ``L`` when omitted).
        activation: ``None`` or ``"silu"`` (applied to ``y``).
        backend: ``"auto"`` (the Triton kernels for CUDA tensors when they cover the call, else PyTorch),
            ``"torch"``, or ``"triton"`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` for tests;
            fp16/bf16/fp32, ``W <= 8``). The kernels accumulate in fp32 with the weight in fp32; the PyTorch path
            casts the weight to ``x``'s dtype.
        cu_seqlens: ``[N + 1]`` offsets of N sequences packed in ``x`` (``[1, total, C]``); ``tail`` is then
            ``[N, C, W - 1]``, one per sequence, and each sequence's conv starts from its own tail.

    Returns:
        ``y`` ``[N, L, C]`` (rows are garbage past their length; ``[1, total, C]`` when packed) and ``new_tail``
        ``[N, C, W - 1]``: the last ``W - 1`` inputs of ``tail ++ x[n, :lengths[n]]`` (of ``tail[n] ++`` sequence
        ``n``), so a row shorter than ``W - 1`` keeps part of its old tail. Both in ``x``'s dtype; differentiable in
        ``x``, ``weight`` and ``tail`` (also through ``new_tail``).

    Example:
        >>> import torch
        >>> x, weight = torch.randn(2, 10, 3), torch.randn(3, 1, 4)
        >>> y, tail = causal_conv1d(x, weight)
        >>> y1, tail1 = causal_conv1d(x[:, :6], weight)
        >>> y2, tail2 = causal_conv1d(x[:, 6:], weight, tail1)
        >>> bool(torch.allclose(torch.cat([y1, y2], 1), y, atol=1e-6)), bool(torch.equal(tail2, tail))
        (True, True)
    """
    op = "causal_conv1d"
    _check(op, x, weight, tail, lengths, cu_seqlens, activation, backend)
    N, L, C = x.shape
    N = N if cu_seqlens is None else cu_seqlens.numel() - 1
    W = weight.shape[-1]
    if L == 0:
        # conv1d rejects inputs shorter than its kernel; no token means no output and an unchanged tail
        tail = x.new_zeros(N, C, W - 1) if tail is None else tail
        return x.new_zeros(x.shape[0], 0, C), tail.to(x.dtype, copy=True)
    why = _kernel_unsupported(x, weight)
    if backend == "triton":
        if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            fail(op, "backend", "'triton' only for CUDA tensors (or under TRITON_INTERPRET=1)",
                 f"tensors on {x.device}")
        if why:
            fail(op, "backend", f"'triton' only where the kernels apply: {why}", "'triton'")
    if backend == "triton" or (backend == "auto" and x.is_cuda and not why):
        return _triton_conv(x, weight, tail, activation == "silu", lengths, cu_seqlens)
    if cu_seqlens is not None:
        # the PyTorch path pads the packed sequences into rows (a host synchronization for the longest; the
        # kernels need none)
        padded, index = pad_packed(x, cu_seqlens)
        y, new_tail = causal_conv1d(padded, weight, tail, cu_seqlens[1:] - cu_seqlens[:-1], activation, "torch")
        return unpad_packed(y, index, L), new_tail
    if tail is None:
        tail = x.new_zeros(N, C, W - 1)
    xt = torch.cat([tail.to(x.dtype), x.transpose(1, 2)], dim=-1)  # [N, C, W - 1 + L]
    y = _depthwise(xt, weight.to(x.dtype), L).transpose(1, 2)  # [N, L, C]
    if lengths is None:
        new_tail = xt[..., xt.shape[-1] - (W - 1):]
    else:
        # row n's last W - 1 inputs sit at positions lengths[n] .. lengths[n] + W - 2 of xt
        pos = lengths.to(device=x.device, dtype=torch.long)[:, None] + torch.arange(W - 1, device=x.device)
        new_tail = xt.gather(-1, pos[:, None, :].expand(N, C, W - 1))
    return (F.silu(y) if activation == "silu" else y), new_tail
