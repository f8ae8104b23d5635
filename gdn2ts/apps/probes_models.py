"""The models of the recall probes, matched in state and parameters, and the two instrument checks.

Mixers compared (each a :class:`~gdn2ts.models.StreamEncoder`: one token per timestamp, pre-norm blocks, the
same heads), all with the same state per stream and layer, ``S`` floats (:func:`~gdn2ts.apps.baselines.
encoder_state_floats`: the ``H x K x V`` recurrent state plus the short conv's tail):

* ``gdn2``, ``erase_only``, ``write_only``, ``kda``, ``gdn``, ``mamba2``: the GDN-2 mixer's presets
  (:meth:`~gdn2ts.layers.GDN2Config.variant`).
* ``gru``: a block-diagonal GRU of ``S`` floats (:class:`~gdn2ts.apps.baselines.GroupedGRUEncoder`).

Controls, which say whether a null result is about the mixers or about the probe:

* ``attention`` (positive): causal softmax attention over every past observation, without positional encoding
  (:class:`AttentionMixer`; a KV cache that grows by ``2 * heads * head_dim`` floats a step). Nothing is
  forgotten, so recall is limited only by what training teaches it; if it fails, the task or the budget is at
  fault.
* ``memoryless`` (negative): the GDN-2 encoder with its state reset before every step (:class:`StepLocalMixer`):
  the same weights and token, no memory across steps. Its score is the no-memory level at every bin.

Parameters are matched by setting the SwiGLU MLP width of every model so that its count meets the largest one's
at the base width (:func:`matched_mlp_widths`): the MLP works on one step at a time, so its width adds no memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from gdn2ts.apps.baselines import GroupedGRUEncoder, check_groups, encoder_state_floats
from gdn2ts.layers import GatedDeltaNet2, GDN2Config
from gdn2ts.models import EncoderConfig, StreamEncoder

__all__ = ["MIXERS", "CONTROLS", "MODELS", "AttentionMixer", "ProbeModelConfig", "StepLocalMixer", "build_model",
           "count_parameters", "matched_mlp_widths", "state_floats"]

MIXERS = ("gdn2", "erase_only", "write_only", "kda", "gdn", "mamba2", "gru")
CONTROLS = ("attention", "memoryless")
MODELS = MIXERS + CONTROLS


class StepLocalMixer(nn.Module):
    """A mixer with its state reset before every token: ``inner`` sees each token alone, from its zero state
    (``[B, T, hidden]`` runs as ``[B * T, 1, hidden]``), so a step's output depends on that step's token only.
    The state it returns is always the zero state.

    Example:
        >>> import torch
        >>> from gdn2ts.layers import GatedDeltaNet2, GDN2Config
        >>> mixer = StepLocalMixer(GatedDeltaNet2(GDN2Config(16, 2, head_k_dim=4, head_v_dim=4, gate_low_rank=4)))
        >>> x = torch.randn(2, 5, 16)
        >>> y, _ = mixer(x)
        >>> bool(torch.allclose(y[:, 3], mixer(x[:, 3:4])[0][:, 0], atol=1e-6))
        True
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def init_state(self, batch: int, device=None, dtype: torch.dtype | None = None):
        """The inner mixer's zero state."""
        return self.inner.init_state(batch, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, state=None, attention_mask: torch.Tensor | None = None,
                decay_scale: torch.Tensor | None = None):
        """``x`` ``[B, T, hidden]`` -> ``(y [B, T, hidden], zero state)``; ``state`` is ignored."""
        B, T, D = x.shape
        mask = None if attention_mask is None else attention_mask.reshape(B * T, 1)
        scale = None if decay_scale is None else decay_scale.reshape(B * T, 1)
        y, _ = self.inner(x.reshape(B * T, 1, D), None, attention_mask=mask, decay_scale=scale)
        return y.reshape(B, T, D), self.init_state(B, device=x.device, dtype=x.dtype)

    def step(self, x_t: torch.Tensor, state=None, mask: torch.Tensor | None = None,
             decay_scale: torch.Tensor | None = None):
        """One token per row ``[B, hidden]``, from the zero state."""
        y, _ = self.forward(x_t[:, None], None, None if mask is None else mask[:, None],
                            None if decay_scale is None else decay_scale[:, None])
        return y[:, 0], self.init_state(x_t.shape[0], device=x_t.device, dtype=x_t.dtype)


