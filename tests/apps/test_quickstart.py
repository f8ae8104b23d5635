"""``gdn2ts quickstart`` end to end on a tiny budget: real data, training, streaming with SQLite state, scoring,
plots; a second run continues where the first stopped; the scaler and the weights see only the training part."""

from __future__ import annotations

import json
import shutil

import polars as pl
import pytest
import torch

from gdn2ts.apps.quickstart import CHANNELS, QuickstartConfig, load_epf, make_irregular, run_quickstart
from gdn2ts.cli import main
from gdn2ts.models.checkpoint import Scaler, load_checkpoint
from gdn2ts.streaming import SQLiteStore

TINY = dict(test_days=3, warmup_hours=24, hidden_size=8, head_dim=4, context=24, batch_size=2, steps=2, horizon=6)


@pytest.fixture(autouse=True)
def one_thread():
    # tiny matrices: a second intra-op thread only adds hand-offs (and stalls badly on a busy machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _forecasts(out):
    return pl.concat([pl.read_parquet(p) for p in sorted((out / "forecasts").glob("part-*.parquet"))]) \
        .sort(["stream", "origin", "step", "channel"])


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "run"
    torch.set_num_threads(1)
    summary = run_quickstart(QuickstartConfig(out=str(out), limit_hours=20, **TINY), quiet=True)
    return out, summary


def test_dataset_is_the_real_one():
    frame = load_epf()
    assert frame.columns == ["stream", "time", *CHANNELS] and frame.height == 32160
    # 2015-01-01 00:00 UTC in hours since the epoch
    assert frame["time"].min() == 16436 * 24.0
    kept, stats = make_irregular(frame, 0.1, 0.05, seed=0)
    assert stats["rows_dropped"] == frame.height - kept.height and 0.08 < stats["rows_dropped"] / frame.height < 0.12
    again, _ = make_irregular(frame, 0.1, 0.05, seed=0)
    assert again.equals(kept)


