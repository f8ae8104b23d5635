"""A pytorch-forecasting model built on GDN-2: ``GDN2Model(BaseModelWithCovariates)``.

One recurrence runs over the encoder steps and then continues over the decoder steps. Encoder tokens carry the
encoder variables (past targets, unknown and known reals, categorical embeddings) and the static covariates;
decoder tokens carry only what is known in the future (known reals and categoricals, statics) plus a learned
embedding of the horizon step. Every decoder step's output goes through a linear head, so all horizons are
predicted at once (direct multi-horizon, no feedback of predictions): training and prediction are one parallel
chunked pass, errors do not compound over the horizon, and quantile outputs need no sampling.

Padded encoder steps (a series shorter than the batch's longest encoder) are masked tokens of the GDN-2 layer,
skipped exactly: the recurrent state and the conv tail pass through them unchanged, so a padded series gets the
same forecast as the same series alone. Quantile outputs never cross: the lowest level plus cumulative
non-negative increments.
"""

from __future__ import annotations

from copy import copy

import torch
import torch.nn.functional as F
from pytorch_forecasting.data import TimeSeriesDataSet
from pytorch_forecasting.data.encoders import MultiNormalizer, NaNLabelEncoder
from pytorch_forecasting.metrics import MAE, MAPE, RMSE, SMAPE, MultiHorizonMetric, MultiLoss, QuantileLoss
from pytorch_forecasting.models.base import BaseModelWithCovariates
from pytorch_forecasting.models.nn import MultiEmbedding
from pytorch_forecasting.utils import to_list
from torch import nn

from gdn2ts.layers import GatedDeltaNet2, GDN2Config, RMSNorm
from gdn2ts.layers.block import Block, split_gate_up
from gdn2ts.layers.mlp import SwiGLU

__all__ = ["GDN2Model"]


def _names(*lists: list[str]) -> list[str]:
    """Names of several lists in order, each once."""
    return list(dict.fromkeys(name for names in lists for name in names))


