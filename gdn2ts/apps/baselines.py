"""The recurrent baselines of the recall probes, each a :class:`~gdn2ts.models.StreamEncoder` with another mixer:

* :class:`~gdn2ts.models.encoder.GRUEncoder`: one dense GRU per block whose state equals an encoder layer's floats
  (:func:`encoder_state_floats`). A dense GRU pays ``3 * S * (hidden + S)`` weights for a state of ``S`` floats:
  about 20 times the encoder's parameters at the probes' size.
* :class:`GroupedGRUEncoder`: the same state split into independent GRUs of ``group_size`` floats
  (:class:`GroupedGRUMixer`, a block-diagonal GRU), each fed ``group_io`` channels of an input projection and read
  out through ``group_io`` channels into the output projection, as an encoder's mixer reads and writes the
  residual stream through narrow per-head projections. Its parameters grow as ``S * (3 * group_size + ...)``
  rather than ``3 * S * S``, which lets state and parameters both match the encoders'.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gdn2ts.models.encoder import EncoderConfig, GRUEncoder, StreamEncoder

__all__ = ["GRUEncoder", "GroupedGRUEncoder", "GroupedGRUMixer", "check_groups", "encoder_state_floats"]


def encoder_state_floats(config: EncoderConfig) -> int:
    """Floats one stream carries per layer in a :class:`StreamEncoder`: the mixer's recurrent state
    ``H * K * V`` plus its conv tail ``(2 * H * K + H * V) * (conv_size - 1)`` (the last output and time are
    per stream, not per layer, and the GRU baseline carries them too).

    Example:
        >>> encoder_state_floats(EncoderConfig(n_channels=3, num_heads=2, head_dim=8))
        272
    """
    enc = StreamEncoder(config)
    mixer = enc.mixers[0].config
    recurrent = mixer.num_v_heads * mixer.head_k_dim * mixer.head_v_dim
    return recurrent + mixer.conv_channels * (mixer.conv_size - 1)


def _positive(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: argument '{name}' expected a positive int, got {value!r}")


def check_groups(owner: str, state_size: int, group_size: int, group_io: int) -> None:
    """Raise ``ValueError`` naming ``owner`` unless the sizes are positive ints and ``group_size`` divides
    ``state_size``."""
    for name, value in (("state_size", state_size), ("group_size", group_size), ("group_io", group_io)):
        _positive(owner, name, value)
    if state_size % group_size:
        raise ValueError(f"{owner}: argument 'group_size' expected a divisor of state_size={state_size}, "
                         f"got {group_size}")


def grouped_gru_scan_reference(gi: torch.Tensor, h: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor,
                               keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The grouped GRU's recurrence step by step through autograd (the ground truth of :class:`_GroupedGRUScan`).

    Args:
        gi: ``[T, G, B, 3s]`` input gate pre-activations (r | z | n, biases included).
        h: ``[G, B, s]`` initial state.
        w_hh: ``[G, s, 3s]`` recurrent weights; ``b_hh``: ``[G, 3s]``.
        keep: ``[T, 1, B, 1]`` 1 where a token is kept, 0 where it is skipped (state unchanged, output 0); None:
            all kept.

    Returns:
        ``(y [T, G, B, s], final state [G, B, s])``.
    """
    s = h.shape[-1]
    outs = []
    for t in range(gi.shape[0]):
        gh = torch.baddbmm(b_hh[:, None], h, w_hh)
        r, z = torch.sigmoid(gi[t, ..., :2 * s] + gh[..., :2 * s]).split(s, dim=-1)
        n = torch.tanh(gi[t, ..., 2 * s:] + r * gh[..., 2 * s:])
        new = n + z * (h - n)
        h = new if keep is None else keep[t] * new + (1 - keep[t]) * h
        outs.append(new if keep is None else new * keep[t])
    return torch.stack(outs), h