def test_first_run_trains_streams_and_reports(first_run):
    out, summary = first_run
    for name in ("model.safetensors", "state.db", "summary.json", "forecast.png", "rolling_error.png", "run.json",
                 "training.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "summary.json").read_text())["streaming"] == summary["streaming"]
    s = summary["streaming"]
    assert s["hours_streamed"] == 20 and s["rows_rejected"] == 0 and s["hours_left"] > 0 and not s["resumed"]
    assert summary["training"]["steps"] == 2 and not summary["training"]["reused_checkpoint"]
    errs = {(r["stream"], r["channel"]): r for r in summary["errors"]}
    assert set(errs) == {(s, c) for s in ("BE", "FR") for c in CHANNELS}
    price = errs[("FR", "price")]
    assert price["mae_model_h1"] > 0 and price["mae_naive_day_h1"] > 0 and 0 <= price["coverage"] <= 1
    # the store holds both streams, each at its last streamed timestamp, written by the checkpoint's model
    fc = _forecasts(out)
    store = SQLiteStore(out / "state.db")
    try:
        records = store.get(["BE", "FR"])
    finally:
        store.close()
    for sid in ("BE", "FR"):
        assert records[sid].last_timestamp == fc.filter(pl.col("stream") == sid)["origin"].max()
    # forecasts come in raw units (prices of tens of EUR/MWh, loads of tens of thousands of MW)
    assert fc.filter(pl.col("channel") == "load")["q0.5"].mean() > 1000


def test_scaler_and_training_see_only_the_training_part(first_run):
    out, summary = first_run
    ckpt = load_checkpoint(out / "model.safetensors")
    kept, _ = make_irregular(load_epf(), 0.1, 0.05, seed=0)
    split = summary["split_time_hours"]
    train = kept.filter(pl.col("time") < split)
    expected = Scaler.fit(CHANNELS, torch.tensor(train.select(CHANNELS).fill_null(float("nan")).to_numpy()))
    assert ckpt.scaler == expected
    with_test = Scaler.fit(CHANNELS, torch.tensor(kept.select(CHANNELS).fill_null(float("nan")).to_numpy()))
    assert with_test != expected
    # the held-out part starts right after the split and is the last test_days days
    assert split == load_epf()["time"].max() - TINY["test_days"] * 24 + 1


def test_second_run_continues_where_the_first_stopped(first_run, tmp_path):
    out, _ = first_run
    # an uninterrupted run with the same checkpoint, in another folder
    other = tmp_path / "whole"
    other.mkdir()
    for name in ("model.safetensors", "run.json"):
        shutil.copy(out / name, other / name)
    whole = run_quickstart(QuickstartConfig(out=str(other), **TINY), quiet=True)
    assert whole["training"]["reused_checkpoint"] and whole["streaming"]["hours_left"] == 0
    resumed = run_quickstart(QuickstartConfig(out=str(out), **TINY), quiet=True)
    s = resumed["streaming"]
    # learning continued where it stopped: the same weight version as the uninterrupted run
    assert s["learning"]["calls"] == 2 and whole["streaming"]["learning"]["calls"] == 3
    assert s["learning"]["weight_version"] == whole["streaming"]["learning"]["weight_version"] == 3
    assert s["resumed"] and s["warmup_rows"] == 0 and s["hours_left"] == 0
    assert s["hours_streamed"] == whole["streaming"]["hours_streamed"] - 20
    assert _forecasts(out).equals(_forecasts(other))
    assert resumed["errors"] == whole["errors"]
    assert resumed["training"] == {**first_run[1]["training"], "reused_checkpoint": True}
    # a finished run only reports again
    again = run_quickstart(QuickstartConfig(out=str(out), **TINY), quiet=True)
    assert again["streaming"]["hours_streamed"] == 0 and again["errors"] == whole["errors"]


def test_other_configuration_is_refused_and_fresh_starts_over(first_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(first_run[0], out)
    with pytest.raises(ValueError, match="different configuration"):
        run_quickstart(QuickstartConfig(out=str(out), **{**TINY, "seed": 1}), quiet=True)
    summary = run_quickstart(QuickstartConfig(out=str(out), fresh=True, limit_hours=3, **{**TINY, "seed": 1}),
                             quiet=True)
    assert not summary["training"]["reused_checkpoint"] and not summary["streaming"]["resumed"]
    assert _forecasts(out)["origin"].n_unique() == 3


def test_audit_of_the_next_held_out_hours_and_online_learning(first_run):
    out, summary = first_run
    # the audit ran read-only before streaming (the streamed hours were applied after it, none rejected)
    assert summary["audit"].startswith("eviction audit of the next 72 held-out hours (")
    assert "layer 0: decay removes" in summary["audit"] and "2 tags" in summary["audit"]
    assert (out / "audit.png").stat().st_size > 10_000
    learning = summary["streaming"]["learning"]
    # one learn call per block of 24 held-out hours: the first of 20 hours streamed
    assert learning["calls"] == 1 and learning["steps"] == 1 and learning["weight_version"] == 1
    assert learning["targets"] > 0 and learning["mean_loss"] > 0
    store = SQLiteStore(out / "state.db")
    try:
        assert store.get_blob("model") is not None
    finally:
        store.close()


def test_cli_quickstart(tmp_path, capsys):
    out = tmp_path / "cli"
    main(["quickstart", "--out", str(out), "--steps", "1", "--test_days", "1", "--hidden_size", "8",
          "--limit_hours", "2"])
    text = capsys.readouterr().out
    assert "EPF_FR_BE" in text and "held-out MAE" in text and "naive" in text and "streamed 2 held-out hours" in text
    with pytest.raises(SystemExit, match="different configuration"):
        main(["quickstart", "--out", str(out), "--steps", "2", "--test_days", "1", "--hidden_size", "8",
              "--quiet", "true"])
    with pytest.raises(SystemExit, match="'drop' expected a fraction"):
        main(["quickstart", "--out", str(out), "--drop", "1.5", "--quiet", "true"])
