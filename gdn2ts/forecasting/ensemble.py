"""Seed ensembles: several fits of one configuration (seeds ``seed, seed + 1, ...``) whose forecasts are averaged.

The average's squared error is never above the members' mean squared error (Jensen), and it is lower by the
spread between the members: what one fit learns by chance from its seed is averaged out.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from gdn2ts.forecasting.lightning import ForecastDataModule, ModelConfig, TrainConfig

__all__ = ["ForecastEnsemble", "fit_ensemble"]


class ForecastEnsemble(nn.Module):
    """The mean of several forecasters' outputs (same inputs, same horizon).

    ``point`` ``[B, H, C]`` is the mean of the members' points; ``forecast`` ``[B, H, C, Q]`` (when the members
    give quantiles) is the mean of their quantiles, which stay ordered (a mean of non-decreasing vectors is
    non-decreasing).

    Example:
        >>> from gdn2ts.forecasting.baselines import DLinear, DLinearConfig
        >>> members = [DLinear(DLinearConfig(n_channels=2, lookback=8, horizon=3)) for _ in range(2)]
        >>> x = torch.randn(4, 8, 2)
        >>> out = ForecastEnsemble(members)(x)
        >>> bool(torch.allclose(out["point"], (members[0](x)["point"] + members[1](x)["point"]) / 2))
        True
    """

    def __init__(self, members):
        super().__init__()
        members = list(members)
        if not members or not all(isinstance(m, nn.Module) for m in members):
            raise ValueError(f"ForecastEnsemble: 'members' expected one or more torch modules, got {members!r}")
        self.members = nn.ModuleList(members)

    def forward(self, *args, **kwargs) -> dict:
        outs = [m(*args, **kwargs) for m in self.members]
        avg = {"point": torch.stack([o["point"] for o in outs]).mean(0)}
        if all(o.get("forecast") is not None for o in outs):
            avg["forecast"] = torch.stack([o["forecast"] for o in outs]).mean(0)
        return avg


def fit_ensemble(model: ModelConfig, dm: ForecastDataModule, train: TrainConfig, members: int,
                 quiet: bool = True) -> tuple[ForecastEnsemble, dict]:
    """Fit ``members`` copies of ``model`` with seeds ``train.seed + i`` (each keeps its best validation epoch);
    returns the ensemble and a summary (``epochs`` and ``best_val_mse`` per member, summed ``seconds``)."""
    from gdn2ts.forecasting.fit import fit

    if isinstance(members, bool) or not isinstance(members, int) or members < 1:
        raise ValueError(f"fit_ensemble: 'members' expected a positive int, got {members!r}")
    nets, infos = [], []
    for i in range(members):
        module, info = fit(model, dm, replace(train, seed=train.seed + i), quiet=quiet)
        nets.append(module.net.eval())
        infos.append(info)
    return ForecastEnsemble(nets), {"epochs": [i["epochs"] for i in infos],
                                    "best_val_mse": [i["best_val_mse"] for i in infos],
                                    "seconds": sum(i["seconds"] for i in infos)}