class GDN2Model(BaseModelWithCovariates):
    """GDN-2 encoder-decoder for a :class:`~pytorch_forecasting.TimeSeriesDataSet`; build it with
    :meth:`from_dataset`.

    ``forward(x)`` takes the dataloader's ``x`` dict (``encoder_cont`` ``[B, Te, n_reals]``, ``encoder_cat``
    ``[B, Te, n_cats]``, ``encoder_lengths`` ``[B]``, the same for the decoder with ``Td`` steps,
    ``target_scale``) and returns the network output whose ``prediction`` is ``[B, Td, output_size]`` (a list of
    those, one per target, for several targets), rescaled to the target's units.

    Example:
        >>> import numpy as np, pandas as pd
        >>> from pytorch_forecasting import TimeSeriesDataSet
        >>> from gdn2ts.forecasting.pf import GDN2Model
        >>> t = np.arange(40)
        >>> df = pd.DataFrame({"time_idx": np.tile(t, 2), "series": np.repeat(["a", "b"], 40),
        ...                    "y": np.sin(np.tile(t, 2) / 3.0) + np.repeat([0.0, 2.0], 40)})
        >>> ds = TimeSeriesDataSet(df, time_idx="time_idx", target="y", group_ids=["series"],
        ...                        max_encoder_length=12, max_prediction_length=4, static_categoricals=["series"],
        ...                        time_varying_known_reals=["time_idx"], time_varying_unknown_reals=["y"])
        >>> model = GDN2Model.from_dataset(ds, hidden_size=16, num_heads=2, head_dim=8)
        >>> x, y = next(iter(ds.to_dataloader(batch_size=3, train=False)))
        >>> model(x)["prediction"].shape                      # 7 quantiles of QuantileLoss
        torch.Size([3, 4, 7])
    """

    def __init__(
        self,
        hidden_size: int = 32,
        n_layers: int = 2,
        num_heads: int = 2,
        head_dim: int = 16,
        variant: str = "gdn2",
        mlp_ratio: float = 2.0,
        dropout: float = 0.1,
        max_prediction_length: int = 1,
        static_categoricals: list[str] | None = None,
        static_reals: list[str] | None = None,
        time_varying_categoricals_encoder: list[str] | None = None,
        time_varying_categoricals_decoder: list[str] | None = None,
        categorical_groups: dict[str, list[str]] | None = None,
        time_varying_reals_encoder: list[str] | None = None,
        time_varying_reals_decoder: list[str] | None = None,
        embedding_sizes: dict[str, tuple[int, int]] | None = None,
        embedding_paddings: list[str] | None = None,
        embedding_labels: dict | None = None,
        x_reals: list[str] | None = None,
        x_categoricals: list[str] | None = None,
        output_size: int | list[int] = 7,
        target: str | list[str] | None = None,
        loss: MultiHorizonMetric | None = None,
        logging_metrics: nn.ModuleList | None = None,
        **kwargs,
    ):
        """
        Args:
            hidden_size: width of the residual stream.
            n_layers: GDN-2 blocks (mixer + MLP each).
            num_heads: heads per mixer.
            head_dim: key and value size per head (each head's state is ``head_dim x head_dim``).
            variant: mixer preset of :meth:`GDN2Config.variant` (gdn2, kda, gdn, mamba2, erase_only, write_only).
            mlp_ratio: hidden width of the SwiGLU MLP over ``hidden_size``.
            dropout: dropout on each residual branch.
            max_prediction_length: decoder steps with their own learned step embedding (the dataset's).
            static_categoricals, static_reals, time_varying_categoricals_encoder, time_varying_categoricals_decoder,
            categorical_groups, time_varying_reals_encoder, time_varying_reals_decoder, embedding_sizes,
            embedding_paddings, embedding_labels, x_reals, x_categoricals: the dataset's variables, as
                :meth:`from_dataset` fills them in (pytorch-forecasting's ``BaseModelWithCovariates`` names).
            output_size: outputs per step (quantiles of ``QuantileLoss``; the distribution's parameters for a
                ``DistributionLoss``; 1 for point losses), a list for several targets.
            target: target name, or a list of names.
            loss: the training loss; ``QuantileLoss()`` by default (``MultiLoss`` for several targets).
            logging_metrics: metrics logged in training and validation.
        """
        static_categoricals = static_categoricals or []
        static_reals = static_reals or []
        time_varying_categoricals_encoder = time_varying_categoricals_encoder or []
        time_varying_categoricals_decoder = time_varying_categoricals_decoder or []
        categorical_groups = categorical_groups or {}
        time_varying_reals_encoder = time_varying_reals_encoder or []
        time_varying_reals_decoder = time_varying_reals_decoder or []
        embedding_sizes = embedding_sizes or {}
        embedding_paddings = embedding_paddings or []
        embedding_labels = embedding_labels or {}
        x_reals = x_reals or []
        x_categoricals = x_categoricals or []
        if loss is None:
            loss = QuantileLoss()
        if logging_metrics is None:
            logging_metrics = nn.ModuleList([SMAPE(), MAE(), RMSE(), MAPE()])
        _check_hparams(n_layers=n_layers, max_prediction_length=max_prediction_length, mlp_ratio=mlp_ratio,
                       dropout=dropout, target=target, loss=loss, output_size=output_size)
        # the mixer's own validation names any bad width, head count or variant
        mixer = GDN2Config.variant(variant, hidden_size=hidden_size, num_heads=num_heads, head_k_dim=head_dim,
                                   head_v_dim=head_dim, gate_low_rank=max(4, min(128, hidden_size // 2)))
        self.save_hyperparameters()
        # the loss and metrics are modules: the base class stores them apart from the YAML-able hyperparameters
        super().__init__(loss=loss, logging_metrics=logging_metrics, **kwargs)
        hp = self.hparams
        self.embeddings = MultiEmbedding(embedding_sizes=embedding_sizes, embedding_paddings=embedding_paddings,
                                         categorical_groups=categorical_groups, x_categoricals=x_categoricals)
        widths = self.embeddings.output_size
        self._enc_reals = _names(hp.static_reals, hp.time_varying_reals_encoder)
        self._dec_reals = _names(hp.static_reals, hp.time_varying_reals_decoder)
        self._enc_cats = _names(hp.static_categoricals, hp.time_varying_categoricals_encoder)
        self._dec_cats = _names(hp.static_categoricals, hp.time_varying_categoricals_decoder)
        n_enc = len(self._enc_reals) + sum(widths[n] for n in self._enc_cats)
        n_dec = len(self._dec_reals) + sum(widths[n] for n in self._dec_cats)
        # a bias-only projection still gives a token when a side has no inputs (e.g. no known-future covariates)
        self.encoder_input = nn.Linear(max(n_enc, 1), hidden_size)
        self.decoder_input = nn.Linear(max(n_dec, 1), hidden_size)
        self.decoder_step = nn.Embedding(max_prediction_length, hidden_size)
        nn.init.normal_(self.decoder_step.weight, std=0.02)
        width = max(1, int(hidden_size * mlp_ratio))
        self.blocks = nn.ModuleList(Block(GatedDeltaNet2(mixer), SwiGLU(hidden_size, width), hidden_size,
                                          dropout=dropout) for _ in range(n_layers))
        self.out_norm = RMSNorm(hidden_size)
        self._sizes = to_list(output_size)
        self.head = nn.Linear(hidden_size, sum(self._sizes))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # weights of the earlier blocks (the MLP's gate and up projections fused, ``blocks.i.gate_up`` and
        # ``blocks.i.down``) load into the SwiGLU of each Block
        for i in range(len(self.blocks)):
            if f"{prefix}blocks.{i}.gate_up.weight" in state_dict:
                split_gate_up(state_dict, f"{prefix}blocks.{i}.", f"{prefix}blocks.{i}.mlp.")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def _pkg(cls):
        """pytorch-forecasting's package record of this model (tags, test parameters)."""
        from gdn2ts.forecasting.pf_pkg import GDN2Model_pkg

        return GDN2Model_pkg

    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_dataset(cls, dataset: TimeSeriesDataSet, allowed_encoder_known_variable_names: list[str] | None = None,
                     **kwargs) -> GDN2Model:
        """Build the model for ``dataset``: variables, embedding sizes, target(s), ``output_size`` and the target
        normalizer are read from it; ``kwargs`` set the hyperparameters of :meth:`__init__` (``loss`` defaults to
        ``QuantileLoss()``, one per target for several targets).

        Example:
            >>> import numpy as np, pandas as pd
            >>> from pytorch_forecasting import TimeSeriesDataSet
            >>> from pytorch_forecasting.metrics import MAE
            >>> df = pd.DataFrame({"t": np.arange(30), "g": "a", "y": np.arange(30.0), "z": np.ones(30)})
            >>> ds = TimeSeriesDataSet(df, time_idx="t", target=["y", "z"], group_ids=["g"], max_encoder_length=8,
            ...                        max_prediction_length=3, time_varying_unknown_reals=["y", "z"])
            >>> model = GDN2Model.from_dataset(ds, loss=MAE(), hidden_size=16, head_dim=8)
            >>> model.hparams.output_size, model.hparams.target, type(model.loss).__name__
            ([1, 1], ['y', 'z'], 'MultiLoss')
        """
        if not isinstance(dataset, TimeSeriesDataSet):
            raise ValueError(f"GDN2Model.from_dataset: argument 'dataset' expected a TimeSeriesDataSet, got "
                             f"{type(dataset).__name__}")
        normalizers = (dataset.target_normalizer.normalizers if isinstance(dataset.target_normalizer, MultiNormalizer)
                       else [dataset.target_normalizer])
        for name, normalizer in zip(dataset.target_names, normalizers, strict=True):
            if isinstance(normalizer, NaNLabelEncoder):
                raise ValueError(f"GDN2Model.from_dataset: expected continuous targets, got the categorical target "
                                 f"{name!r} (classification is not supported)")
        new_kwargs = copy(kwargs)
        new_kwargs.setdefault("max_prediction_length", dataset.max_prediction_length)
        new_kwargs.setdefault("target", dataset.target)
        new_kwargs.update(cls.deduce_default_output_parameters(dataset, kwargs, default_loss=QuantileLoss()))
        loss = new_kwargs.get("loss", QuantileLoss())
        for name, normalizer, metric in zip(dataset.target_names, normalizers,
                                            loss.metrics if isinstance(loss, MultiLoss) else [loss], strict=False):
            transformation = getattr(normalizer, "transformation", None)
            # Poisson and Tweedie losses exponentiate the output: it must come back from the normalizer as a log
            # rate, i.e. log1p forward and nothing reversed (otherwise exp of the target's units overflows)
            if type(metric).__name__ in ("PoissonLoss", "TweedieLoss") and not (
                    isinstance(transformation, dict) and transformation.get("forward") is not None
                    and getattr(transformation.get("reverse"), "__name__", "_identity") == "_identity"):
                raise ValueError(f"GDN2Model.from_dataset: {type(metric).__name__} reads the output for {name!r} as a "
                                 f"log rate, so the target normalizer must transform the target (log1p) and reverse "
                                 f"nothing, e.g. gdn2ts.forecasting.pf_pkg.log_rate_normalizer(); got {normalizer!r}")
        return super().from_dataset(dataset, allowed_encoder_known_variable_names=allowed_encoder_known_variable_names,
                                    **new_kwargs)

    def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The dataloader's ``x`` -> network output with ``prediction`` ``[B, Td, output_size]`` (a list per
        target for several targets) in the target's units; see the class docstring."""
        enc_len, Te, Td = x["encoder_lengths"], x["encoder_cont"].shape[1], x["decoder_cont"].shape[1]
        if Td > self.hparams.max_prediction_length:
            raise ValueError(f"GDN2Model.forward: expected at most max_prediction_length="
                             f"{self.hparams.max_prediction_length} decoder steps, got {Td}")
        enc = self.encoder_input(self._inputs(x["encoder_cont"], x["encoder_cat"], self._enc_reals, self._enc_cats))
        dec = self.decoder_input(self._inputs(x["decoder_cont"], x["decoder_cat"], self._dec_reals, self._dec_cats))
        dec = dec + self.decoder_step.weight[:Td]
        h = torch.cat([enc, dec], dim=1)
        # encoder padding sits after each series' last step: those tokens are skipped exactly by every mixer;
        # decoder padding comes after the steps that are read, so causality keeps it harmless
        steps = torch.arange(Te, device=h.device)
        mask = torch.cat([steps[None] < enc_len[:, None], h.new_ones(h.shape[0], Td, dtype=torch.bool)], dim=1)
        for block in self.blocks:
            h, _ = block(h, attention_mask=mask)
        out = self.head(self.out_norm(h[:, Te:]))
        parts = [self._ordered(p, loss) for p, loss in zip(out.split(self._sizes, dim=-1), self._losses(), strict=True)]
        prediction = parts if self.n_targets > 1 else parts[0]
        prediction = self.transform_output(prediction, target_scale=x["target_scale"])
        return self.to_network_output(prediction=prediction)

    # ------------------------------------------------------------------------------------------------------------

    def _inputs(self, cont: torch.Tensor, cat: torch.Tensor, reals: list[str], cats: list[str]) -> torch.Tensor:
        """``[B, T, n_reals]`` reals and ``[B, T, n_cats]`` categoricals -> the named ones, ``[B, T, n_in]``."""
        parts = [cont[..., [self.hparams.x_reals.index(n) for n in reals]]] if reals else []
        if cats:
            embedded = self.embeddings(cat)
            parts += [embedded[n] for n in cats]
        if not parts:
            return cont.new_zeros(*cont.shape[:2], 1)
        return torch.cat(parts, dim=-1)

    def _losses(self) -> list:
        return list(self.loss.metrics) if isinstance(self.loss, MultiLoss) else [self.loss]

    @staticmethod
    def _ordered(out: torch.Tensor, loss) -> torch.Tensor:
        """Quantile outputs ``[B, Td, Q]`` made non-decreasing in the (increasing) levels: the lowest level plus
        cumulative softplus increments. Other losses' outputs pass through."""
        if not isinstance(loss, QuantileLoss) or out.shape[-1] < 2:
            return out
        return torch.cat([out[..., :1], out[..., :1] + F.softplus(out[..., 1:]).cumsum(-1)], dim=-1)


def _check_hparams(*, n_layers, max_prediction_length, mlp_ratio, dropout, target, loss, output_size) -> None:
    """Hyperparameters the mixer config does not check; each failure names the argument and what was expected."""
    op = "GDN2Model"
    for name, value in (("n_layers", n_layers), ("max_prediction_length", max_prediction_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{op}: argument '{name}' expected a positive int, got {value!r}")
    if not mlp_ratio > 0:
        raise ValueError(f"{op}: argument 'mlp_ratio' expected a positive number, got {mlp_ratio!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{op}: argument 'dropout' expected a number in [0, 1), got {dropout!r}")
    targets = to_list(target) if target is not None else []
    if isinstance(target, (list, tuple)) and not isinstance(loss, MultiLoss):
        raise ValueError(f"{op}: argument 'loss' expected a MultiLoss with one metric per target for "
                         f"{len(targets)} targets, got {type(loss).__name__}")
    if isinstance(loss, MultiLoss) and (not isinstance(target, (list, tuple)) or len(loss.metrics) != len(targets)
                                        or len(to_list(output_size)) != len(targets)):
        raise ValueError(f"{op}: expected one loss metric and one output size per target; got {len(loss.metrics)} "
                         f"metrics and output_size={output_size!r} for target={target!r}")
    for metric, size in zip((loss.metrics if isinstance(loss, MultiLoss) else [loss]), to_list(output_size),
                            strict=False):
        if isinstance(metric, QuantileLoss) and list(metric.quantiles) != sorted(set(metric.quantiles)):
            raise ValueError(f"{op}: argument 'loss' expected QuantileLoss levels in increasing order, got "
                             f"{metric.quantiles}")
        if isinstance(metric, QuantileLoss) and size != len(metric.quantiles):
            raise ValueError(f"{op}: argument 'output_size' expected {len(metric.quantiles)} (the QuantileLoss "
                             f"levels), got {size}")
