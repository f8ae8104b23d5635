"""A GRU encoder with the :class:`~gdn2ts.models.StreamEncoder`'s tokens, blocks and heads: the recurrent baseline
of the recall probes.

Each block is pre-norm ``GRU(hidden -> state_size)`` then ``Linear(state_size -> hidden)`` on the residual stream,
then the same SwiGLU MLP. The token embedding (values, mask, ``log1p(elapsed)``, covariates) and the quantile and
reconstruction heads are the encoder's own code. A step at which no channel is observed is skipped exactly (the
GRU state is untouched and the outputs repeat the last observed step's), as in the encoder; unlike the encoder,
elapsed time only enters through the token (a GRU has no decay to scale).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from gdn2ts.layers import RMSNorm
from gdn2ts.models.encoder import EncoderConfig, StreamEncoder, _SwiGLU

__all__ = ["GRUEncoder", "GRUState", "encoder_state_floats"]


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


class GRUState(NamedTuple):
    """Per-stream state of a :class:`GRUEncoder` for ``B`` streams."""

    layers: tuple[torch.Tensor, ...]
    """Each block's GRU state ``[B, state_size]``."""
    last_time: torch.Tensor
    """``[B]`` float64 timestamp of the last observation (``-inf`` before the first)."""
    last_output: torch.Tensor
    """``[B, hidden]`` the output at the last observation."""


