"""gdn2ts fit, predict and bench forecast; every recipe in tasks/forecasting loads into its typed config."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml

from gdn2ts.cli import main
from gdn2ts.forecasting.cli import fit as fit_command
from gdn2ts.forecasting.data import DataConfig
from gdn2ts.forecasting.fit import FitConfig
from gdn2ts.forecasting.lightning import ModelConfig, TrainConfig

from forecast_frames import ett_frame

RECIPES = sorted(Path("tasks/forecasting").glob("*.yaml"))


def _config(path: Path) -> FitConfig:
    raw = yaml.safe_load(path.read_text())
    unknown = set(raw) - {"data", "model", "train", "out"}
    assert not unknown, f"{path}: unknown keys {unknown}"
    tup = {k: tuple(v) if isinstance(v, list) else v for k, v in raw["data"].items()}
    model = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.get("model", {}).items()}
    return FitConfig(data=DataConfig(**tup), model=ModelConfig(**model), train=TrainConfig(**raw.get("train", {})),
                     out=raw.get("out", "runs/forecast"))


def test_recipes_exist():
    assert {p.name for p in RECIPES} >= {"tiny.yaml", "etth1_gdn2_96.yaml", "etth1_dlinear_96.yaml",
                                         "etth1_gru_96.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads(path):
    cfg = _config(path)
    assert cfg.data.lookback >= 1 and cfg.model.kind in ("gdn2", "dlinear", "gru")


def test_fit_recipe_then_predict(tmp_path, capsys):
    out = tmp_path / "run"
    main(["fit", "tasks/forecasting/tiny.yaml", "--out", str(out), "--plot", "false"])
    record = json.loads((out / "metrics.json").read_text())
    assert record["metrics"]["test"]["windows"] > 0 and (out / "best.ckpt").is_file()
    assert "fit gdn2" in capsys.readouterr().out
    main(["predict", "--checkpoint", str(out / "best.ckpt"), "--split", "test", "--out", str(tmp_path / "p.parquet"),
          "--quiet", "true"])
    frame = pl.read_parquet(tmp_path / "p.parquet")
    assert {"q0.1", "q0.5", "q0.9", "actual", "point"} <= set(frame.columns)
    assert frame.height == record["metrics"]["test"]["windows"] * 8 * 2
    with pytest.raises(SystemExit, match="fit with known covariates"):
        main(["predict", "--checkpoint", str(out / "best.ckpt"), "--out", str(tmp_path / "q.csv")])


def test_fit_bad_data_exits_with_the_reason(tmp_path):
    with pytest.raises(SystemExit, match="gdn2ts fit: .*no file"):
        fit_command(DataConfig(path=str(tmp_path / "none.csv"), layout="long"), out=str(tmp_path), quiet=True)


def test_bench_forecast_writes_json(tmp_path):
    data = tmp_path / "ETTsynth.csv"
    ett_frame(15_000).write_csv(data)
    path = tmp_path / "bench.json"
    main(["bench", "forecast", "--data", str(data), "--lookback", "[12]", "--horizons", "[4, 6]",
          "--models", "[gdn2, dlinear, gru]", "--epochs", "1", "--limit_train_batches", "2", "--json", str(path),
          "--quiet", "true"])
    record = json.loads(path.read_text())
    assert [(r["model"], r["horizon"]) for r in record["results"]] == [
        (m, h) for h in (4, 6) for m in ("gdn2", "dlinear", "gru")]
    assert all(r["test_windows"] == 2880 - r["horizon"] + 1 for r in record["results"])
    assert {a["model"] for a in record["averages"]} == {"gdn2", "dlinear", "gru"}
    assert record["environment"]["device"] in ("cpu", "cuda") and record["published"]["lookback 96"]["DLinear"]
    with pytest.raises(SystemExit, match="no file"):
        main(["bench", "forecast", "--data", str(tmp_path / "missing.csv")])
