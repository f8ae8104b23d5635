"""A GDN-2 encoder for multivariate, irregularly sampled, partly missing observations, parallel or step by step.

One token per timestamp: the observed values (missing ones zeroed), the observation mask, the log of the time
elapsed since the stream's previous observation, and optional covariates. Irregular sampling lives in the
recurrence: each layer's log-decay is multiplied by the elapsed time (in ``time_unit``), so the state decays by
``alpha ** dt``. A step at which no channel is observed is skipped exactly: every layer's state and conv tail are
left as they were, and the outputs there repeat the last observed step's (the model can forecast at any moment).

Heads: multi-horizon quantile forecasts of every channel and a reconstruction of the current step's channels.

Validation: shapes, dtypes and the covariates' presence are always checked (they cost nothing). Checks that read
tensor values (inf among the values, non-finite timestamps or covariates, timestamps out of order) run on the CPU
always, and on CUDA only under the op's debug switch ``GDN2TS_CHECK_VALUES=1`` (:func:`gdn2ts.ops.validate.
check_values`): each is a host synchronization, once per call and layer. Callers that validate at their own edge
(the online runner checks every frame entering ``observe``) thus pay nothing on the device. Without the checks a
bad value stays confined to its own stream: an inf value makes that stream's outputs and state non-finite, and a
timestamp at or before the stream's previous observation is taken as arriving with no time elapsed (the decay is
never asked to grow the state). :meth:`StreamEncoder.check_inputs` checks everything, whatever the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from gdn2ts.layers import GatedDeltaNet2, GDN2Config, GDN2State, RMSNorm
from gdn2ts.layers.block import Block, fuse_gate_up, split_gate_up
from gdn2ts.layers.gru import GRUMixer
from gdn2ts.layers.mlp import SwiGLU
from gdn2ts.ops import validate

__all__ = ["EncoderConfig", "EncoderState", "GRUEncoder", "StreamEncoder", "downgrade_state_dict", "upgrade_state_dict"]


@dataclass(frozen=True)
class EncoderConfig:
    """Shape of a :class:`StreamEncoder`."""

    n_channels: int
    """Observed channels per timestamp."""
    n_covariates: int = 0
    """Known covariates per timestamp (never missing)."""
    hidden_size: int = 64
    """Width of the residual stream."""
    n_layers: int = 2
    """GDN-2 blocks (mixer + MLP each)."""
    num_heads: int = 2
    """Heads per mixer."""
    head_dim: int = 32
    """Key and value size per head."""
    variant: str = "gdn2"
    """Mixer preset of :meth:`GDN2Config.variant` (gdn2, kda, gdn, mamba2, erase_only, write_only)."""
    horizon: int = 24
    """Steps ahead forecast from every position."""
    quantiles: tuple[float, ...] = (0.1, 0.5, 0.9)
    """Forecast quantile levels, increasing, in (0, 1)."""
    time_unit: float = 1.0
    """Elapsed time equal to one regular step (the decay scale is elapsed time / time_unit)."""
    mlp_ratio: float = 2.0
    """Hidden width of the SwiGLU MLP over hidden_size."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""

    def __post_init__(self):
        for name in ("n_channels", "hidden_size", "n_layers", "num_heads", "head_dim", "horizon"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EncoderConfig: '{name}' expected a positive int, got {value!r}")
        if isinstance(self.n_covariates, bool) or not isinstance(self.n_covariates, int) or self.n_covariates < 0:
            raise ValueError(f"EncoderConfig: 'n_covariates' expected a non-negative int, got {self.n_covariates!r}")
        qs = tuple(self.quantiles)
        if not qs or any(not 0 < q < 1 for q in qs) or list(qs) != sorted(set(qs)):
            raise ValueError(f"EncoderConfig: 'quantiles' expected increasing levels in (0, 1), got {self.quantiles!r}")
        if not (self.time_unit > 0 and math.isfinite(self.time_unit)):
            raise ValueError(f"EncoderConfig: 'time_unit' expected a positive number, got {self.time_unit!r}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"EncoderConfig: 'mlp_ratio' expected a positive number, got {self.mlp_ratio!r}")


class EncoderState(NamedTuple):
    """Per-stream state of a :class:`StreamEncoder` for ``B`` streams."""

    layers: tuple[GDN2State, ...]
    """Each mixer's recurrent state and conv tail."""
    last_time: torch.Tensor
    """``[B]`` float64 timestamp of the last observation (``-inf`` before the first)."""
    last_output: torch.Tensor
    """``[B, hidden]`` the encoder output at the last observation (what forecasts read between observations)."""


class StreamEncoder(nn.Module):
    """GDN-2 encoder over ``[B, T, channels]`` observations with NaN for missing values.

    Example:
        >>> import torch
        >>> enc = StreamEncoder(EncoderConfig(n_channels=3, hidden_size=16, num_heads=2, head_dim=8, horizon=4))
        >>> values = torch.randn(2, 10, 3); values[0, 4] = float("nan")       # a step with nothing observed
        >>> times = torch.arange(10.0).expand(2, 10).double()
        >>> out = enc(values, times)
        >>> out["forecast"].shape, out["reconstruction"].shape
        (torch.Size([2, 10, 4, 3, 3]), torch.Size([2, 10, 3]))
    """

    def __init__(self, config: EncoderConfig, mixer: Callable[[], nn.Module] | None = None):
        """``mixer`` builds each block's mixer (default: the GDN-2 mixer of ``config.variant``); the GRU baseline
        (:class:`GRUEncoder`) passes a :class:`~gdn2ts.layers.gru.GRUMixer`. A mixer takes
        and returns its state and accepts ``attention_mask`` and ``decay_scale`` (``step``: ``mask``)."""
        super().__init__()
        if not isinstance(config, EncoderConfig):
            raise ValueError(f"StreamEncoder: 'config' expected an EncoderConfig, got {type(config).__name__}")
        self.config = cfg = config
        d = cfg.hidden_size
        self.embed = nn.Linear(2 * cfg.n_channels + 1 + cfg.n_covariates, d)
        if mixer is None:
            gdn2 = GDN2Config.variant(cfg.variant, hidden_size=d, num_heads=cfg.num_heads, head_k_dim=cfg.head_dim,
                                      head_v_dim=cfg.head_dim, gate_low_rank=max(4, min(128, d // 2)))

            def mixer():
                return GatedDeltaNet2(gdn2)
        # every mixer, then every MLP: the order in which a seed initializes them has not changed
        mixers = [mixer() for _ in range(cfg.n_layers)]
        mlps = [SwiGLU(d, max(1, int(d * cfg.mlp_ratio))) for _ in range(cfg.n_layers)]
        self.blocks = nn.ModuleList(Block(m, mlp, d, cfg.norm_eps) for m, mlp in zip(mixers, mlps, strict=True))
        self.out_norm = RMSNorm(d, eps=cfg.norm_eps)
        self.forecast_head = nn.Linear(d, cfg.horizon * cfg.n_channels * len(cfg.quantiles))
        self.reconstruct_head = nn.Linear(d, cfg.n_channels)
        self._register_load_state_dict_pre_hook(_upgrade_state_dict)

    @property
    def mixers(self) -> tuple[nn.Module, ...]:
        """Each block's mixer, first to last."""
        return tuple(b.mixer for b in self.blocks)

    def fingerprint_state(self) -> dict[str, torch.Tensor]:
        """The weights under the names of the layout before :class:`~gdn2ts.layers.block.Block` (``mixers.i``,
        ``mixer_norms.i``, ``mlps.i.gate_up`` fused, ``mlps.i.down``, ``mlp_norms.i``): what
        :func:`~gdn2ts.streaming.model_fingerprint` hashes, so that stores bound to a model before the change
        still open with the same weights (the inverse of the renaming that loads such weights)."""
        return downgrade_state_dict(self.state_dict(), self.config.n_layers)

    # ------------------------------------------------------------------------------------------------------------

    def init_state(self, batch: int, device=None, dtype: torch.dtype | None = None) -> EncoderState:
        """Zero state for ``batch`` streams (no observation yet)."""
        p = self.embed.weight
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        return EncoderState(
            layers=tuple(m.init_state(batch, device=device, dtype=dtype) for m in self.mixers),
            last_time=torch.full((batch,), -math.inf, dtype=torch.float64, device=device),
            last_output=torch.zeros(batch, self.config.hidden_size, device=device, dtype=dtype),
        )

    def forward(self, values: torch.Tensor, timestamps: torch.Tensor, covariates: torch.Tensor | None = None,
                state: EncoderState | None = None, *, predict: bool = True) -> dict:
        """Whole windows, differentiable.

        Args:
            values: ``[B, T, channels]``, NaN where a channel is missing; inf is an error.
            timestamps: ``[B, T]`` float64 (any unit; see ``time_unit``), finite, strictly increasing over the
                observed steps and after the state's last observation (unobserved steps may hold any finite value).
            covariates: ``[B, T, n_covariates]`` finite, or None when the config has none.
            state: the streams' state to continue from (zeros when omitted). Not modified.
            predict: run the heads (False: only ``observed`` and ``state`` are returned, for ingestion).

        Returns:
            dict with ``forecast`` ``[B, T, horizon, channels, quantiles]``, ``reconstruction`` ``[B, T, channels]``,
            ``observed`` ``[B, T]`` (a channel was observed) and ``state`` (:class:`EncoderState`).

        Raises:
            ValueError: naming the argument, for wrong shapes or dtypes; and for inf values, non-finite timestamps
                or covariates and timestamps out of order where values are checked (see the module docstring).
        """
        B, T = self._check(values, timestamps, covariates, 3)
        if state is None:
            state = self.init_state(B, device=values.device, dtype=self.embed.weight.dtype)
        observed = ~torch.isnan(values).all(-1)  # [B, T]
        # time since the previous observation (of this call or the state's), for observed steps
        obs_times = torch.where(observed, timestamps, -math.inf)
        prev = torch.cat([state.last_time[:, None], obs_times[:, :-1]], dim=1).cummax(dim=1).values
        self._check_order(timestamps, prev, observed)
        elapsed = torch.where(torch.isfinite(prev), timestamps - prev, 0.0).where(observed, 0.0).clamp(min=0.0)
        x = self._embed(values, elapsed, covariates)
        layer_states = []
        decay_scale = (elapsed / self.config.time_unit).to(x.dtype)
        for block, layer_state in zip(self.blocks, state.layers, strict=True):
            x, new = block(x, layer_state, attention_mask=observed, decay_scale=decay_scale)
            layer_states.append(new)
        # between observations the outputs repeat the last observed step's (from this call or the state)
        pos = torch.arange(T, device=values.device).expand(B, T)
        last = torch.where(observed, pos, -1).cummax(dim=1).values  # [B, T]
        if predict:
            h = self.out_norm(x)
            h = torch.where((last >= 0)[..., None], h.gather(1, last.clamp(min=0)[..., None].expand_as(h)),
                            state.last_output[:, None].to(h.dtype))
            last_output = h[:, -1] if T else state.last_output
        elif T:
            # only the output at each row's last observation is kept: normalize those rows alone
            at = last[:, -1:]
            picked = self.out_norm(x.gather(1, at.clamp(min=0)[..., None].expand(B, 1, x.shape[-1])))[:, 0]
            last_output = torch.where(at >= 0, picked, state.last_output.to(picked.dtype))
        else:
            last_output = state.last_output
        final_time = torch.maximum(state.last_time, obs_times.max(dim=1).values) if T else state.last_time
        new_state = EncoderState(tuple(layer_states), final_time, last_output)
        out = {"observed": observed, "state": new_state}
        return {**self.heads(h), **out} if predict else out

    @torch.no_grad()
    def step(self, values: torch.Tensor, timestamps: torch.Tensor, covariates: torch.Tensor | None = None,
             state: EncoderState | None = None, *, predict: bool = True) -> dict:
        """One timestamp per stream (inference): ``values`` ``[B, channels]``, ``timestamps`` ``[B]``; same
        outputs as :meth:`forward` with T = 1 (without the T axis), and the same checks.

        With values unchecked (CUDA without ``GDN2TS_CHECK_VALUES=1``) a step reads nothing back from the device,
        so a loop of steps never waits for it."""
        B, _ = self._check(values[:, None], timestamps[:, None],
                           None if covariates is None else covariates[:, None], 3)
        if state is None:
            state = self.init_state(B, device=values.device, dtype=self.embed.weight.dtype)
        observed = ~torch.isnan(values).all(-1)
        self._check_order(timestamps[:, None], state.last_time[:, None], observed[:, None])
        elapsed = torch.where(torch.isfinite(state.last_time), timestamps - state.last_time, 0.0).where(observed, 0.0)
        elapsed = elapsed.clamp(min=0.0)
        x = self._embed(values[:, None], elapsed[:, None], None if covariates is None else covariates[:, None])[:, 0]
        layer_states = []
        decay_scale = (elapsed / self.config.time_unit).to(x.dtype)
        for block, layer_state in zip(self.blocks, state.layers, strict=True):
            x, new = block.step(x, layer_state, mask=observed, decay_scale=decay_scale)
            layer_states.append(new)
        h = torch.where(observed[:, None], self.out_norm(x), state.last_output.to(x.dtype))
        last_time = torch.where(observed, torch.maximum(timestamps.to(torch.float64), state.last_time),
                                state.last_time)
        out = {"observed": observed, "state": EncoderState(tuple(layer_states), last_time, h)}
        return {**self.heads(h), **out} if predict else out

    def check_inputs(self, values: torch.Tensor, timestamps: torch.Tensor, covariates: torch.Tensor | None = None,
                     state: EncoderState | None = None) -> tuple[int, int]:
        """Check a window as :meth:`forward` takes it, values included on any device (the debug switch does not
        apply: on CUDA this synchronizes); returns ``(B, T)``. For offline tools such as the state audit.

        Example:
            >>> import torch
            >>> enc = StreamEncoder(EncoderConfig(n_channels=1, hidden_size=8, num_heads=1, head_dim=4))
            >>> enc.check_inputs(torch.zeros(2, 3, 1), torch.arange(3.0).double().expand(2, 3))
            (2, 3)
            >>> try:
            ...     enc.check_inputs(torch.zeros(1, 2, 1), torch.tensor([[2.0, 1.0]]).double())
            ... except ValueError as e:
            ...     print(str(e).split("; ")[1])
            row 0, step 1: 1.0 is not after 2.0
        """
        B, T = self._check(values, timestamps, covariates, 3, check=True)
        last = (torch.full((B,), -math.inf, dtype=torch.float64, device=values.device) if state is None
                else state.last_time)
        if not isinstance(last, torch.Tensor) or tuple(last.shape) != (B,):
            raise ValueError(f"StreamEncoder: argument 'state' expected last_time of shape [B={B}], got "
                             f"{getattr(last, 'shape', type(last).__name__)}")
        observed = ~torch.isnan(values).all(-1)
        obs_times = torch.where(observed, timestamps, -math.inf)
        prev = torch.cat([last[:, None].to(obs_times.dtype), obs_times[:, :-1]], dim=1).cummax(dim=1).values
        self._check_order(timestamps, prev, observed, check=True)
        return B, T

    # ------------------------------------------------------------------------------------------------------------

    def _embed(self, values, elapsed, covariates):
        present = ~torch.isnan(values)
        # (missing values become 0; an unchecked inf is kept, so that it shows in its stream's outputs)
        parts = [torch.where(present, values, 0.0), present.to(values.dtype),
                 torch.log1p(elapsed / self.config.time_unit)[..., None].to(values.dtype)]
        if covariates is not None:
            parts.append(covariates.to(values.dtype))
        return self.embed(torch.cat(parts, dim=-1).to(self.embed.weight.dtype))

    def heads(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """The heads on encoder outputs ``h`` ``[..., hidden]`` (such as a state's ``last_output``): ``forecast``
        ``[..., horizon, channels, quantiles]`` (quantiles never cross) and ``reconstruction`` ``[..., channels]``.
        """
        cfg = self.config
        forecast = self.forecast_head(h).unflatten(-1, (cfg.horizon, cfg.n_channels, len(cfg.quantiles)))
        # quantiles never cross: the median plus ordered, non-negative offsets
        mid = len(cfg.quantiles) // 2
        base = forecast[..., mid:mid + 1]
        below = F.softplus(forecast[..., :mid]).flip(-1).cumsum(-1).flip(-1)
        above = F.softplus(forecast[..., mid + 1:]).cumsum(-1)
        return {"forecast": torch.cat([base - below, base, base + above], dim=-1),
                "reconstruction": self.reconstruct_head(h)}

    def _check(self, values, timestamps, covariates, ndim, check: bool | None = None):
        """Shapes and dtypes always; values (inf, non-finite timestamps or covariates) when ``check``, by default
        where :func:`~gdn2ts.ops.validate.check_values` says (the CPU, or CUDA with ``GDN2TS_CHECK_VALUES=1``)."""
        cfg = self.config
        op = "StreamEncoder"
        if not isinstance(values, torch.Tensor) or not values.is_floating_point():
            raise ValueError(f"{op}: argument 'values' expected a floating tensor [B, T, {cfg.n_channels}], got "
                             f"{getattr(values, 'dtype', type(values).__name__)}")
        if values.dim() != ndim or values.shape[-1] != cfg.n_channels:
            raise ValueError(f"{op}: argument 'values' expected shape [B, T, {cfg.n_channels}], got "
                             f"{tuple(values.shape)}")
        B, T = values.shape[:2]
        if not isinstance(timestamps, torch.Tensor) or tuple(timestamps.shape) != (B, T) or \
                not timestamps.is_floating_point():
            raise ValueError(f"{op}: argument 'timestamps' expected a floating tensor [B={B}, T={T}], got "
                             f"{getattr(timestamps, 'shape', type(timestamps).__name__)}")
        if (covariates is None) != (cfg.n_covariates == 0):
            raise ValueError(f"{op}: argument 'covariates' expected "
                             f"{'None' if cfg.n_covariates == 0 else f'[B, T, {cfg.n_covariates}]'}")
        if covariates is not None and tuple(covariates.shape) != (B, T, cfg.n_covariates):
            raise ValueError(f"{op}: argument 'covariates' expected finite values of shape "
                             f"[B={B}, T={T}, {cfg.n_covariates}], got {tuple(covariates.shape)}")
        if not (validate.check_values(values) if check is None else check):
            return B, T
        # each of these reads a value back from the device: on CUDA only under the debug switch
        if torch.isinf(values).any():
            raise ValueError(f"{op}: argument 'values' expected finite values or NaN for missing, got inf")
        if not torch.isfinite(timestamps).all():
            raise ValueError(f"{op}: argument 'timestamps' expected finite values")
        if covariates is not None and not torch.isfinite(covariates).all():
            raise ValueError(f"{op}: argument 'covariates' expected finite values of shape "
                             f"[B={B}, T={T}, {cfg.n_covariates}], got non-finite values")
        return B, T

    @staticmethod
    def _check_order(timestamps, prev, observed, check: bool | None = None):
        """Each observed step after the previous observation (``prev``), where values are checked."""
        if not (validate.check_values(timestamps) if check is None else check):
            return
        bad = observed & torch.isfinite(prev) & (timestamps <= prev)
        if bad.any():
            row, col = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"StreamEncoder: argument 'timestamps' expected each observation after the stream's "
                             f"previous one; row {row}, step {col}: {float(timestamps[row, col])} is not after "
                             f"{float(prev[row, col])}")


class GRUEncoder(StreamEncoder):
    """The recurrent baseline: a :class:`StreamEncoder` whose mixers are GRUs (:class:`~gdn2ts.layers.gru.GRUMixer`:
    ``GRU(hidden -> state_size)`` then ``Linear(state_size -> hidden)``); tokens, MLPs, heads, checks and state
    handling are the encoder's. Elapsed time only enters through the token (a GRU has no decay to scale). Each
    layer's state is ``[B, state_size]``.

    Args:
        config: the encoder configuration (``variant``, ``num_heads`` and ``head_dim`` are not used).
        state_size: GRU state per block; :func:`gdn2ts.apps.baselines.encoder_state_floats` gives an encoder's.

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

    def __init__(self, config: EncoderConfig, state_size: int):
        if not isinstance(config, EncoderConfig):
            raise ValueError(f"GRUEncoder: 'config' expected an EncoderConfig, got {type(config).__name__}")
        if isinstance(state_size, bool) or not isinstance(state_size, int) or state_size < 1:
            raise ValueError(f"GRUEncoder: 'state_size' expected a positive int, got {state_size!r}")
        super().__init__(config, mixer=lambda: GRUMixer(config.hidden_size, state_size))
        self.state_size = state_size

# The layout before Block: parallel lists, the MLP's gate and up projections fused in one matrix.
_OLD_LISTS = (("mixers.", "mixer."), ("mixer_norms.", "mixer_norm."), ("mlp_norms.", "mlp_norm."))


def upgrade_state_dict(tensors: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Rename, in place, an encoder ``state_dict`` of the earlier layout (``mixers.i.*``, ``mixer_norms.i``,
    ``mlps.i.gate_up`` / ``mlps.i.down``, ``mlp_norms.i``; checkpoint formats v1 and v2) to blocks
    (``blocks.i.mixer.*``, ``blocks.i.mixer_norm``, ``blocks.i.mlp.gate_proj`` / ``up_proj`` / ``down_proj``,
    ``blocks.i.mlp_norm``); a ``state_dict`` already in the new layout is left as it is. Returns ``tensors``.

    Example:
        >>> enc = StreamEncoder(EncoderConfig(n_channels=1, hidden_size=8, num_heads=1, head_dim=4, n_layers=1))
        >>> old = downgrade_state_dict(enc.state_dict(), 1)
        >>> sorted(k for k in old if k.startswith("mlps."))
        ['mlps.0.down.weight', 'mlps.0.gate_up.weight']
        >>> sorted(upgrade_state_dict(old)) == sorted(enc.state_dict())
        True
    """
    layers = {int(k[len(prefix):].split(".")[1]) for k in tensors if k.startswith(f"{prefix}mlps.")}
    for i in sorted(layers):
        split_gate_up(tensors, f"{prefix}mlps.{i}.", f"{prefix}blocks.{i}.mlp.")
    for key in [k for k in tensors if k.startswith(prefix)]:
        rest = key[len(prefix):]
        for old, new in _OLD_LISTS:
            if rest.startswith(old):
                i, _, tail = rest[len(old):].partition(".")
                tensors[f"{prefix}blocks.{i}.{new}{tail}"] = tensors.pop(key)
    return tensors


def downgrade_state_dict(tensors: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """The inverse of :func:`upgrade_state_dict`, on a copy: an encoder ``state_dict`` under the earlier names."""
    out = dict(tensors)
    for i in range(n_layers):
        fuse_gate_up(out, f"blocks.{i}.mlp.", f"mlps.{i}.")
    for key in [k for k in out if k.startswith("blocks.")]:
        i, _, rest = key[len("blocks."):].partition(".")
        for old, new in _OLD_LISTS:
            if rest.startswith(new):
                out[f"{old}{i}.{rest[len(new):]}"] = out.pop(key)
    return out


def _upgrade_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """``load_state_dict`` pre-hook: weights saved in the earlier layout load into the blocks."""
    upgrade_state_dict(state_dict, prefix)
