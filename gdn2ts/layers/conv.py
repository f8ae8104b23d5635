"""Causal depthwise short convolution with an explicit tail (the last ``width - 1`` inputs of each sequence).

The tail is what a streaming conv has to remember: running a sequence in two parts, the second starting from the
tail left by the first, equals running it in one part.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ShortConv", "causal_conv1d"]


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    tail: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv of ``x`` continuing from ``tail``; returns ``(y, new_tail)``.

    Args:
        x: ``[N, L, C]`` inputs; with ``lengths``, row ``n`` holds ``lengths[n]`` valid tokens then padding.
        weight: ``[C, 1, W]`` depthwise kernel (no bias); ``y_t = sum_j weight[:, 0, j] * x_{t - W + 1 + j}``.
        tail: ``[N, C, W - 1]`` the inputs before ``x[:, 0]`` (zeros when omitted).
        lengths: ``[N]`` valid tokens per row (all ``L`` when omitted).

    Returns:
        ``y`` ``[N, L, C]`` (rows are garbage past their length) and ``new_tail`` ``[N, C, W - 1]``: the last
        ``W - 1`` inputs of ``tail ++ x[n, :lengths[n]]``, so a row shorter than ``W - 1`` keeps part of its old tail.

    Example:
        >>> import torch
        >>> x, weight = torch.randn(2, 10, 3), torch.randn(3, 1, 4)
        >>> y, tail = causal_conv1d(x, weight)
        >>> y1, tail1 = causal_conv1d(x[:, :6], weight)
        >>> y2, tail2 = causal_conv1d(x[:, 6:], weight, tail1)
        >>> bool(torch.allclose(torch.cat([y1, y2], 1), y, atol=1e-6)), bool(torch.equal(tail2, tail))
        (True, True)
    """
    N, L, C = x.shape
    W = weight.shape[-1]
    if tail is None:
        tail = x.new_zeros(N, C, W - 1)
    if L == 0:
        # conv1d rejects inputs shorter than its kernel; no token means no output and an unchanged tail
        return x.new_zeros(N, 0, C), tail.to(x.dtype, copy=True)
    xt = torch.cat([tail.to(x.dtype), x.transpose(1, 2)], dim=-1)  # [N, C, W - 1 + L]
    y = F.conv1d(xt, weight.to(x.dtype), groups=C).transpose(1, 2)  # [N, L, C]
    if lengths is None:
        new_tail = xt[..., xt.shape[-1] - (W - 1):]
    else:
        # row n's last W - 1 inputs sit at positions lengths[n] .. lengths[n] + W - 2 of xt
        pos = lengths.to(device=x.device, dtype=torch.long)[:, None] + torch.arange(W - 1, device=x.device)
        new_tail = xt.gather(-1, pos[:, None, :].expand(N, C, W - 1))
    return y, new_tail


class ShortConv(nn.Conv1d):
    """Depthwise causal conv of width ``W`` over ``C`` channels, no bias, with SiLU on the output.

    An ``nn.Conv1d`` (weight ``[C, 1, W]``, PyTorch's default init) whose calls go through :func:`causal_conv1d`,
    so that sequences can continue from a tail.

    Example:
        >>> import torch
        >>> conv = ShortConv(channels=6, width=4)
        >>> x = torch.randn(2, 5, 6)
        >>> y, tail = conv(x)
        >>> y_t, tail_t = conv.step(x[:, 0], torch.zeros(2, 6, 3))
        >>> y.shape, tail.shape, bool(torch.allclose(y_t, y[:, 0], atol=1e-6))
        (torch.Size([2, 5, 6]), torch.Size([2, 6, 3]), True)
    """

    def __init__(self, channels: int, width: int):
        super().__init__(channels, channels, width, groups=channels, bias=False)

    def forward(self, x: torch.Tensor, tail: torch.Tensor | None = None, lengths: torch.Tensor | None = None):
        """``x`` ``[N, L, C]`` -> ``(silu(conv(x)) [N, L, C], new_tail [N, C, W - 1])``; see :func:`causal_conv1d`."""
        y, new_tail = causal_conv1d(x, self.weight, tail, lengths)
        return F.silu(y), new_tail

    def step(self, x_t: torch.Tensor, tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row: ``x_t`` ``[N, C]``, ``tail`` ``[N, C, W - 1]`` -> ``(y_t [N, C], new_tail)``."""
        y, new_tail = self.forward(x_t[:, None], tail)
        return y[:, 0], new_tail