class _GroupedGRUScan(torch.autograd.Function):
    """The recurrence of :func:`grouped_gru_scan_reference` with a hand-written backward through time: the
    autograd graph of a step-by-step loop costs more than its arithmetic at these sizes (a few thousand floats a
    step), so the forward runs without one and the backward replays the steps from the saved gates."""

    @staticmethod
    def forward(ctx, gi, h0, w_hh, b_hh, keep):
        T, s = gi.shape[0], h0.shape[-1]
        hs, rs, zs, ns, ghn = [h0], [], [], [], []
        h = h0
        for t in range(T):
            gh = torch.baddbmm(b_hh[:, None], h, w_hh)
            r, z = torch.sigmoid(gi[t, ..., :2 * s] + gh[..., :2 * s]).split(s, dim=-1)
            n = torch.tanh(gi[t, ..., 2 * s:] + r * gh[..., 2 * s:])
            new = n + z * (h - n)
            h = new if keep is None else torch.where(keep[t] > 0, new, h)
            hs.append(h)
            rs.append(r)
            zs.append(z)
            ns.append(n)
            ghn.append(gh[..., 2 * s:])
        ctx.save_for_backward(torch.stack(hs), torch.stack(rs), torch.stack(zs), torch.stack(ns), torch.stack(ghn),
                              w_hh, keep)
        # the output is the new state at kept tokens and 0 at skipped ones
        y = torch.stack(hs[1:])
        return (y if keep is None else y * keep), h

    @staticmethod
    def backward(ctx, dy, dh):
        hs, rs, zs, ns, ghn, w_hh, keep = ctx.saved_tensors
        T = rs.shape[0]
        w_t = w_hh.transpose(1, 2)
        dh = torch.zeros_like(hs[0]) if dh is None else dh
        dgi, dgh = [], []
        for t in reversed(range(T)):
            d_new = dh if dy is None else dh + dy[t]
            if keep is not None:
                d_new = d_new * keep[t]
            r, z, n = rs[t], zs[t], ns[t]
            da_n = d_new * (1 - z) * (1 - n * n)
            da_z = d_new * (hs[t] - n) * z * (1 - z)
            da_r = da_n * ghn[t] * r * (1 - r)
            # gradients of the input and of the recurrent pre-activations differ only in n's (r gates the latter)
            dgi.append(torch.cat([da_r, da_z, da_n], dim=-1))
            dgh.append(torch.cat([da_r, da_z, da_n * r], dim=-1))
            back = torch.bmm(dgh[-1], w_t) + d_new * z
            dh = back if keep is None else back + dh * (1 - keep[t])
        dgi, dgh = torch.stack(dgi[::-1]), torch.stack(dgh[::-1])  # [T, G, B, 3s]
        dw = torch.einsum("tgbs,tgbk->gsk", hs[:-1], dgh)
        return dgi, dh, dw, dgh.sum((0, 2)), None


