"""Forecasting data: every window kept, the scaler fit on training rows only, loaders and named errors."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from gdn2ts.forecasting.codec import series_frames
from gdn2ts.forecasting.data import (
    ETTH1_SHA256,
    DataConfig,
    DataError,
    download_ett,
    load_ett,
    load_table,
    window_count,
)
from gdn2ts.forecasting.lightning import ForecastDataModule

from forecast_frames import REAL_ETTH1, ett_frame, long_frame


@pytest.mark.parametrize("lookback, horizon", [(96, 96), (96, 720), (336, 192)])
def test_every_evaluation_window_is_kept(ett_csv, lookback, horizon):
    dm = ForecastDataModule(DataConfig(path=str(ett_csv), lookback=lookback, horizon=horizon, eval_batch_size=100))
    dm.setup()
    # the protocol's formula: val rows [8640 - L, 11520), test rows [11520 - L, 14400), every start kept
    expected = {"train": 8640 - lookback - horizon + 1, "val": 11520 - 8640 - horizon + 1,
                "test": 14400 - 11520 - horizon + 1}
    for split, n in expected.items():
        assert len(dm.datasets[split]) == n
    for split in ("val", "test"):
        loader = getattr(dm, f"{split}_dataloader")()
        starts = [int(s) for batch in loader for s in batch["start"]]
        assert len(starts) == expected[split] and starts == sorted(set(starts))
    assert dm.datasets["test"][len(dm.datasets["test"]) - 1]["start"] == 14400 - lookback - horizon
    assert dm.datasets["test"][0]["start"] + lookback == 11520


def test_scaler_sees_training_rows_only(tmp_path):
    clean = ett_frame(15_000)
    poisoned = clean.with_row_index().with_columns(
        [pl.when(pl.col("index") >= 8640).then(1e6).otherwise(pl.col(c)).alias(c) for c in ("HUFL", "OT")]
    ).drop("index")
    stats = []
    for frame in (clean, poisoned):
        dm = ForecastDataModule(DataConfig(path="unused.csv"), frame=frame)
        dm.setup()
        stats.append((dm.scaler.mean, dm.scaler.std))
    assert stats[0] == stats[1]
    train = clean.head(8640).select("HUFL").to_numpy()[:, 0]
    assert dm.scaler.mean[0] == pytest.approx(train.mean()) and dm.scaler.std[0] == pytest.approx(train.std())
    # the check can fail: poisoning one training row moves the statistics
    bad_train = clean.with_row_index().with_columns(
        pl.when(pl.col("index") == 100).then(1e6).otherwise(pl.col("HUFL")).alias("HUFL")).drop("index")
    dm = ForecastDataModule(DataConfig(path="unused.csv"), frame=bad_train)
    dm.setup()
    assert dm.scaler.mean != stats[0][0]


def test_long_format_splits_each_series_chronologically_on_its_grid_with_training_scaler():
    frame = long_frame(n_series=3, n_rows=300, seed=1)
    cfg = DataConfig(layout="long", targets=("HUFL", "OT"), known=("hour",), static=("size",), lookback=24,
                     horizon=12)
    dm = ForecastDataModule(cfg, frame=frame)
    dm.setup()
    for series in dm.splits.values():
        assert [s.id for s in series] == ["s0", "s1", "s2"]
    val_windows = 0
    for tr, va, te, whole in zip(dm.splits["train"], dm.splits["val"], dm.splits["test"], dm.series, strict=True):
        # the dropped hours are back as missing steps: one row per hour from the first to the last
        given = frame.filter(pl.col("series") == whole.id)["date"]
        n = int((given.max() - given.min()) / timedelta(hours=1)) + 1
        assert len(whole.times) == n and (whole.stamps.diff().drop_nulls() == timedelta(hours=1)).all()
        inserted = (~whole.stamps.is_in(given.implode())).to_numpy()
        assert inserted.sum() == n - given.len() and np.isnan(whole.values[inserted]).all()
        a, b = int(n * 0.7), int(n * 0.7) + int(n * 0.1)
        assert (len(tr.times), len(va.times), len(te.times)) == (a, b - a + 24, n - b + 24)
        assert tr.stamps[-1] < va.stamps[24] and va.stamps[-1] < te.stamps[24]   # forecasts follow training rows
        val_windows += window_count(b - a + 24, 24, 12)
    assert len(dm.datasets["val"]) == val_windows
    # scaler: the training rows' statistics (nulls ignored), nothing from val or test
    train_rows = pl.concat([frame.filter((pl.col("series") == s.id) & (pl.col("date") <= s.stamps[-1]))
                            for s in dm.splits["train"]])
    assert dm.scaler.mean[1] == pytest.approx(train_rows["OT"].drop_nulls().mean(), rel=1e-6)
    item = dm.datasets["test"][0]
    assert item["known"].shape == (36, 1) and item["static"].shape == (1,)
    assert item["times"].tolist() == list(range(24))   # grid steps


def test_missing_values_reach_windows_as_nan():
    frame = long_frame(n_series=1, n_rows=200, missing=0.2, seed=3)
    dm = ForecastDataModule(DataConfig(path="unused", layout="long", targets=("HUFL", "OT"), lookback=16,
                                       horizon=4), frame=frame)
    dm.setup()
    values = np.concatenate([dm.datasets["train"][i]["values"].numpy() for i in range(len(dm.datasets["train"]))])
    assert np.isnan(values).any() and np.isfinite(values[~np.isnan(values)]).all()


def test_loaders_read_csv_and_parquet(tmp_path):
    frame = ett_frame(50)
    frame.write_csv(tmp_path / "e.csv")
    frame.write_parquet(tmp_path / "e.parquet")
    assert load_ett(tmp_path / "e.csv").shape == (50, 8)
    assert load_ett(tmp_path / "e.csv").schema["date"].is_temporal()
    assert load_table(tmp_path / "e.parquet").equals(frame)


def test_bad_data_is_named(tmp_path):
    ett_frame(50).drop("OT").write_csv(tmp_path / "no_ot.csv")
    with pytest.raises(DataError, match=r"lacks columns \['OT'\]"):
        load_ett(tmp_path / "no_ot.csv")
    (tmp_path / "x.txt").write_text("a")
    with pytest.raises(DataError, match="expected a .csv or .parquet"):
        load_table(tmp_path / "x.txt")
    with pytest.raises(DataError, match="no file"):
        load_table(tmp_path / "missing.csv")
    repeated = long_frame(1, 50)
    repeated = pl.concat([repeated, repeated.head(1)]).sort("date")
    with pytest.raises(DataError, match="timestamps repeated"):
        series_frames(repeated, DataConfig(path="-", layout="long", targets=("OT",)), "1h")
    with pytest.raises(DataError, match=r"borders \(8640, 11520, 14400\) need 14400 rows"):
        ForecastDataModule(DataConfig(path="-"), frame=ett_frame(1000)).setup()
    with pytest.raises(DataError, match="'layout' expected"):
        DataConfig(path="-", layout="wide")
    with pytest.raises(DataError, match=r"unknown columns \['nope'\]"):
        series_frames(long_frame(1, 20), DataConfig(path="-", layout="long", targets=("nope",)), "1h")


def test_download_verifies_the_checksum_and_keeps_nothing_on_mismatch(tmp_path):
    source = tmp_path / "src.csv"
    ett_frame(30).write_csv(source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    dest = tmp_path / "out" / "ETTh1.csv"
    with pytest.raises(DataError, match="expected " + ETTH1_SHA256):
        download_ett(dest, url=source.as_uri())
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    assert download_ett(dest, url=source.as_uri(), sha256=digest).read_bytes() == source.read_bytes()


def test_real_etth1_when_present():
    path = Path(REAL_ETTH1)
    if not path.is_file():
        pytest.skip(f"ETTh1.csv is not at {REAL_ETTH1} (it lives beside the repository; see datasets/ETTh1.md)")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == ETTH1_SHA256
    dm = ForecastDataModule(DataConfig(path=str(path), lookback=96, horizon=96))
    dm.setup()
    assert (len(dm.datasets["val"]), len(dm.datasets["test"])) == (2785, 2785)
    assert load_ett(path).height == 17420