class AttentionMixer(nn.Module):
    """Causal softmax attention over every kept step so far, with the encoder mixers' interface: ``[B, T, hidden]
    -> [B, T, hidden]``, ``num_heads`` heads of ``head_dim``, no biases. No positional encoding: a query finds a
    step by its content alone, so what it can recall does not depend on how long ago the step was (the causal mask
    is the only order; elapsed time reaches it through the token). ``attention_mask`` (``step``: ``mask``) skips
    tokens (no query attends to them, their output is 0); ``decay_scale`` is accepted and ignored. Its state is the
    cache ``(k, v, kept)`` of every step so far: ``[B, heads, L, head_dim]`` twice and ``[B, L]``.

    Example:
        >>> import torch
        >>> mixer = AttentionMixer(hidden_size=16, num_heads=2, head_dim=4)
        >>> x = torch.randn(2, 5, 16)
        >>> y, state = mixer(x)
        >>> y_t, _ = mixer.step(x[:, 4], mixer(x[:, :4])[1])
        >>> y.shape, tuple(state[0].shape), bool(torch.allclose(y_t, y[:, 4], atol=1e-6))
        (torch.Size([2, 5, 16]), (2, 2, 5, 4), True)
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.qkv = nn.Linear(hidden_size, 3 * num_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def init_state(self, batch: int, device=None, dtype: torch.dtype | None = None):
        """An empty cache."""
        p = self.o_proj.weight
        device, dtype = p.device if device is None else device, p.dtype if dtype is None else dtype
        empty = torch.zeros(batch, self.num_heads, 0, self.head_dim, device=device, dtype=dtype)
        return empty, empty.clone(), torch.zeros(batch, 0, dtype=torch.bool, device=device)

    def forward(self, x: torch.Tensor, state=None, attention_mask: torch.Tensor | None = None,
                decay_scale: torch.Tensor | None = None):
        """``x`` ``[B, T, hidden]`` -> ``(y [B, T, hidden], cache)``; ``state`` is not modified."""
        B, T, _ = x.shape
        k0, v0, kept0 = self.init_state(B, x.device, x.dtype) if state is None else state
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        keep = torch.ones(B, T, dtype=torch.bool, device=x.device) if attention_mask is None else \
            attention_mask.bool()
        k, v, kept = torch.cat([k0, k], 2), torch.cat([v0, v], 2), torch.cat([kept0, keep], 1)
        L = k.shape[2]
        # query i (at cache position L - T + i) sees the kept keys up to itself, and always itself (so that a
        # skipped query has one key and no NaN before its output is zeroed)
        pos = torch.arange(L, device=x.device)
        causal = pos[None, :] <= pos[L - T:, None]
        see = (causal & kept[:, None, :]) | (pos[None, :] == pos[L - T:, None])
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=see[:, None])
        y = self.o_proj(o.transpose(1, 2).flatten(-2)) * keep[..., None]
        return y, (k, v, kept)

    def step(self, x_t: torch.Tensor, state=None, mask: torch.Tensor | None = None,
             decay_scale: torch.Tensor | None = None):
        """One token per row ``[B, hidden]``."""
        y, state = self.forward(x_t[:, None], state, None if mask is None else mask[:, None])
        return y[:, 0], state


@dataclass(frozen=True)
class ProbeModelConfig:
    """The models compared; each task builds them with its own channel count."""

    models: tuple[str, ...] = MODELS
    """Which models to train: mixers (gdn2, erase_only, write_only, kda, gdn, mamba2, gru) and controls
    (attention, memoryless)."""
    hidden_size: int = 32
    """Width of the residual stream (all models)."""
    n_layers: int = 1
    """Blocks per model (the attention control: ``attention_layers``)."""
    num_heads: int = 2
    """Heads per mixer (and of the attention control)."""
    head_dim: int = 8
    """Key and value size per head; the GRU's state per block equals the encoder's floats per layer."""
    horizon: int = 4
    """Forecast steps (at least the regime episode's steps after the onset)."""
    mlp_ratio: float = 2.0
    """SwiGLU width over hidden_size of the largest model; the others' MLPs widen to its parameter count."""
    match_parameters: bool = True
    """Widen each model's MLP so that its parameter count meets the largest model's (False: all at mlp_ratio)."""
    gru_group_size: int = 8
    """State floats per independent GRU of the block-diagonal GRU (a divisor of its state)."""
    gru_group_io: int = 1
    """Input and read-out channels per independent GRU."""
    attention_layers: int = 1
    """Blocks of the attention control: a second block lets it combine what one attention step gathers (its
    MLPs narrow or widen with the matching like every model's)."""

    def __post_init__(self):
        bad = [m for m in self.models if m not in MODELS]
        if not self.models or bad or len(set(self.models)) != len(self.models):
            raise ValueError(f"ProbeModelConfig: 'models' expected distinct names from {MODELS}, got {self.models!r}")
        for name in ("hidden_size", "n_layers", "num_heads", "head_dim", "horizon", "gru_group_size",
                     "gru_group_io", "attention_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ProbeModelConfig: '{name}' expected a positive int, got {value!r}")
        if isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, (int, float)) or \
                not 0 < self.mlp_ratio < math.inf:
            raise ValueError(f"ProbeModelConfig: 'mlp_ratio' expected a positive number, got {self.mlp_ratio!r}")
        if not isinstance(self.match_parameters, bool):
            raise ValueError(f"ProbeModelConfig: 'match_parameters' expected a bool, got {self.match_parameters!r}")
        if "gru" in self.models:
            check_groups("ProbeModelConfig", _gdn2_state(self.encoder(1)), self.gru_group_size, self.gru_group_io)

    def encoder(self, n_channels: int, variant: str = "gdn2") -> EncoderConfig:
        """The :class:`EncoderConfig` of a mixer (``variant``) for a task with ``n_channels``."""
        return EncoderConfig(n_channels=n_channels, hidden_size=self.hidden_size, n_layers=self.n_layers,
                             num_heads=self.num_heads, head_dim=self.head_dim, variant=variant, horizon=self.horizon,
                             mlp_ratio=self.mlp_ratio)

    @property
    def base_width(self) -> int:
        """The SwiGLU width at ``mlp_ratio``."""
        return max(1, int(self.hidden_size * self.mlp_ratio))


