"""A direct multi-horizon GDN-2 forecaster built on the streaming encoder.

The lookback window is read by a :class:`StreamEncoder` (NaN for missing values, observation masks, elapsed time
between irregular timestamps, covariates per token); the encoder's output at the last observation is mapped to
every horizon step and quantile at once. Two standard long-horizon devices sit around it:

* per-window instance normalization (RevIN without affine): each window is scaled by the mean and standard
  deviation of its observed lookback values, and the forecast is scaled back;
* a linear skip path from the lookback to the horizon (RLinear), shared by all channels, added to the recurrent
  path; ``recurrent=False`` turns the encoder off (the ablation), ``linear_skip=False`` the skip path.

Channels are read either together (one token holds every channel: channel mixing) or one at a time
(``channel_independent=True``: each channel is its own sequence through the same weights, as PatchTST and RLinear
do). Tokens are single steps (the default) or patches (``patch_len`` steps every ``patch_stride`` steps, as
PatchTST: 11 tokens of 16 steps instead of 96 steps at lookback 96); a token's missing values are the encoder's
missing channels and the elapsed time between tokens is measured between the patches' last steps. The horizon head
reads the encoder output at the last token (``head="last"``) or at every token (``head="flatten"``, PatchTST's
flatten head), after ``dropout``. Known-future
covariates enter the encoder over the lookback and an additive head over the horizon; static covariates are
repeated on every token and in that head; past-only covariates enter the encoder over the lookback only.
Categorical covariates arrive as category indices (0: unknown) in the last columns of their tensor and are
embedded (:class:`CovariateEmbedding`).

The encoder keeps the streaming state API (``init_state``/``step``), so ``forecaster.encoder`` can be handed to
:class:`gdn2ts.streaming.OnlineRunner`; its own one-step quantile head is trained alongside (next value of each
lookback step, in normalized units) so that the runner's forecasts mean something.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gdn2ts.models.encoder import EncoderConfig, EncoderState, StreamEncoder

__all__ = ["ForecasterConfig", "GDN2Forecaster", "CovariateEmbedding", "ordered_quantiles", "forecast_loss"]


@dataclass(frozen=True)
class ForecasterConfig:
    """Shape of a :class:`GDN2Forecaster`."""

    n_channels: int
    """Target channels (read over the lookback and forecast over the horizon)."""
    lookback: int
    """Steps L of history per window."""
    horizon: int
    """Steps H forecast at once."""
    n_known: int = 0
    """Known covariates per step, given over lookback and horizon ([B, L + H, n_known])."""
    n_static: int = 0
    """Static covariates per series ([B, n_static])."""
    quantiles: tuple[float, ...] = (0.1, 0.5, 0.9)
    """Quantile levels, increasing in (0, 1), including 0.5 (the point forecast)."""
    hidden_size: int = 32
    """Width of the encoder's residual stream."""
    n_layers: int = 1
    """GDN-2 blocks in the encoder."""
    num_heads: int = 2
    """Heads per mixer."""
    head_dim: int = 16
    """Key and value size per head."""
    variant: str = "gdn2"
    """Mixer preset (gdn2, kda, gdn, mamba2, erase_only, write_only)."""
    channel_independent: bool = False
    """Each channel its own sequence through shared weights (True) or all channels in one token (False)."""
    revin: bool = True
    """Per-window instance normalization by the observed lookback mean and standard deviation."""
    linear_skip: bool = True
    """Add a linear map from the lookback to the horizon (shared by channels)."""
    recurrent: bool = True
    """Use the GDN-2 encoder path (False: the ablation, skip path only)."""
    time_unit: float = 1.0
    """Elapsed time equal to one regular step."""
    patch_len: int = 1
    """Steps per encoder token (1: one token per step; PatchTST uses 16)."""
    patch_stride: int = 1
    """Steps between the starts of consecutive tokens (at most ``patch_len``; PatchTST uses 8). The last token
    ends at the last lookback step; with ``(lookback - patch_len) % patch_stride`` steps left over at the start,
    those are read by the skip path only."""
    head: str = "last"
    """Horizon head input: ``last`` (encoder output at the last token) or ``flatten`` (outputs at every token,
    concatenated; a fully missing token contributes zeros)."""
    dropout: float = 0.0
    """Dropout on the encoder outputs before the horizon head (training only)."""
    head_basis: str = "free"
    """What the horizon head writes: ``free`` (one output per horizon step, ``horizon`` rows of weights) or
    ``skip`` (an adjustment of the lookback, ``lookback`` rows, which the skip path's linear map carries to the
    horizon: the correction lies in the skip map's span and the head's size does not grow with the horizon;
    needs ``linear_skip``)."""
    center: str = "none"
    """Constraint on the encoder's correction of the median, over the horizon steps of each window and channel:
    ``none``; ``mean`` (zero mean: the forecast's level over the horizon is the skip path's); ``trend`` (zero mean
    and zero least-squares slope: level and slope are the skip path's, the encoder adds shape only). Quantile
    spreads are not constrained. Needs ``linear_skip``."""
    correction_reach: float | None = None
    """Lead time, in steps, over which the encoder's correction of the median fades by a factor e: it is
    multiplied by ``exp(-h / correction_reach)`` at horizon step ``h = 1..H``, so the forecast tends to the skip
    path's far ahead (None: no fading). Needs ``linear_skip``."""
    n_past: int = 0
    """Past-only covariates per step, given over the lookback only ([B, L, n_past])."""
    known_categories: tuple[int, ...] = ()
    """Category counts (with index 0, unknown) of the categorical known covariates: the last
    ``len(known_categories)`` of the ``n_known`` columns hold category indices."""
    past_categories: tuple[int, ...] = ()
    """Likewise for the past-only covariates."""
    static_categories: tuple[int, ...] = ()
    """Likewise for the static covariates."""
    embedding_size: int = 4
    """Width of each categorical covariate's embedding."""

    def __post_init__(self):
        for name in ("n_channels", "lookback", "horizon", "hidden_size", "n_layers", "num_heads", "head_dim",
                     "patch_len", "patch_stride"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ForecasterConfig: '{name}' expected a positive int, got {value!r}")
        for name in ("n_known", "n_static", "n_past"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"ForecasterConfig: '{name}' expected a non-negative int, got {value!r}")
        qs = tuple(self.quantiles)
        if 0.5 not in qs or any(not 0 < q < 1 for q in qs) or list(qs) != sorted(set(qs)):
            raise ValueError(f"ForecasterConfig: 'quantiles' expected increasing levels in (0, 1) including 0.5, "
                             f"got {self.quantiles!r}")
        if not (self.recurrent or self.linear_skip):
            raise ValueError("ForecasterConfig: expected at least one of 'recurrent' and 'linear_skip' on")
        if self.patch_stride > self.patch_len or self.patch_len > self.lookback:
            raise ValueError(f"ForecasterConfig: expected patch_stride <= patch_len <= lookback, got patch_stride "
                             f"{self.patch_stride}, patch_len {self.patch_len}, lookback {self.lookback}")
        if self.head not in ("last", "flatten"):
            raise ValueError(f"ForecasterConfig: 'head' expected 'last' or 'flatten', got {self.head!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"ForecasterConfig: 'dropout' expected a number in [0, 1), got {self.dropout!r}")
        if self.head_basis not in ("free", "skip"):
            raise ValueError(f"ForecasterConfig: 'head_basis' expected 'free' or 'skip', got {self.head_basis!r}")
        if self.center not in ("none", "mean", "trend"):
            raise ValueError(f"ForecasterConfig: 'center' expected 'none', 'mean' or 'trend', got {self.center!r}")
        if self.center != "none" and not self.linear_skip:
            raise ValueError(f"ForecasterConfig: center {self.center!r} expected linear_skip on (the skip path then "
                             f"sets the level the correction leaves out)")
        if self.correction_reach is not None:
            if isinstance(self.correction_reach, bool) or not isinstance(self.correction_reach, int | float) or \
                    not self.correction_reach > 0:
                raise ValueError(f"ForecasterConfig: 'correction_reach' expected a positive number of steps or None, "
                                 f"got {self.correction_reach!r}")
            if not self.linear_skip:
                raise ValueError("ForecasterConfig: correction_reach expected linear_skip on (the forecast fades to "
                                 "the skip path's)")
        if isinstance(self.embedding_size, bool) or not isinstance(self.embedding_size, int) or \
                self.embedding_size < 1:
            raise ValueError(f"ForecasterConfig: 'embedding_size' expected a positive int, got {self.embedding_size!r}")
        for role in ("known", "past", "static"):
            cats = tuple(getattr(self, f"{role}_categories"))
            n = getattr(self, f"n_{role}")
            if len(cats) > n or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in cats):
                raise ValueError(f"ForecasterConfig: '{role}_categories' expected at most n_{role} = {n} positive "
                                 f"category counts, got {cats!r}")
        if self.head_basis == "skip" and not self.linear_skip:
            raise ValueError("ForecasterConfig: head_basis 'skip' expected linear_skip on (it maps the head's "
                             "lookback adjustment to the horizon)")

    @property
    def n_tokens(self) -> int:
        """Encoder tokens per window: ``(lookback - patch_len) // patch_stride + 1``."""
        return (self.lookback - self.patch_len) // self.patch_stride + 1

    def features(self, role: str) -> int:
        """Input width of ``known``, ``past`` or ``static`` covariates after embedding their categories."""
        n, cats = getattr(self, f"n_{role}"), getattr(self, f"{role}_categories")
        return n - len(cats) + len(cats) * self.embedding_size

    @property
    def token_channels(self) -> int:
        """Values per encoder token: ``patch_len`` times the channels a sequence holds."""
        return self.patch_len * (1 if self.channel_independent else self.n_channels)

    def encoder_config(self) -> EncoderConfig:
        """The :class:`EncoderConfig` of the forecaster's encoder (one-step head, same quantiles)."""
        # one token step is one stride: the decay per token of a patched encoder is that of one regular step
        n_cov = self.features("known") + self.features("static") + self.features("past")
        return EncoderConfig(n_channels=self.token_channels, n_covariates=n_cov,
                             hidden_size=self.hidden_size, n_layers=self.n_layers, num_heads=self.num_heads,
                             head_dim=self.head_dim, variant=self.variant, horizon=1,
                             quantiles=tuple(self.quantiles), time_unit=self.time_unit * self.patch_stride)


class CovariateEmbedding(nn.Module):
    """Covariate columns ``[..., n]`` whose last ``len(categories)`` hold category indices to features
    ``[..., n - k + k * size]``: the numeric columns as they are, then one learned vector per category column. An
    index outside ``[0, count)`` reads as 0 (unknown).

    Example:
        >>> emb = CovariateEmbedding(3, (5,), size=4)
        >>> emb(torch.tensor([[0.5, -1.0, 3.0], [0.0, 2.0, 9.0]])).shape
        torch.Size([2, 6])
    """

    def __init__(self, n: int, categories: tuple[int, ...] = (), size: int = 4):
        super().__init__()
        self.n_numeric = n - len(categories)
        self.tables = nn.ModuleList(nn.Embedding(c, size) for c in categories)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not len(self.tables):
            return x
        idx = x[..., self.n_numeric:].round().long()
        parts = [x[..., :self.n_numeric].to(torch.get_default_dtype())]
        for j, table in enumerate(self.tables):
            i = idx[..., j]
            parts.append(table(torch.where((i >= 0) & (i < table.num_embeddings), i, 0)))
        return torch.cat(parts, dim=-1)


def ordered_quantiles(raw: torch.Tensor, mid: int) -> torch.Tensor:
    """Quantiles that never cross from raw outputs ``[..., Q]``: the value at ``mid`` is the median, the others
    are ordered non-negative offsets from it (as the encoder's heads)."""
    base = raw[..., mid:mid + 1]
    below = F.softplus(raw[..., :mid]).flip(-1).cumsum(-1).flip(-1)
    above = F.softplus(raw[..., mid + 1:]).cumsum(-1)
    return torch.cat([base - below, base, base + above], dim=-1)


def forecast_loss(forecast: torch.Tensor, target: torch.Tensor, quantiles, quantile_weight: float = 0.0,
                  point: str = "mse") -> torch.Tensor:
    """Training loss over observed targets: a point loss on the median plus ``quantile_weight`` times the mean
    pinball loss over all levels.

    Args:
        forecast: ``[B, H, C, Q]``.
        target: ``[B, H, C]``, NaN where unobserved (left out of the mean).
        quantiles: the Q levels.
        quantile_weight: weight of the pinball loss.
        point: ``"mse"`` or ``"mae"``.

    Example:
        >>> f = torch.zeros(2, 3, 1, 3); y = torch.ones(2, 3, 1); y[0, 0] = float("nan")
        >>> float(forecast_loss(f, y, (0.1, 0.5, 0.9)))
        1.0
    """
    if point not in ("mse", "mae"):
        raise ValueError(f"forecast_loss: 'point' expected 'mse' or 'mae', got {point!r}")
    observed = ~torch.isnan(target)
    y = torch.nan_to_num(target)
    n = observed.sum().clamp(min=1)
    qs = torch.tensor(quantiles, dtype=forecast.dtype, device=forecast.device)
    err = y - forecast[..., list(quantiles).index(0.5)]
    loss = ((err.square() if point == "mse" else err.abs()) * observed).sum() / n
    if quantile_weight:
        diff = y[..., None] - forecast
        pinball = torch.maximum(qs * diff, (qs - 1) * diff).mean(-1)
        loss = loss + quantile_weight * (pinball * observed).sum() / n
    return loss


class GDN2Forecaster(nn.Module):
    """Lookback window in, direct multi-horizon quantile forecast out.

    Example:
        >>> cfg = ForecasterConfig(n_channels=3, lookback=12, horizon=4, n_known=1, n_static=2)
        >>> model = GDN2Forecaster(cfg)
        >>> values = torch.randn(2, 12, 3); values[0, 5] = float("nan"); values[1, 2, 0] = float("nan")
        >>> times = torch.tensor([[0, 1, 2, 4, 5, 6, 9, 10, 11, 12, 14, 15]]).double().expand(2, 12)
        >>> out = model(values, times, known=torch.randn(2, 16, 1), static=torch.randn(2, 2))
        >>> out["forecast"].shape, out["point"].shape
        (torch.Size([2, 4, 3, 3]), torch.Size([2, 4, 3]))
        >>> bool((out["forecast"].diff(dim=-1) >= 0).all())     # quantiles never cross
        True
        >>> patched = GDN2Forecaster(ForecasterConfig(n_channels=3, lookback=12, horizon=4, channel_independent=True,
        ...                                           patch_len=4, patch_stride=2, head="flatten", dropout=0.1))
        >>> patched.config.n_tokens, patched(values)["next_step"].shape    # 5 tokens of 4 steps per channel
        (5, torch.Size([2, 5, 12, 3]))
    """

    def __init__(self, config: ForecasterConfig):
        super().__init__()
        if not isinstance(config, ForecasterConfig):
            raise ValueError(f"GDN2Forecaster: 'config' expected a ForecasterConfig, got {type(config).__name__}")
        self.config = cfg = config
        self.mid = list(cfg.quantiles).index(0.5)
        n_q = len(cfg.quantiles)
        c_out = 1 if cfg.channel_independent else cfg.n_channels
        self.encoder = StreamEncoder(cfg.encoder_config())
        head_in = cfg.hidden_size * (cfg.n_tokens if cfg.head == "flatten" else 1)
        self.head = nn.Linear(head_in, self._head_steps * c_out * n_q)
        self.dropout = nn.Dropout(cfg.dropout)
        self._hidden = None
        if cfg.head == "flatten":
            # the encoder returns heads and its last output; its per-token outputs are read where they are made
            self.encoder.out_norm.register_forward_hook(self._keep_hidden)
        # the recurrent head starts at zero: training starts from the skip path's forecast and the encoder learns
        # what it adds (on ETTh1 a randomly initialized head trained to a worse optimum than the skip path alone)
        if cfg.linear_skip:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.skip = nn.Linear(cfg.lookback, cfg.horizon) if cfg.linear_skip else None
        self.known_embed = CovariateEmbedding(cfg.n_known, tuple(cfg.known_categories), cfg.embedding_size)
        self.past_embed = CovariateEmbedding(cfg.n_past, tuple(cfg.past_categories), cfg.embedding_size)
        self.static_embed = CovariateEmbedding(cfg.n_static, tuple(cfg.static_categories), cfg.embedding_size)
        n_cov = cfg.features("known") + cfg.features("static")
        self.known_head = nn.Sequential(nn.Linear(n_cov, cfg.hidden_size), nn.SiLU(),
                                        nn.Linear(cfg.hidden_size, c_out * n_q)) if cfg.n_known else None

    @property
    def _head_steps(self) -> int:
        # rows the horizon head writes per channel and quantile: horizon steps, or lookback steps (skip basis)
        return self.config.lookback if self.config.head_basis == "skip" else self.config.horizon

    # -- the state API of the streaming encoder ----------------------------------------------------------------

    def init_state(self, batch: int, device=None, dtype=None) -> EncoderState:
        """The encoder's zero state for ``batch`` streams (see :meth:`StreamEncoder.init_state`)."""
        return self.encoder.init_state(batch, device=device, dtype=dtype)

    def step(self, values, timestamps, covariates=None, state: EncoderState | None = None) -> dict:
        """One timestamp per stream through the encoder (see :meth:`StreamEncoder.step`)."""
        return self.encoder.step(values, timestamps, covariates, state)

    # -- windows ------------------------------------------------------------------------------------------------

    def forward(self, values: torch.Tensor, timestamps: torch.Tensor | None = None,
                known: torch.Tensor | None = None, static: torch.Tensor | None = None,
                past: torch.Tensor | None = None) -> dict:
        """Forecast the ``horizon`` steps after each window.

        Args:
            values: ``[B, L, C]`` lookback values, NaN where missing.
            timestamps: ``[B, L]`` increasing times of the lookback steps (in ``time_unit``); None: 0..L-1.
            known: ``[B, L + H, n_known]`` known covariates over lookback and horizon (None when n_known = 0).
            static: ``[B, n_static]`` (None when n_static = 0).
            past: ``[B, L, n_past]`` past-only covariates over the lookback (None when n_past = 0).

        Categorical covariates are category indices (as floats; 0 for unknown) in the last columns of ``known``,
        ``past`` and ``static`` (``*_categories`` of the config).

        Returns:
            dict with ``forecast`` ``[B, H, C, Q]`` (quantiles, increasing), ``point`` ``[B, H, C]`` (the
            median), ``next_step`` ``[B, N, D, Q]`` (the encoder's one-step forecasts of the next token, normalized
            units, or None with ``recurrent=False``; N = L and D = C without patching), ``next_target``
            ``[B, N, D]`` (the tokens they forecast: ``next_step[:, :-1]`` aims at ``next_target[:, 1:]``),
            ``normalized`` ``[B, L, C]`` (the lookback as the encoder read it),
            ``loc`` and ``scale`` ``[B, 1, C]`` (the window's normalization).
        """
        cfg = self.config
        B, L, C = self._check(values, timestamps, known, static, past)
        if timestamps is None:
            timestamps = torch.arange(L, dtype=torch.float64, device=values.device).expand(B, L)
        observed = ~torch.isnan(values)
        if cfg.revin:
            count = observed.sum(1, keepdim=True).clamp(min=1)
            loc = torch.nan_to_num(values).sum(1, keepdim=True) / count
            var = (torch.nan_to_num(values - loc).square()).sum(1, keepdim=True) / count
            scale = (var + 1e-5).sqrt()
        else:
            loc, scale = values.new_zeros(B, 1, C), values.new_ones(B, 1, C)
        x = (values - loc) / scale  # NaN stays NaN: the encoder reads it as missing
        n_q = len(cfg.quantiles)
        out = values.new_zeros(B, cfg.horizon, C, n_q)
        next_step = next_target = None
        known = None if known is None else self.known_embed(known)
        static = None if static is None else self.static_embed(static)
        past = None if past is None else self.past_embed(past)
        if cfg.recurrent or cfg.n_known:
            cov = self._covariates(known, static, past, B, L)
        if cfg.recurrent:
            raw, next_step, next_target = self._recurrent(x, timestamps, cov)
            if cfg.head_basis == "skip":
                # the head's lookback adjustment [B, L, C, Q] through the skip map (weights only: the skip's
                # bias is added once, below)
                raw = torch.einsum("hl,blcq->bhcq", self.skip.weight, raw)
            if cfg.center != "none":
                raw = self._centered(raw)
            if cfg.correction_reach is not None:
                lead = torch.arange(1, cfg.horizon + 1, dtype=raw.dtype, device=raw.device)
                fade = torch.exp(-lead / cfg.correction_reach)[None, :, None]
                raw = torch.cat([raw[..., :self.mid], raw[..., self.mid:self.mid + 1] * fade[..., None],
                                 raw[..., self.mid + 1:]], dim=-1)
            out = out + raw
        if self.known_head is not None:
            fut = known[:, L:]
            if static is not None:
                fut = torch.cat([fut, static[:, None].expand(B, cfg.horizon, static.shape[-1])], dim=-1)
            out = out + self.known_head(fut.to(out.dtype)).view(B, cfg.horizon, -1, n_q)
        forecast = ordered_quantiles(out, self.mid)
        if self.skip is not None:
            forecast = forecast + self.skip(torch.nan_to_num(x).transpose(1, 2)).transpose(1, 2)[..., None]
        forecast = forecast * scale[..., None] + loc[..., None]
        return {"forecast": forecast, "point": forecast[..., self.mid], "next_step": next_step,
                "next_target": next_target, "normalized": x, "loc": loc, "scale": scale}

    def _centered(self, raw: torch.Tensor) -> torch.Tensor:
        """``raw`` ``[B, H, C, Q]`` with the median's mean (and, for ``trend``, least-squares slope) over the
        horizon steps removed."""
        med = raw[..., self.mid]
        med = med - med.mean(1, keepdim=True)
        if self.config.center == "trend" and raw.shape[1] > 1:
            t = torch.arange(raw.shape[1], dtype=med.dtype, device=med.device)
            t = (t - t.mean())[None, :, None]
            med = med - t * (med * t).sum(1, keepdim=True) / t.square().sum()
        return torch.cat([raw[..., :self.mid], med[..., None], raw[..., self.mid + 1:]], dim=-1)

    def _keep_hidden(self, module, inputs, output):
        self._hidden = output

    def _tokens(self, x, timestamps, cov):
        """Patches of ``[B', L, c]`` as tokens ``[B', N, c * patch_len]`` (channel-major), with the times and
        covariates of each patch's last step."""
        cfg = self.config
        if cfg.patch_len == 1 and cfg.patch_stride == 1:
            return x, timestamps, cov
        first = (cfg.lookback - cfg.patch_len) % cfg.patch_stride
        tokens = x[:, first:].unfold(1, cfg.patch_len, cfg.patch_stride).flatten(2)  # [B', N, c * P]
        ends = torch.arange(first + cfg.patch_len - 1, cfg.lookback, cfg.patch_stride, device=x.device)
        return tokens, timestamps[:, ends], None if cov is None else cov[:, ends]

    def _recurrent(self, x, timestamps, cov):
        """The encoder path: raw head outputs ``[B, H, C, Q]`` (``[B, L, C, Q]`` with the skip basis), the
        one-step forecasts ``[B, N, D, Q]`` and their targets ``[B, N, D]`` (N tokens of D values; per step and
        channel without patching)."""
        cfg = self.config
        B, L, C = x.shape
        n_q = len(cfg.quantiles)
        if cfg.channel_independent:
            xs = x.permute(0, 2, 1).reshape(B * C, L, 1)
            ts = timestamps.repeat_interleave(C, dim=0)
            cs = None if cov is None else cov.repeat_interleave(C, dim=0)
        else:
            xs, ts, cs = x, timestamps, cov
        tokens, ts, cs = self._tokens(xs, ts, cs)
        enc = self.encoder(tokens, ts.to(torch.float64), cs)
        if cfg.head == "flatten":
            # a fully missing token's output is left out (its value is the encoder's, not an observation's)
            hidden = self._hidden * enc["observed"][..., None].to(self._hidden.dtype)
            self._hidden = None
            feats = hidden.flatten(1)
        else:
            feats = enc["state"].last_output
        raw = self.head(self.dropout(feats))  # [B', H * c_out * Q]
        nxt = enc["forecast"][:, :, 0]  # [B', N, D', Q]
        N = tokens.shape[1]
        steps = self._head_steps
        if cfg.channel_independent:
            raw = raw.view(B, C, steps, n_q).transpose(1, 2)
            nxt = nxt.view(B, C, N, cfg.patch_len, n_q).transpose(1, 2).reshape(B, N, C * cfg.patch_len, n_q)
            tokens = tokens.view(B, C, N, cfg.patch_len).transpose(1, 2).reshape(B, N, C * cfg.patch_len)
        return raw.reshape(B, steps, C, n_q), nxt, tokens

    def _covariates(self, known, static, past, B, L):
        parts = []
        if known is not None:
            parts.append(known[:, :L])
        if static is not None:
            parts.append(static[:, None].expand(B, L, static.shape[-1]))
        if past is not None:
            parts.append(past)
        return torch.cat(parts, dim=-1).to(torch.get_default_dtype()) if parts else None

    def _check(self, values, timestamps, known, static, past=None):
        cfg = self.config
        op = "GDN2Forecaster"
        if not isinstance(values, torch.Tensor) or not values.is_floating_point() or values.dim() != 3 or \
                tuple(values.shape[1:]) != (cfg.lookback, cfg.n_channels):
            raise ValueError(f"{op}: argument 'values' expected a floating tensor [B, {cfg.lookback}, "
                             f"{cfg.n_channels}], got {getattr(values, 'shape', type(values).__name__)}")
        if torch.isinf(values).any():
            raise ValueError(f"{op}: argument 'values' expected finite values or NaN for missing, got inf")
        B, L, C = values.shape
        if timestamps is not None and (not isinstance(timestamps, torch.Tensor) or tuple(timestamps.shape) != (B, L)):
            raise ValueError(f"{op}: argument 'timestamps' expected [B={B}, L={L}] or None, got "
                             f"{getattr(timestamps, 'shape', type(timestamps).__name__)}")
        for name, t, shape, n in (("known", known, (B, L + cfg.horizon, cfg.n_known), cfg.n_known),
                                  ("static", static, (B, cfg.n_static), cfg.n_static),
                                  ("past", past, (B, L, cfg.n_past), cfg.n_past)):
            if (t is None) != (n == 0):
                raise ValueError(f"{op}: argument '{name}' expected {'None' if n == 0 else list(shape)}, got "
                                 f"{'None' if t is None else list(t.shape)}")
            if t is not None and (tuple(t.shape) != shape or not torch.isfinite(t).all()):
                raise ValueError(f"{op}: argument '{name}' expected finite values of shape {list(shape)}, got "
                                 f"{list(t.shape)}")
        return B, L, C
