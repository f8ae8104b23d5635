"""The GDN-2 layer's short conv as a module: ``ShortConv`` (an ``nn.Conv1d`` whose calls go through
:func:`gdn2ts.ops.conv.causal_conv1d`, so that sequences continue from a tail)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gdn2ts.ops.conv import causal_conv1d

__all__ = ["ShortConv", "causal_conv1d"]


class ShortConv(nn.Conv1d):
    """Depthwise causal conv of width ``W`` over ``C`` channels, with SiLU on the output: ``silu(conv(x))``, or
    ``silu(conv(x) + bias)`` with ``bias=True`` (Mamba-2's conv).

    An ``nn.Conv1d`` (weight ``[C, 1, W]``, bias ``[C]``, PyTorch's default init) whose calls go through
    :func:`causal_conv1d`, so that sequences can continue from a tail; on CUDA it runs the Triton kernels (SiLU
    fused when there is no bias; the bias and the SiLU after the kernel otherwise), for dense, ragged
    (``lengths``) and packed (``cu_seqlens``) batches.

    Example:
        >>> import torch
        >>> conv = ShortConv(channels=6, width=4)
        >>> x = torch.randn(2, 5, 6)
        >>> y, tail = conv(x)
        >>> y_t, tail_t = conv.step(x[:, 0], torch.zeros(2, 6, 3))
        >>> y.shape, tail.shape, bool(torch.allclose(y_t, y[:, 0], atol=1e-6))
        (torch.Size([2, 5, 6]), torch.Size([2, 6, 3]), True)
    """

    def __init__(self, channels: int, width: int, bias: bool = False):
        super().__init__(channels, channels, width, groups=channels, bias=bias)

    def forward(self, x: torch.Tensor, tail: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
                backend: str = "auto", cu_seqlens: torch.Tensor | None = None):
        """``x`` ``[N, L, C]`` -> ``(silu(conv(x) [+ bias]) [N, L, C], new_tail [N, C, W - 1])``; see
        :func:`causal_conv1d` (the tail holds inputs, so the bias never enters it)."""
        if self.bias is None:
            return causal_conv1d(x, self.weight, tail, lengths, activation="silu", backend=backend,
                                 cu_seqlens=cu_seqlens)
        y, new_tail = causal_conv1d(x, self.weight, tail, lengths, activation=None, backend=backend,
                                    cu_seqlens=cu_seqlens)
        # the bias and the SiLU in fp32 (fp64 for fp64 inputs), as the kernel applies its SiLU
        dt = torch.promote_types(y.dtype, torch.float32)
        return F.silu(y.to(dt) + self.bias.to(dt)).to(y.dtype), new_tail

    def step(self, x_t: torch.Tensor, tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row: ``x_t`` ``[N, C]``, ``tail`` ``[N, C, W - 1]`` -> ``(y_t [N, C], new_tail)``."""
        y, new_tail = self.forward(x_t[:, None], tail)
        return y[:, 0], new_tail