class GRUEncoder(nn.Module):
    """GRU blocks over ``[B, T, channels]`` observations with NaN for missing values; the interface of
    :class:`StreamEncoder` (``forward`` for windows, ``step`` for one timestamp per stream).

    Args:
        config: the encoder configuration (``variant``, ``num_heads`` and ``head_dim`` are not used).
        state_size: GRU state per block; :func:`encoder_state_floats` gives the size of an encoder's.

    Example:
        >>> import torch
        >>> cfg = EncoderConfig(n_channels=3, hidden_size=16, horizon=4)
        >>> gru = GRUEncoder(cfg, state_size=24)
        >>> values = torch.randn(2, 10, 3); values[0, 4] = float("nan")
        >>> times = torch.arange(10.0).expand(2, 10).double()
        >>> out = gru(values, times)
        >>> out["forecast"].shape, out["state"].layers[0].shape
        (torch.Size([2, 10, 4, 3, 3]), torch.Size([2, 24]))
    """

    # the token embedding, the heads and the input checks are the encoder's, shared rather than copied
    _embed = StreamEncoder._embed
    heads = StreamEncoder.heads
    _check = StreamEncoder._check
    _check_order = staticmethod(StreamEncoder._check_order)

    def __init__(self, config: EncoderConfig, state_size: int):
        super().__init__()
        if not isinstance(config, EncoderConfig):
            raise ValueError(f"GRUEncoder: 'config' expected an EncoderConfig, got {type(config).__name__}")
        if isinstance(state_size, bool) or not isinstance(state_size, int) or state_size < 1:
            raise ValueError(f"GRUEncoder: 'state_size' expected a positive int, got {state_size!r}")
        self.config = cfg = config
        self.state_size = state_size
        d = cfg.hidden_size
        self.embed = nn.Linear(2 * cfg.n_channels + 1 + cfg.n_covariates, d)
        self.grus = nn.ModuleList(nn.GRU(d, state_size, batch_first=True) for _ in range(cfg.n_layers))
        self.outs = nn.ModuleList(nn.Linear(state_size, d, bias=False) for _ in range(cfg.n_layers))
        self.mixer_norms = nn.ModuleList(RMSNorm(d, eps=cfg.norm_eps) for _ in range(cfg.n_layers))
        self.mlps = nn.ModuleList(_SwiGLU(d, cfg.mlp_ratio) for _ in range(cfg.n_layers))
        self.mlp_norms = nn.ModuleList(RMSNorm(d, eps=cfg.norm_eps) for _ in range(cfg.n_layers))
        self.out_norm = RMSNorm(d, eps=cfg.norm_eps)
        self.forecast_head = nn.Linear(d, cfg.horizon * cfg.n_channels * len(cfg.quantiles))
        self.reconstruct_head = nn.Linear(d, cfg.n_channels)

    def init_state(self, batch: int, device=None, dtype: torch.dtype | None = None) -> GRUState:
        """Zero state for ``batch`` streams."""
        p = self.embed.weight
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        return GRUState(tuple(torch.zeros(batch, self.state_size, device=device, dtype=dtype) for _ in self.grus),
                        torch.full((batch,), -math.inf, dtype=torch.float64, device=device),
                        torch.zeros(batch, self.config.hidden_size, device=device, dtype=dtype))

    def forward(self, values: torch.Tensor, timestamps: torch.Tensor, covariates: torch.Tensor | None = None,
                state: GRUState | None = None) -> dict:
        """Whole windows, differentiable; arguments and outputs as :meth:`StreamEncoder.forward`."""
        B, T = self._check(values, timestamps, covariates, 3)
        if state is None:
            state = self.init_state(B, device=values.device)
        observed = ~torch.isnan(values).all(-1)
        obs_times = torch.where(observed, timestamps, -math.inf)
        prev = torch.cat([state.last_time[:, None], obs_times[:, :-1]], dim=1).cummax(dim=1).values
        self._check_order(timestamps, prev, observed)
        elapsed = torch.where(torch.isfinite(prev), timestamps - prev, 0.0).where(observed, 0.0)
        x = self._embed(values, elapsed, covariates)
        # exact skipping: each row's observed tokens are moved to the front (in order) and run as a packed batch
        order = torch.sort((~observed).to(torch.int8), dim=1, stable=True).indices
        x = x.gather(1, order[..., None].expand_as(x))
        lengths = observed.sum(1)
        layer_states = []
        for gru, out, norm, mlp_norm, mlp, h0 in zip(self.grus, self.outs, self.mixer_norms, self.mlp_norms,
                                                     self.mlps, state.layers, strict=True):
            packed = pack_padded_sequence(norm(x), lengths.clamp(min=1).cpu(), batch_first=True,
                                          enforce_sorted=False)
            y, h_n = gru(packed, h0[None].contiguous())
            y = pad_packed_sequence(y, batch_first=True, total_length=T)[0]
            x = x + out(y)
            x = x + mlp(mlp_norm(x))
            layer_states.append(torch.where((lengths > 0)[:, None], h_n[0], h0))
        h = self.out_norm(x)
        # every step reads the output of the last observation at or before it (the state's before the first)
        idx = observed.long().cumsum(1) - 1
        h = torch.where((idx >= 0)[..., None], h.gather(1, idx.clamp(min=0)[..., None].expand(B, T, h.shape[-1])),
                        state.last_output[:, None].to(h.dtype))
        final_time = torch.maximum(state.last_time, obs_times.max(dim=1).values) if T else state.last_time
        new_state = GRUState(tuple(layer_states), final_time, h[:, -1] if T else state.last_output)
        return {**self.heads(h), "observed": observed, "state": new_state}

    @torch.no_grad()
    def step(self, values: torch.Tensor, timestamps: torch.Tensor, covariates: torch.Tensor | None = None,
             state: GRUState | None = None) -> dict:
        """One timestamp per stream: ``values`` ``[B, channels]``, ``timestamps`` ``[B]``; as
        :meth:`StreamEncoder.step`."""
        B, _ = self._check(values[:, None], timestamps[:, None],
                           None if covariates is None else covariates[:, None], 3)
        if state is None:
            state = self.init_state(B, device=values.device)
        observed = ~torch.isnan(values).all(-1)
        self._check_order(timestamps[:, None], state.last_time[:, None], observed[:, None])
        elapsed = torch.where(torch.isfinite(state.last_time), timestamps - state.last_time, 0.0).where(observed, 0.0)
        x = self._embed(values[:, None], elapsed[:, None], None if covariates is None else covariates[:, None])
        layer_states = []
        for gru, out, norm, mlp_norm, mlp, h0 in zip(self.grus, self.outs, self.mixer_norms, self.mlp_norms,
                                                     self.mlps, state.layers, strict=True):
            y, h_n = gru(norm(x), h0[None].contiguous())
            x = x + out(y)
            x = x + mlp(mlp_norm(x))
            layer_states.append(torch.where(observed[:, None], h_n[0], h0))
        h = torch.where(observed[:, None], self.out_norm(x[:, 0]), state.last_output.to(x.dtype))
        last_time = torch.where(observed, timestamps.to(torch.float64), state.last_time)
        return {**self.heads(h), "observed": observed, "state": GRUState(tuple(layer_states), last_time, h)}
