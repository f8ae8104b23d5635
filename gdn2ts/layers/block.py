"""The residual block every model is built from: ``x + mixer(norm(x))``, then ``+ mlp(norm(.))`` (pre-norm).

The causal LM, the stream encoder and the pytorch-forecasting model all stack :class:`Block`\\ s; what differs is
the mixer each is given (GDN-2 and its variants, Mamba-3, attention, or the GRU baseline) and the keyword
arguments their calls pass through to it (``cu_seqlens``, ``attention_mask``, ``decay_scale``, ``mask``). The MLP
is :class:`~gdn2ts.layers.mlp.SwiGLU`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gdn2ts.layers.mlp import SwiGLU
from gdn2ts.layers.norm import RMSNorm

__all__ = ["Block", "fuse_gate_up", "split_gate_up"]


class Block(nn.Module):
    """Pre-norm residual block ``[B, T, hidden] -> [B, T, hidden]`` around a given mixer and MLP.

    ``forward(x, state, **kw)`` returns ``(x + mixer(norm(x), state, **kw)[0] -> then + mlp(norm(.)), new_state)``;
    ``step(x_t, state, **kw)`` does the same for one token per row ``[B, hidden]`` through ``mixer.step``. The
    mixer takes and returns its state explicitly (``(y, new_state)``); keyword arguments go to it unchanged.
    ``dropout`` (training only) applies to both residual branches.

    Example:
        >>> import torch
        >>> from gdn2ts.layers import GatedDeltaNet2, GDN2Config
        >>> mixer = GatedDeltaNet2(GDN2Config(hidden_size=16, num_heads=2, head_k_dim=8, head_v_dim=8,
        ...                                   gate_low_rank=4))
        >>> block = Block(mixer, SwiGLU(16, 32), hidden_size=16)
        >>> y, state = block(torch.randn(2, 5, 16))
        >>> y_t, _ = block.step(torch.randn(2, 16), state)
        >>> y.shape, y_t.shape
        (torch.Size([2, 5, 16]), torch.Size([2, 16]))
    """

    def __init__(self, mixer: nn.Module, mlp: SwiGLU, hidden_size: int, norm_eps: float = 1e-5,
                 dropout: float = 0.0):
        super().__init__()
        if not isinstance(mixer, nn.Module) or not isinstance(mlp, nn.Module):
            raise ValueError(f"Block: arguments 'mixer' and 'mlp' expected nn.Modules, got "
                             f"{type(mixer).__name__} and {type(mlp).__name__}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Block: argument 'dropout' expected a number in [0, 1), got {dropout!r}")
        self.mixer_norm = RMSNorm(hidden_size, norm_eps)
        self.mixer = mixer
        self.mlp_norm = RMSNorm(hidden_size, norm_eps)
        self.mlp = mlp
        self.dropout = float(dropout)

    def forward(self, x: torch.Tensor, state=None, **mixer_kwargs):
        y, state = self.mixer(self.mixer_norm(x), state, **mixer_kwargs)
        x = x + self._drop(y)
        return x + self._drop(self.mlp(self.mlp_norm(x))), state

    def _drop(self, y: torch.Tensor) -> torch.Tensor:
        return F.dropout(y, self.dropout, self.training) if self.dropout > 0 else y

    def step(self, x_t: torch.Tensor, state=None, **mixer_kwargs):
        y, state = self.mixer.step(self.mixer_norm(x_t), state, **mixer_kwargs)
        x_t = x_t + y
        return x_t + self.mlp(self.mlp_norm(x_t)), state


def split_gate_up(tensors: dict[str, torch.Tensor], old: str, new: str) -> None:
    """Rename, in place, a fused SwiGLU's ``{old}gate_up.weight`` ``[2 * I, hidden]`` and ``{old}down.weight``
    to :class:`SwiGLU`'s ``{new}gate_proj.weight``, ``{new}up_proj.weight`` (the first and second halves) and
    ``{new}down_proj.weight``: how weights of the models' earlier MLP load into the one MLP.

    Example:
        >>> import torch
        >>> sd = {"mlp.gate_up.weight": torch.arange(8.0).reshape(4, 2), "mlp.down.weight": torch.zeros(2, 2)}
        >>> split_gate_up(sd, "mlp.", "blocks.0.mlp.")
        >>> sorted(sd)
        ['blocks.0.mlp.down_proj.weight', 'blocks.0.mlp.gate_proj.weight', 'blocks.0.mlp.up_proj.weight']
        >>> sd["blocks.0.mlp.up_proj.weight"].tolist()
        [[4.0, 5.0], [6.0, 7.0]]
    """
    gate, up = tensors.pop(f"{old}gate_up.weight").chunk(2, dim=0)
    tensors[f"{new}gate_proj.weight"], tensors[f"{new}up_proj.weight"] = gate.contiguous(), up.contiguous()
    tensors[f"{new}down_proj.weight"] = tensors.pop(f"{old}down.weight")


def fuse_gate_up(tensors: dict[str, torch.Tensor], new: str, old: str) -> None:
    """The inverse of :func:`split_gate_up`, in place: ``{new}gate_proj``/``up_proj``/``down_proj`` back to
    ``{old}gate_up`` (concatenated) and ``{old}down``."""
    gate, up = tensors.pop(f"{new}gate_proj.weight"), tensors.pop(f"{new}up_proj.weight")
    tensors[f"{old}gate_up.weight"] = torch.cat([gate, up], dim=0)
    tensors[f"{old}down.weight"] = tensors.pop(f"{new}down_proj.weight")
