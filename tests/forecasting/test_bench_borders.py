"""The benchmark's ``borders`` option: the splits, the record and the test windows follow the given end rows, and
bad borders are refused with the reason before any fit."""

from __future__ import annotations

import json

import pytest

from gdn2ts.cli import main
from gdn2ts.forecasting.bench import run_bench
from gdn2ts.forecasting.data import DataError
from gdn2ts.forecasting.lightning import TrainConfig

from forecast_frames import ett_frame

TINY = TrainConfig(max_epochs=1, patience=1, limit_train_batches=2, accelerator="cpu")


@pytest.fixture
def short_csv(tmp_path):
    """1,100 ETT-format rows: too few for the protocol's borders, enough for shifted ones."""
    path = tmp_path / "ETTshort.csv"
    ett_frame(1_100).write_csv(path)
    return path


@pytest.mark.parametrize("borders", [(600, 800, 1000), (700, 900, 1100)])
def test_record_and_test_windows_follow_the_borders(short_csv, tmp_path, borders):
    lookback, horizon = 12, 4
    path = tmp_path / "bench.json"
    record = run_bench(str(short_csv), lookbacks=(lookback,), horizons=(horizon,), models=("dlinear",), train=TINY,
                       json_path=str(path), quiet=True, borders=borders)
    # test rows [b1 - L, b2): every window kept
    test_rows = borders[2] - (borders[1] - lookback)
    (row,) = record["results"]
    assert record["borders"] == list(borders)
    assert row["test_windows"] == test_rows - lookback - horizon + 1
    assert json.loads(path.read_text())["borders"] == list(borders)


def test_cli_passes_the_borders(short_csv, tmp_path):
    path = tmp_path / "bench.json"
    main(["bench", "forecast", "--data", str(short_csv), "--lookback", "[12]", "--horizons", "[6]", "--models",
          "[dlinear]", "--epochs", "1", "--limit_train_batches", "2", "--device", "cpu", "--json", str(path),
          "--quiet", "true", "--borders", "[500, 700, 1050]"])
    record = json.loads(path.read_text())
    assert record["borders"] == [500, 700, 1050]
    assert record["results"][0]["test_windows"] == (1050 - 688) - 12 - 6 + 1


@pytest.mark.parametrize(("borders", "reason"), [
    ((800, 600, 1000), "three increasing positive row numbers"),
    ((600, 800), "three increasing positive row numbers"),
    ((600.0, 800, 1000), "three increasing positive row numbers"),
    ((0, 800, 1000), "three increasing positive row numbers"),
    ((600, 800, 1200), "need 1200 rows, the file has 1100"),
    ((10, 800, 1000), "lookback 12 does not fit before the train border 10"),
])
def test_bad_borders_raise_before_any_fit(short_csv, tmp_path, borders, reason):
    path = tmp_path / "bench.json"
    with pytest.raises(DataError, match=reason):
        run_bench(str(short_csv), lookbacks=(12,), horizons=(4,), models=("dlinear",), train=TINY,
                  json_path=str(path), quiet=True, borders=borders)
    assert not path.exists()


def test_cli_bad_borders_exit_with_the_reason(short_csv, tmp_path):
    with pytest.raises(SystemExit, match="gdn2ts bench forecast: .*need 14400 rows, the file has 1100"):
        main(["bench", "forecast", "--data", str(short_csv), "--models", "[dlinear]", "--json",
              str(tmp_path / "bench.json"), "--quiet", "true"])
