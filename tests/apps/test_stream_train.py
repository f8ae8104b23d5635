"""gdn2ts stream train: a user's irregular long-format file to a checkpoint the runner and the command use; every
recipe of tasks/streaming loads into its typed config."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from gdn2ts.apps.quickstart import QuickstartConfig
from gdn2ts.apps.train_recipe import TrainRecipe, load_recipe
from gdn2ts.cli import main, quickstart
from gdn2ts.models.checkpoint import load_checkpoint
from gdn2ts.models.units import TimeSpec
from gdn2ts.streaming import MemoryStore, OnlineRunner
from gdn2ts.streaming.fit_data import infer_time_spec

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "tasks" / "streaming").glob("*.yaml"))
TINY = str(ROOT / "tasks" / "streaming" / "tiny.yaml")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def irregular(n_hours=400, seed=0) -> pl.DataFrame:
    """Three sensors, about hourly with jitter and gaps, some values missing, naive date-time strings."""
    rng = np.random.default_rng(seed)
    rows = []
    for s, level in (("north", 100.0), ("south", 2000.0), ("east", 5.0)):
        t = np.arange(n_hours) + rng.uniform(-0.2, 0.2, n_hours)
        keep = rng.random(n_hours) > 0.15
        keep[150:170] = False  # an outage
        for h in t[keep]:
            daily = np.sin(2 * np.pi * h / 24)
            flow = level * (1 + 0.5 * daily) + rng.normal(0, level * 0.05)
            temp = 10 + 5 * daily if rng.random() > 0.2 else None
            stamp = np.datetime64("2023-01-01T00:00") + np.timedelta64(int(h * 3600), "s")
            rows.append({"sensor": s, "at": str(stamp).replace("T", " "), "flow": flow, "temp": temp})
    return pl.DataFrame(rows)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_streaming_recipe_loads(path):
    if path.name == "quickstart.yaml":
        recipe = QuickstartConfig.from_yaml(path)
        # `gdn2ts quickstart` with no arguments runs exactly the recipe
        defaults = {k: p.default for k, p in inspect.signature(quickstart).parameters.items() if k != "quiet"}
        assert recipe == QuickstartConfig() == QuickstartConfig(**defaults)
    else:
        recipe = load_recipe(path)
        assert isinstance(recipe, TrainRecipe)
        if path.name == "train.yaml":
            # `gdn2ts stream train` with no --config trains with train.yaml's settings
            from gdn2ts.apps.stream_commands import stream_train

            defaults = {k: p.default for k, p in inspect.signature(stream_train).parameters.items()}
            assert recipe == TrainRecipe(defaults["data"], defaults["model"], defaults["train"], defaults["threads"])
    assert {p.name for p in RECIPES} >= {"quickstart.yaml", "train.yaml", "tiny.yaml"}


def test_recipe_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_sise: 8\n")
    with pytest.raises(ValueError, match="hidden_sise"):
        load_recipe(bad)
    bad.write_text("data:\n  scaling: per_sensor\n")
    with pytest.raises(ValueError, match="'scaling' expected 'per_stream' or 'global'"):
        load_recipe(bad)
    with pytest.raises(ValueError, match="does not accept option 'data.scaling'"):
        QuickstartConfig.from_yaml(bad)


def test_train_writes_a_checkpoint_that_streams_in_the_users_units(tmp_path, capsys):
    data = irregular()
    src = tmp_path / "sensors.csv"
    data.write_csv(src)
    out = tmp_path / "model"
    main(["stream", "train", "--input", str(src), "--out", str(out), "--config", TINY, "--id_column", "sensor",
          "--time_column", "at", "--channels", "[flow, temp]", "--time_zone", "Europe/Vienna", "--quiet", "true"])
    ckpt = load_checkpoint(out / "model.safetensors")
    assert ckpt.time == TimeSpec("datetime", 3600.0, time_zone="Europe/Vienna")
    assert ckpt.columns == ("sensor", "at") and ckpt.scaling == "per_stream"
    assert ckpt.covariates == ("hour_sin", "hour_cos", "dow_sin", "dow_cos")
    # per-stream scaling from each stream's training rows only (its held-out tail is not read)
    times = pl.Series(data["at"]).str.to_datetime()
    tail_start = {}
    for s in ("north", "south", "east"):
        t = times.filter(data["sensor"] == s)
        tail_start[s] = t.max() - 0.1 * (t.max() - t.min())
    north = data.filter((pl.col("sensor") == "north") & (times < tail_start["north"]))
    loc, scale = ckpt.stream_scales.of("north")
    assert loc[0] == pytest.approx(north["flow"].mean(), rel=1e-9)
    assert scale[0] == pytest.approx(north["flow"].std(ddof=0), rel=1e-9)
    report = json.loads((out / "report.json").read_text())
    assert report["scaling"] == "per_stream" and report["holdout_rows"] > 0
    assert (out / "validation.png").stat().st_size > 10_000
    flow = next(r for r in report["validation"] if r["channel"] == "flow")
    assert flow["all"]["targets"] > 0 and flow["all"]["mae"] > 0 and flow["all"]["naive_mae"] > 0
    assert ckpt.info["validation"] == report["validation"] and ckpt.limits.max_gap >= 300
    # the checkpoint streams: the tail through the runner, in the user's units and timestamp type
    runner = OnlineRunner.from_checkpoint(ckpt, MemoryStore())
    assert runner.id_column == "sensor" and runner.time_column == "at"
    tail = data.group_by("sensor", maintain_order=True).tail(20)
    assert runner.observe(tail).accepted == 60
    fc = runner.forecast(["south"])
    assert fc.schema["origin"] == pl.Datetime("us", "Europe/Vienna")
    assert fc.filter(pl.col("channel") == "flow")["q0.5"].mean() > 100  # south's flows are in the thousands


@pytest.mark.parametrize("values, kwargs, want", [
    (["2024-01-01", "2024-01-02", "2024-01-04"], {}, TimeSpec("date", 86400.0)),
    (["2024-01-01 00:00", "2024-01-02 00:00", "2024-01-04 00:00"], {}, TimeSpec("datetime", 86400.0)),
    ([0, 900, 1800, 3600], {"number_unit": "s"}, TimeSpec("number", 900.0, number_unit="s")),
    (["2024-01-01T00:00:00Z", "2024-01-01T00:05:00Z"], {}, TimeSpec("datetime", 300.0, time_zone="UTC")),
    (["2024-01-01 00:00", "2024-01-01 00:05"], {"time_unit": "1h", "time_zone": "Asia/Kolkata"},
     TimeSpec("datetime", 3600.0, time_zone="Asia/Kolkata")),
])
def test_the_time_spec_comes_from_the_data(values, kwargs, want):
    assert infer_time_spec(pl.Series("t", values), pl.Series(["a"] * len(values)), **kwargs) == want


def test_dates_and_unstated_numbers(tmp_path):
    import datetime as dt

    dates = pl.Series("t", [dt.date(2024, 1, d) for d in (1, 2, 5)])
    assert infer_time_spec(dates, pl.Series(["a"] * 3)) == TimeSpec("date", 86400.0)
    with pytest.raises(ValueError, match="holds numbers: state what they count"):
        infer_time_spec(pl.Series("t", [1, 2, 3]), pl.Series(["a"] * 3))
    src = tmp_path / "numbers.csv"
    pl.DataFrame({"stream": ["a"] * 3, "time": [1, 2, 3], "x": [1.0, 2.0, 3.0]}).write_csv(src)
    with pytest.raises(SystemExit, match="gdn2ts stream train: .*--time_numbers"):
        main(["stream", "train", "--input", str(src), "--out", str(tmp_path / "m"), "--config", TINY])


def test_global_scaling_and_daily_dates(tmp_path):
    rng = np.random.default_rng(1)
    days = pl.date_range(pl.date(2020, 1, 1), pl.date(2020, 12, 31), eager=True)
    keep = rng.random(days.len()) > 0.1
    frame = pl.DataFrame({"stream": "x", "time": days.filter(pl.Series(keep)),
                          "pm25": rng.gamma(3.0, 10.0, int(keep.sum()))})
    src = tmp_path / "daily.parquet"
    frame.write_parquet(src)
    main(["stream", "train", "--input", str(src), "--out", str(tmp_path / "m"), "--config", TINY,
          "--data.scaling", "global", "--quiet", "true"])
    ckpt = load_checkpoint(tmp_path / "m" / "model.safetensors")
    assert ckpt.time == TimeSpec("date", 86400.0) and ckpt.scaling == "global"
    assert ckpt.covariates == ("dow_sin", "dow_cos")  # no hour of day for daily data
    assert json.loads((tmp_path / "m" / "report.json").read_text())["season_rows"] == 7
    fc = OnlineRunner.from_checkpoint(ckpt, MemoryStore())
    fc.observe(frame.tail(5))
    assert fc.forecast(["x"]).schema["target_time"] == pl.Date