class GroupedGRUMixer(nn.Module):
    """Block-diagonal GRU mixer ``[B, T, hidden] -> [B, T, hidden]``; its state is ``[B, state_size]``, the
    concatenation of ``G = state_size / group_size`` independent GRUs.

    Group ``g`` reads ``u_g = in_proj(x)[g]`` (``group_io`` channels) and updates its ``s = group_size`` floats with
    PyTorch's GRU equations (gates in the order r, z, n)::

        r, z = sigmoid(W_ir u + b_ir + W_hr h + b_hr), sigmoid(W_iz u + b_iz + W_hz h + b_hz)
        n = tanh(W_in u + b_in + r * (W_hn h + b_hn));   h' = (1 - z) * n + z * h

    then the mixer's output is ``out_proj(concat_g(R_g h'_g))`` with ``R_g`` ``[group_io, s]``. Parameters:
    ``hidden * G * io`` (in) + ``G * 3s * (io + s + 2)`` (the GRUs) + ``G * s * io`` (read-out) + ``G * io * hidden``
    (out). With ``group_size == state_size`` it is one dense GRU behind a projection.

    Tokens where ``attention_mask`` (``step``: ``mask``) is False are skipped exactly: the state passes through
    them unchanged and their output is 0. ``decay_scale`` is accepted and ignored (elapsed time reaches the GRU only
    through its input, as for :class:`~gdn2ts.layers.gru.GRUMixer`).

    Example:
        >>> import torch
        >>> mixer = GroupedGRUMixer(hidden_size=8, state_size=12, group_size=4, group_io=1)
        >>> x = torch.randn(2, 5, 8)
        >>> y, state = mixer(x, attention_mask=torch.tensor([[True] * 5, [True, False, True, True, False]]))
        >>> y_t, _ = mixer.step(x[:, 0], mixer.init_state(2))
        >>> y.shape, state.shape, bool(torch.allclose(y_t, y[:, 0], atol=1e-6))
        (torch.Size([2, 5, 8]), torch.Size([2, 12]), True)
    """

    def __init__(self, hidden_size: int, state_size: int, group_size: int, group_io: int = 1):
        super().__init__()
        _positive("GroupedGRUMixer", "hidden_size", hidden_size)
        check_groups("GroupedGRUMixer", state_size, group_size, group_io)
        self.state_size, self.group_size, self.group_io = state_size, group_size, group_io
        G, s, io = state_size // group_size, group_size, group_io
        self.groups = G
        self.in_proj = nn.Linear(hidden_size, G * io, bias=False)
        # per group: input and recurrent weights of the three gates, [G, in, 3s] (r | z | n along the last axis)
        self.w_ih = nn.Parameter(torch.empty(G, io, 3 * s))
        self.w_hh = nn.Parameter(torch.empty(G, s, 3 * s))
        self.b_ih = nn.Parameter(torch.empty(G, 3 * s))
        self.b_hh = nn.Parameter(torch.empty(G, 3 * s))
        self.read = nn.Parameter(torch.empty(G, s, io))
        self.out_proj = nn.Linear(G * io, hidden_size, bias=False)
        # nn.GRU's initialization (uniform in +-1/sqrt(state per GRU)); the read-out as a Linear(s -> io)
        bound = 1.0 / math.sqrt(s)
        for p in (self.w_ih, self.w_hh, self.b_ih, self.b_hh, self.read):
            nn.init.uniform_(p, -bound, bound)

    def init_state(self, batch: int, device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Zero state ``[batch, state_size]``."""
        p = self.w_hh
        return torch.zeros(batch, self.state_size, device=p.device if device is None else device,
                           dtype=p.dtype if dtype is None else dtype)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, decay_scale: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[B, T, hidden]`` -> ``(y [B, T, hidden], new_state [B, state_size])``; ``state`` is not
        modified."""
        B, T, _ = x.shape
        G, s, io = self.groups, self.group_size, self.group_io
        h0 = self.init_state(B, x.device, x.dtype) if state is None else state
        if tuple(h0.shape) != (B, self.state_size):
            raise ValueError(f"GroupedGRUMixer: argument 'state' expected shape [B={B}, {self.state_size}], got "
                             f"{tuple(h0.shape)}")
        u = self.in_proj(x).view(B, T, G, io)
        # every step's input gates at once, laid out [T, G, B, 3s] for the loop's batched (per group) products
        gi = torch.einsum("btgi,gik->tgbk", u, self.w_ih) + self.b_ih[None, :, None]
        keep = None
        if attention_mask is not None and not (x.device.type == "cpu" and bool(attention_mask.all())):
            keep = attention_mask.to(gi.dtype).T[:, None, :, None]  # [T, 1, B, 1]
        h = h0.view(B, G, s).transpose(0, 1)  # [G, B, s]
        y, h = _GroupedGRUScan.apply(gi, h, self.w_hh, self.b_hh, keep) if T else (x.new_zeros(0, G, B, s), h)
        y = torch.einsum("tgbs,gsi->btgi", y, self.read).reshape(B, T, G * io)
        return self.out_proj(y), h.transpose(0, 1).reshape(B, self.state_size)

    def step(self, x_t: torch.Tensor, state: torch.Tensor | None = None, mask: torch.Tensor | None = None,
             decay_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row: ``x_t`` ``[B, hidden]`` -> ``(y_t [B, hidden], new_state)``."""
        y, h = self.forward(x_t[:, None], state, None if mask is None else mask[:, None])
        return y[:, 0], h


class GroupedGRUEncoder(StreamEncoder):
    """The stream encoder with a :class:`GroupedGRUMixer` in each block (tokens, MLPs, heads, checks and state
    handling are the encoder's); each layer's state is ``[B, state_size]``.

    Args:
        config: the encoder configuration (``variant``, ``num_heads`` and ``head_dim`` are not used).
        state_size: floats per layer (:func:`encoder_state_floats` gives an encoder's).
        group_size: floats per independent GRU (a divisor of ``state_size``).
        group_io: input and read-out channels per GRU.

    Example:
        >>> import torch
        >>> cfg = EncoderConfig(n_channels=3, hidden_size=16, horizon=4)
        >>> gru = GroupedGRUEncoder(cfg, state_size=24, group_size=8)
        >>> out = gru(torch.randn(2, 10, 3), torch.arange(10.0).expand(2, 10).double())
        >>> out["forecast"].shape, out["state"].layers[0].shape, gru.mixers[0].groups
        (torch.Size([2, 10, 4, 3, 3]), torch.Size([2, 24]), 3)
    """

    def __init__(self, config: EncoderConfig, state_size: int, group_size: int, group_io: int = 1):
        if not isinstance(config, EncoderConfig):
            raise ValueError(f"GroupedGRUEncoder: 'config' expected an EncoderConfig, got {type(config).__name__}")
        # checked here, so that a bad size fails before any layer is built
        check_groups("GroupedGRUEncoder", state_size, group_size, group_io)
        super().__init__(config, mixer=lambda: GroupedGRUMixer(config.hidden_size, state_size, group_size, group_io))
        self.state_size = state_size