def _gdn2_state(config: EncoderConfig) -> int:
    """An encoder layer's state floats, from its shapes alone (``H K V`` + the conv tail of q|k|v)."""
    mixer = _mixer_config(config, "gdn2")
    return mixer.num_v_heads * mixer.head_k_dim * mixer.head_v_dim + mixer.conv_channels * (mixer.conv_size - 1)


def build_model(name: str, config: ProbeModelConfig, n_channels: int, mlp_width: int | None = None) -> StreamEncoder:
    """The model ``name`` of :data:`MODELS` for a task with ``n_channels``; ``mlp_width`` (default:
    ``config.base_width``) sets its SwiGLU's hidden width.

    Example:
        >>> cfg = ProbeModelConfig(hidden_size=16, num_heads=2, head_dim=8)
        >>> gru = build_model("gru", cfg, n_channels=3)
        >>> gru.state_size, gru.mixers[0].groups, build_model("gdn", cfg, 3, 40).blocks[0].mlp.down_proj.in_features
        (272, 34, 40)
    """
    if name not in MODELS:
        raise ValueError(f"build_model: 'name' expected one of {MODELS}, got {name!r}")
    if not isinstance(config, ProbeModelConfig):
        raise ValueError(f"build_model: 'config' expected a ProbeModelConfig, got {type(config).__name__}")
    width = config.base_width if mlp_width is None else mlp_width
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"build_model: 'mlp_width' expected a positive int, got {mlp_width!r}")
    # int(d * ratio) recovers the width exactly with half a unit of margin against rounding
    enc = replace(config.encoder(n_channels), mlp_ratio=(width + 0.5) / config.hidden_size)
    if name == "gru":
        return GroupedGRUEncoder(enc, _gdn2_state(enc), config.gru_group_size, config.gru_group_io)
    if name == "attention":
        enc = replace(enc, n_layers=config.attention_layers)
        return StreamEncoder(enc, mixer=lambda: AttentionMixer(enc.hidden_size, enc.num_heads, enc.head_dim))
    if name == "memoryless":
        gdn2 = _mixer_config(enc, "gdn2")
        return StreamEncoder(enc, mixer=lambda: StepLocalMixer(GatedDeltaNet2(gdn2)))
    return StreamEncoder(replace(enc, variant=name))


