"""The GRU mixer of the recurrent baselines: ``GRU(hidden -> state_size)`` then ``Linear(state_size -> hidden)``,
with the mixers' interface (explicit state, masked tokens skipped exactly), so that a baseline is a
:class:`~gdn2ts.layers.block.Block` with this mixer rather than a model of its own."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

__all__ = ["GRUMixer"]


class GRUMixer(nn.Module):
    """GRU mixer ``[B, T, hidden] -> [B, T, hidden]``; its state is the GRU's ``[B, state_size]``.

    Tokens where ``attention_mask`` (``step``: ``mask``) is False are skipped exactly: the state passes through
    them unchanged and their output is 0. ``decay_scale`` is accepted and ignored (a GRU has no decay to scale;
    elapsed time reaches it only through its input).

    Example:
        >>> import torch
        >>> mixer = GRUMixer(hidden_size=8, state_size=12)
        >>> x = torch.randn(2, 5, 8)
        >>> y, state = mixer(x, attention_mask=torch.tensor([[True] * 5, [True, False, True, True, False]]))
        >>> y_t, _ = mixer.step(x[:, 0], mixer.init_state(2))
        >>> y.shape, state.shape, bool(torch.allclose(y_t, y[:, 0], atol=1e-6))
        (torch.Size([2, 5, 8]), torch.Size([2, 12]), True)
    """

    def __init__(self, hidden_size: int, state_size: int):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("state_size", state_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GRUMixer: argument '{name}' expected a positive int, got {value!r}")
        self.state_size = state_size
        self.gru = nn.GRU(hidden_size, state_size, batch_first=True)
        self.out = nn.Linear(state_size, hidden_size, bias=False)

    def init_state(self, batch: int, device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Zero state ``[batch, state_size]``."""
        p = self.out.weight
        return torch.zeros(batch, self.state_size, device=p.device if device is None else device,
                           dtype=p.dtype if dtype is None else dtype)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, decay_scale: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        h0 = self.init_state(B, x.device, x.dtype) if state is None else state
        if attention_mask is None:
            y, h_n = self.gru(x, h0[None].contiguous())
            return self.out(y), h_n[0]
        keep = attention_mask.bool()
        # each row's kept tokens moved to the front (in order) and run as a packed batch, then put back in place
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
        lengths = keep.sum(1)
        packed = pack_padded_sequence(x.gather(1, order[..., None].expand_as(x)), lengths.clamp(min=1).cpu(),
                                      batch_first=True, enforce_sorted=False)
        y, h_n = self.gru(packed, h0[None].contiguous())
        y = pad_packed_sequence(y, batch_first=True, total_length=T)[0]
        y = torch.zeros_like(y).scatter(1, order[..., None].expand_as(y), y) * keep[..., None]
        return self.out(y), torch.where((lengths > 0)[:, None], h_n[0], h0)

    def step(self, x_t: torch.Tensor, state: torch.Tensor | None = None, mask: torch.Tensor | None = None,
             decay_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row: ``x_t`` ``[B, hidden]`` -> ``(y_t [B, hidden], new_state)``."""
        h0 = self.init_state(x_t.shape[0], x_t.device, x_t.dtype) if state is None else state
        y, h_n = self.gru(x_t[:, None], h0[None].contiguous())
        y, h = y[:, 0], h_n[0]
        if mask is not None:
            y, h = y * mask[:, None], torch.where(mask[:, None], h, h0)
        return self.out(y), h
