"""The forecaster's optional learning-rate schedule: a warmup then a cosine to 5 % of the rate, stepped per batch,
on every parameter group; the constant rate stays the default."""

from __future__ import annotations

import pytest

from gdn2ts.forecasting.data import DataConfig
from gdn2ts.forecasting.fit import fit
from gdn2ts.forecasting.lightning import ForecastDataModule, ModelConfig, TrainConfig

from forecast_frames import ett_frame

MODEL = ModelConfig(kind="gdn2", hidden_size=8, num_heads=1, head_dim=8, channel_independent=True, patch_len=4,
                    patch_stride=4)


def _dm():
    return ForecastDataModule(DataConfig(path="frame", layout="ett", lookback=16, horizon=8, batch_size=16,
                                         borders=(300, 400, 500)), frame=ett_frame(500))


@pytest.mark.parametrize("schedule, final", [("cosine", 0.05), ("constant", 1.0)])
def test_the_rate_ends_where_the_schedule_says(schedule, final, tmp_path):
    train = TrainConfig(lr=2e-3, recurrent_lr_scale=0.5, max_epochs=2, patience=2, lr_schedule=schedule,
                        accelerator="cpu")
    module, info = fit(MODEL, _dm(), train, out=tmp_path, quiet=True)
    assert info["epochs"] == 2
    slow, fast = module.trainer.optimizers[0].param_groups
    assert slow["lr"] == pytest.approx(2e-3 * 0.5 * final) and fast["lr"] == pytest.approx(2e-3 * final)


def test_an_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear")
