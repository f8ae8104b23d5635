"""gdn2ts fit, predict, forecast (fit, predict with --futr, backtest) and bench forecast; every recipe in
tasks/forecasting loads into its typed config."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path

import polars as pl
import pytest
import torch
import yaml

from gdn2ts.cli import main
from gdn2ts.forecasting.bench import is_etth1, print_table
from gdn2ts.forecasting.cli import fit as fit_command
from gdn2ts.forecasting.data import DataConfig
from gdn2ts.forecasting.fit import FitConfig
from gdn2ts.forecasting.lightning import ModelConfig, TrainConfig

from forecast_frames import REAL_ETTH1, ett_frame

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
    assert record["environment"]["device"] in ("cpu", "cuda")
    # labelled with the file's own name; ETTh1's published figures only beside ETTh1
    assert record["dataset"] == "ETTsynth" and record["published"] == {} and "ETTsynth" in record["protocol"]
    with pytest.raises(SystemExit, match="no file"):
        main(["bench", "forecast", "--data", str(tmp_path / "missing.csv")])


def test_bench_table_names_the_file_and_shows_published_rows_for_etth1_only(tmp_path, capsys):
    data = tmp_path / "ETTsynth.csv"
    ett_frame(50).write_csv(data)
    renamed = tmp_path / "ETTh1.csv"
    shutil.copy(data, renamed)
    assert not is_etth1(data) and is_etth1(renamed)
    if Path(REAL_ETTH1).is_file():
        shutil.copy(REAL_ETTH1, tmp_path / "renamed.csv")
        assert is_etth1(tmp_path / "renamed.csv")   # by its checksum
    rows = [{"model": "dlinear", "lookback": 12, "horizon": 4, "mse": 0.5, "mae": 0.4}]
    base = {"environment": {"device": "cpu"}, "wall_seconds": 1.0, "results": rows,
            "averages": [{"model": "dlinear", "lookback": 12, "horizons": [4], "mse": 0.5, "mae": 0.4}]}
    print_table({**base, "data": str(data), "dataset": "ETTsynth", "published": {}})
    text = capsys.readouterr().out
    assert "ETTsynth (cpu" in text and "ETTh1" not in text and "published" not in text
    from gdn2ts.forecasting.bench import PUBLISHED

    print_table({**base, "data": str(renamed), "dataset": "ETTh1", "published": PUBLISHED})
    text = capsys.readouterr().out
    assert "ETTh1 (cpu" in text and "TimeMixer (published)" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_gpu_asked_for_without_one_is_a_clear_error(tmp_path):
    data = tmp_path / "ETTsynth.csv"
    ett_frame(15_000).write_csv(data)
    with pytest.raises(SystemExit, match="gdn2ts bench forecast: accelerator 'gpu': torch .* sees no CUDA GPU"):
        main(["bench", "forecast", "--data", str(data), "--device", "gpu", "--json", str(tmp_path / "b.json")])
    with pytest.raises(SystemExit, match="gdn2ts fit: accelerator 'cuda': .* sees no CUDA GPU"):
        main(["fit", "tasks/forecasting/tiny.yaml", "--out", str(tmp_path / "run"), "--train.accelerator", "cuda",
              "--quiet", "true"])


def test_forecast_fit_predict_with_future_covariates_and_backtest(tmp_path, capsys):
    out = tmp_path / "run"
    main(["forecast", "fit", "tasks/forecasting/tiny_counts.yaml", "--out", str(out), "--plot", "false",
          "--quiet", "true"])
    data = pl.read_csv("tests/forecasting/tiny_counts.csv", try_parse_dates=True)
    cut = data["time"].max() - timedelta(hours=11)
    data.filter(pl.col("time") < cut).write_csv(tmp_path / "history.csv")
    future = data.filter(pl.col("time") >= cut).select("store", "time", "hour", "weekday", "promo")
    future.write_parquet(tmp_path / "future.parquet")
    main(["forecast", "predict", "--checkpoint", str(out / "best.ckpt"), "--data", str(tmp_path / "history.csv"),
          "--futr", str(tmp_path / "future.parquet"), "--out", str(tmp_path / "f.parquet"), "--quiet", "true"])
    f = pl.read_parquet(tmp_path / "f.parquet")
    assert f.columns == ["series", "step", "time", "channel", "actual", "point", "q0.1", "q0.5", "q0.9"]
    assert f.schema["time"] == data.schema["time"] and f.height == 2 * 12
    assert sorted(f["time"].unique().to_list()) == sorted(future["time"].unique().to_list())
    assert (f.select("q0.1", "q0.5", "q0.9").to_numpy() >= 0).all()
    with pytest.raises(SystemExit, match="gdn2ts predict: .*fit with known covariates"):
        main(["forecast", "predict", "--checkpoint", str(out / "best.ckpt"), "--data", str(tmp_path / "history.csv"),
              "--out", str(tmp_path / "g.csv")])
    with pytest.raises(SystemExit, match="lacks 6 of its 12 forecast steps"):
        future.filter(pl.col("time") < cut + timedelta(hours=6)).write_csv(tmp_path / "short.csv")
        main(["forecast", "predict", "--checkpoint", str(out / "best.ckpt"), "--data", str(tmp_path / "history.csv"),
              "--futr", str(tmp_path / "short.csv"), "--out", str(tmp_path / "g.csv")])
    capsys.readouterr()
    main(["forecast", "backtest", "tasks/forecasting/tiny_counts.yaml", "--n_windows", "2", "--out",
          str(tmp_path / "bt")])
    assert "backtest: 2 windows, 48 rows" in capsys.readouterr().out
    bt = pl.read_parquet(tmp_path / "bt" / "backtest.parquet")
    assert bt.columns[:2] == ["series", "cutoff"] and bt.height == 2 * 2 * 12
