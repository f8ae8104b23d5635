"""Seed ensembles: the averaged forecast, its bound by the members' mean error, fitting with consecutive seeds,
and the benchmark's ``ensemble`` option with its named errors."""

from __future__ import annotations

import pytest
import torch

from gdn2ts.forecasting.bench import run_bench
from gdn2ts.forecasting.data import DataConfig
from gdn2ts.forecasting.ensemble import ForecastEnsemble, fit_ensemble
from gdn2ts.forecasting.lightning import ForecastDataModule, ModelConfig, TrainConfig, evaluate
from gdn2ts.models.forecaster import ForecasterConfig, GDN2Forecaster

TINY = ModelConfig(kind="gdn2", hidden_size=8, num_heads=2, head_dim=4, channel_independent=True, patch_len=8,
                   patch_stride=4)


def test_ensemble_averages_points_and_quantiles_and_never_errs_more_than_its_members_on_average():
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        m = GDN2Forecaster(ForecasterConfig(n_channels=2, lookback=12, horizon=4, hidden_size=8, head_dim=4))
        torch.nn.init.normal_(m.head.weight, std=0.3)
        members.append(m.eval())
    ens = ForecastEnsemble(members).eval()
    x, y = torch.randn(16, 12, 2), torch.randn(16, 4, 2)
    with torch.no_grad():
        outs = [m(x) for m in members]
        got = ens(x)
    assert torch.allclose(got["point"], sum(o["point"] for o in outs) / 3, atol=1e-6)
    assert torch.allclose(got["forecast"], sum(o["forecast"] for o in outs) / 3, atol=1e-6)
    assert (got["forecast"].diff(dim=-1) >= 0).all()
    member_mse = torch.stack([(o["point"] - y).square().mean() for o in outs])
    assert (got["point"] - y).square().mean() < member_mse.mean()
    with pytest.raises(ValueError, match="'members' expected one or more torch modules"):
        ForecastEnsemble([])


def test_fit_ensemble_uses_consecutive_seeds_and_evaluates_like_one_model(ett_csv):
    dm = ForecastDataModule(DataConfig(path=str(ett_csv), lookback=24, horizon=4, batch_size=64))
    train = TrainConfig(lr=0.01, max_epochs=1, limit_train_batches=3, seed=5)
    ens, info = fit_ensemble(TINY, dm, train, members=2)
    assert len(info["epochs"]) == len(info["best_val_mse"]) == 2 and info["seconds"] > 0
    a, b = ens.members
    assert not torch.equal(a.encoder.embed.weight, b.encoder.embed.weight)   # seeds 5 and 6
    metrics = evaluate(ens, dm.test_dataloader())
    assert metrics["windows"] == len(dm.datasets["test"]) and metrics["mse"] > 0
    with pytest.raises(ValueError, match="'members' expected a positive int"):
        fit_ensemble(TINY, dm, train, members=0)


def test_bench_ensemble_option_records_members_and_validation(ett_csv, tmp_path):
    overrides = {"gdn2_ci": {"hidden_size": 8, "head_dim": 4, "ensemble": 2}}
    record = run_bench(str(ett_csv), lookbacks=(24,), horizons=(4,), models=("gdn2_ci",),
                       train=TrainConfig(max_epochs=1, limit_train_batches=2), model_overrides=overrides,
                       json_path=str(tmp_path / "b.json"), quiet=True)
    (row,) = record["results"]
    assert row["ensemble"] == 2 and len(row["epochs"]) == 2 and row["val_mse"] > 0 and row["mse"] > 0
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="'ensemble' of gdn2_ci expected a positive int"):
            run_bench(str(ett_csv), lookbacks=(24,), horizons=(4,), models=("gdn2_ci",),
                      model_overrides={"gdn2_ci": {"ensemble": bad}}, quiet=True)