def _mixer_config(config: EncoderConfig, variant: str) -> GDN2Config:
    """The mixer configuration :class:`StreamEncoder` builds for ``variant``."""
    d = config.hidden_size
    return GDN2Config.variant(variant, hidden_size=d, num_heads=config.num_heads, head_k_dim=config.head_dim,
                              head_v_dim=config.head_dim, gate_low_rank=max(4, min(128, d // 2)))


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def state_floats(name: str, config: ProbeModelConfig, n_channels: int, length: int) -> int:
    """Floats a stream carries per layer after ``length`` observed steps: ``S`` for the mixers (the GDN-2
    encoder's, :func:`~gdn2ts.apps.baselines.encoder_state_floats`), ``2 * heads * head_dim * length`` for the
    attention control's cache, 0 for the memoryless control.

    Example:
        >>> cfg = ProbeModelConfig(hidden_size=32, num_heads=2, head_dim=8)
        >>> [state_floats(m, cfg, 3, 100) for m in ("gdn2", "mamba2", "gru", "attention", "memoryless")]
        [272, 272, 272, 3200, 0]
    """
    if name not in MODELS:
        raise ValueError(f"state_floats: 'name' expected one of {MODELS}, got {name!r}")
    if name == "attention":
        return 2 * config.num_heads * config.head_dim * length
    if name == "memoryless":
        return 0
    return encoder_state_floats(config.encoder(n_channels, "gdn2" if name == "gru" else name))


def matched_mlp_widths(config: ProbeModelConfig, n_channels: int) -> dict[str, tuple[int, int]]:
    """MLP widths that bring every model of ``config.models`` to the parameter count of the largest one at
    ``config.base_width``.

    A unit of MLP width costs ``3 * hidden`` parameters per block, so every count lands within
    ``1.5 * hidden * blocks`` of the target. Returns ``{name: (mlp_width, parameters)}``.

    Example:
        >>> cfg = ProbeModelConfig(models=("gdn2", "mamba2"), hidden_size=32, num_heads=2, head_dim=8, horizon=3)
        >>> m = matched_mlp_widths(cfg, n_channels=6)
        >>> m["gdn2"], m["mamba2"][1]
        ((64, 13510), 13474)
    """
    base = config.base_width
    built = {n: build_model(n, config, n_channels, base) for n in config.models}
    counts = {n: count_parameters(m) for n, m in built.items()}
    target = max(counts.values())
    out = {}
    for n, model in built.items():
        per_unit = 3 * config.hidden_size * len(model.blocks)
        width = max(1, base + round((target - counts[n]) / per_unit))
        out[n] = (width, counts[n] + (width - base) * per_unit)
    return out
