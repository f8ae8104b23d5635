"""The SwiGLU feed-forward block of every model (:class:`~gdn2ts.layers.block.Block`): ``down(silu(gate(x)) * up(x))``,
no biases."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SwiGLU"]


class SwiGLU(nn.Module):
    """SwiGLU MLP ``[..., hidden] -> [..., hidden]`` through ``intermediate`` channels; ``3 * hidden * intermediate``
    parameters (gate, up and down projections, bias-free).

    Example:
        >>> import torch
        >>> mlp = SwiGLU(hidden_size=16, intermediate_size=40)
        >>> mlp(torch.randn(2, 5, 16)).shape, sum(p.numel() for p in mlp.parameters())
        (torch.Size([2, 5, 16]), 1920)
    """

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SwiGLU: argument '{name}' expected an int >= 1, got {value!r}")
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
