"""The delayed-feedback online protocol on a tiny series (seconds): split sizes, no update or forecast reads a row not
yet observed (instrumented, and a leaky method is caught), selection sees validation only, cumulative metrics as
defined, the command's record and plot; the series catalog keeps the public URLs and downloads nothing here."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from gdn2ts.apps.online_bench import EncoderSettings, ForecasterSettings, ProtocolSettings, run_online
from gdn2ts.apps.online_methods import SeasonalNaive, WindowModel
from gdn2ts.apps.online_protocol import Feed, LeakError, Ledger, Split, run_phase, select
from gdn2ts.forecasting.catalog import SOURCES, download_series, load_series, online_borders
from gdn2ts.forecasting.data import ETT_CHANNELS, DataError
from gdn2ts.models.forecaster import ForecasterConfig, GDN2Forecaster

BORDERS, H, L = (160, 200, 400), 4, 16


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ett_file(path: Path, n: int = 400, seed: int = 0) -> Path:
    """An ETT-layout CSV: a daily cycle per channel, a slow drift (the level moves after training) and noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    cols = {c: np.sin(2 * np.pi * t / 24 + i) + 0.01 * t + 0.1 * rng.standard_normal(n)
            for i, c in enumerate(ETT_CHANNELS)}
    pl.DataFrame({"date": [dt.datetime(2016, 7, 1) + dt.timedelta(hours=int(i)) for i in t], **cols}).write_csv(path)
    return path


TINY = dict(protocol=dict(borders=BORDERS, horizons=(H,), lookback=L, lr_grid=(1e-3, 1e-2), strict=False),
            forecaster=ForecasterSettings(max_epochs=1, patience=1),
            encoder=EncoderSettings(hidden_size=8, n_layers=1, num_heads=1, head_dim=8, steps=3, context=32,
                                    batch_size=4, learn_context=16, learn_min_context=4))


def test_split_sizes_of_the_protocol():
    # 20 : 5 : 75 of the 20 months of ETTh1 the benchmarks use
    b0, b1, b2 = online_borders("ETTh1")
    assert (b0, b1 - b0, b2 - b1) == (2880, 720, 10800) and b0 / b2 == 0.2 and (b2 - b1) / b2 == 0.75
    assert online_borders("ETTm2") == (11520, 14400, 57600)
    for h in (24, 48, 96):
        s = Split(17420, (b0, b1, b2), h)
        assert len(s.val_origins) == b1 - b0 - h + 1 and len(s.test_origins) == b2 - b1 - h + 1
        # validation targets start at b0 and end before b1; test targets start at b1 and end at b2 - 1
        assert s.val_origins[0] + 1 == b0 and s.val_origins[-1] + h == b1 - 1
        assert s.test_origins[0] + 1 == b1 and s.test_origins[-1] + h == b2 - 1
        assert s.origins("select").stop == s.val_origins.stop and s.limit("select") == b1
    with pytest.raises(ValueError, match="horizon"):
        Split(400, (160, 162, 400), 4)


class PeekingNaive(SeasonalNaive):
    """Forecasts with the row after its origin: the feed must refuse it."""

    def forecast(self, feed, now):
        feed.rows(now, now + 2)
        return super().forecast(feed, now)


class EarlyOGD(WindowModel):
    """Learns from the window at origin now - H + 1, one of whose targets is not yet observed."""

    def update(self, feed, now):
        return super().update(feed, now + 1)


class ClaimsUnmatured(SeasonalNaive):
    """Reports an update from a window whose horizon has not passed."""

    def update(self, feed, now):
        return now - H + 1, now - H + 1


def test_leaks_are_caught(tmp_path):
    values = np.random.default_rng(0).standard_normal((400, 2))
    split = Split(400, BORDERS, H)
    with pytest.raises(LeakError, match="not yet observed"):
        run_phase(PeekingNaive(24, H), values, split)
    torch.manual_seed(0)
    net = GDN2Forecaster(ForecasterConfig(n_channels=2, lookback=L, horizon=H, hidden_size=8, head_dim=4))
    with pytest.raises(LeakError, match="not yet observed"):
        run_phase(EarlyOGD(net, L, H, (0.1, 0.5, 0.9), lr=1e-3), values, split)
    with pytest.raises(LeakError, match="not yet observed"):
        run_phase(ClaimsUnmatured(24, H), values, split)
    # the honest versions run, and their reads never pass the present
    ok = run_phase(WindowModel(net, L, H, (0.1, 0.5, 0.9), lr=1e-3), values, split)
    assert ok.ledger.max_read_lag == 0 and all(u.last + H == u.now for u in ok.ledger.updates)
    # a feed never moves past its limit or back in time
    feed = Feed(values, limit=200, ledger=Ledger(H))
    feed.advance(10)
    for bad in (9, 200):
        with pytest.raises(LeakError):
            feed.advance(bad)


class Spy(SeasonalNaive):
    def start(self, feed):
        self.seen = feed.now

    def observe(self, feed, now):
        self.seen = max(self.seen, now)


def test_a_selection_run_stops_at_validation():
    values = np.random.default_rng(1).standard_normal((400, 3))
    split = Split(400, BORDERS, H)
    spy = Spy(24, H)
    r = run_phase(spy, values, split, "select")
    assert r.test is None and r.val.forecasts == len(split.val_origins) and spy.seen == BORDERS[1] - H - 1
    # select keeps the first of the lowest validation MSE; a period of 24 fits this noise no better than 25
    best, table = select(lambda p: SeasonalNaive(p, H), (25, 24, 1), values, split)
    assert best == min(table, key=lambda t: t["val_mse"])["value"] and len(table) == 3


def test_seasonal_naive_repeats_the_last_period():
    values = np.arange(400.0)[:, None] % 24
    r = run_phase(SeasonalNaive(24, 30), values, Split(400, (160, 230, 400), 30), keep_forecasts=True)
    assert r.test.mse == 0.0 and r.val.mse == 0.0
    f = r.forecasts[0, :, 0]
    o = BORDERS[0] - 1  # the first origin
    assert f.tolist() == [values[o - 24 + 1 + k % 24, 0] for k in range(30)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    path = ett_file(tmp_path_factory.mktemp("online") / "tiny_ett.csv")
    out = path.parent / "online.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rec = run_online(ProtocolSettings(data=str(path), **TINY["protocol"]), TINY["forecaster"], TINY["encoder"],
                         json_path=str(out), quiet=True, keep_forecasts=True)
    finally:
        torch.set_num_threads(threads)
    return path, out, rec


def test_harness_invariants_on_a_tiny_series(tiny_run):
    path, out, rec = tiny_run
    raw = pl.read_csv(path).select(ETT_CHANNELS).to_numpy()
    # scaling statistics from the train rows only
    assert rec["scaler"]["fit_rows"] == [0, BORDERS[0]]
    np.testing.assert_allclose(rec["scaler"]["mean"], raw[:BORDERS[0]].mean(0), rtol=1e-10)
    np.testing.assert_allclose(rec["scaler"]["std"], raw[:BORDERS[0]].std(0), rtol=1e-10)
    hr = rec["horizons"][str(H)]
    split = Split(400, BORDERS, H)
    assert hr["val_forecasts"] == len(split.val_origins) == 37 and hr["test_forecasts"] == len(split.test_origins)
    values, origins = rec["_values"], split.origins("test")
    test_at = [origins.index(o) for o in split.test_origins]
    for name, m in hr["methods"].items():
        # no read after the present, no update before its horizon was observed
        assert m["max_read_lag"] <= 0, name
        assert m["max_update_lag"] is None or m["max_update_lag"] <= 0, name
        # cumulative metrics as defined: over every test forecast, step and channel
        f = rec["_forecasts"][(H, name)][test_at]
        y = np.stack([values[o + 1:o + 1 + H] for o in split.test_origins])
        assert m["test"]["mse"] == pytest.approx(float(((f - y) ** 2).mean()), rel=1e-9)
        assert m["test"]["mae"] == pytest.approx(float(np.abs(f - y).mean()), rel=1e-9)
        assert m["test"]["cumulative_mse"][-1] == pytest.approx(m["test"]["mse"], rel=1e-12)
        np.testing.assert_allclose(m["test"]["step_mse"], ((f - y) ** 2).mean(axis=(0, 2)), rtol=1e-9)
        assert m["test"]["forecasts"] == len(split.test_origins) and m["val"]["forecasts"] == len(split.val_origins)
    # learning methods update at every origin from the window that has just matured (or, for the runner, before)
    assert hr["methods"]["forecaster_ogd"]["updates"] == len(origins)
    assert hr["methods"]["forecaster_ogd"]["max_update_lag"] == 0
    assert hr["methods"]["runner_learn"]["updates"] > 0 and hr["methods"]["runner_frozen"]["updates"] == 0
    for name in ("forecaster_ogd", "runner_learn"):
        sel = hr["selection"][name]
        best = min(sel["candidates"], key=lambda c: c["val_mse"])
        assert sel["lr"] == best["value"]
        # the test run's validation part is the selection run of the chosen rate, forecast for forecast
        assert hr["methods"][name]["val"]["mse"] == pytest.approx(best["val_mse"], rel=1e-9)
    # learning moved the forecasts; frozen weights stayed as fit
    assert not np.allclose(rec["_forecasts"][(H, "forecaster_ogd")], rec["_forecasts"][(H, "forecaster_frozen")])
    # the record on disk is strict JSON with the same figures
    disk = json.loads(out.read_text())
    assert disk["horizons"][str(H)]["methods"]["runner_learn"]["test"]["mse"] == \
        hr["methods"]["runner_learn"]["test"]["mse"]
    assert disk["environment"]["cpu"] and disk["date"] and disk["selection_rule"]
    # the report: every method tabulated, paired daily differences with their intervals
    from gdn2ts.apps.online_report import differences_table, markdown_table

    assert markdown_table([disk]).count("\n") == 1 + len(hr["methods"])
    diffs = differences_table([disk]).splitlines()[2:]
    assert len(diffs) == 5 and all("[" in line for line in diffs)


def test_command_writes_record_and_plot(tmp_path):
    from gdn2ts.cli import main

    path = ett_file(tmp_path / "tiny_ett.csv")
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    main(["bench", "online", "--protocol.data", str(path), "--protocol.borders", "[160, 200, 400]",
          "--protocol.horizons", "[4, 8]", "--protocol.lookback", "16", "--protocol.methods", "[seasonal_naive]",
          "--protocol.strict", "false", "--json", str(out), "--plot", str(png), "--quiet", "true"])
    rec = json.loads(out.read_text())
    assert sorted(rec["horizons"]) == ["4", "8"] and rec["command"].startswith("gdn2ts bench online")
    assert png.stat().st_size > 10_000


def test_catalog_keeps_public_urls_and_downloads_only_when_asked(tmp_path, monkeypatch):
    for name in ("ETTh2", "ETTm1", "ETTm2", "Weather", "ECL", "Traffic"):
        assert SOURCES[name].url.startswith("https://") and SOURCES[name].url.endswith(".csv")
    calls = []

    def fake_retrieve(url, dest):
        calls.append(url)
        ett_file(Path(dest), n=SOURCES["ETTh2"].rows if "ETTh2" in url else 50)

    monkeypatch.setattr("urllib.request.urlretrieve", fake_retrieve)
    with pytest.raises(DataError, match="download=True"):
        load_series("ETTh2", tmp_path / "ETTh2.csv")
    assert calls == []
    # a file of the wrong length is refused and not kept
    with pytest.raises(DataError, match="69680 rows of the published ETTm1, got 50"):
        download_series("ETTm1", tmp_path / "ETTm1.csv")
    assert not (tmp_path / "ETTm1.csv").exists() and not list(tmp_path.glob("*.part"))
    frame = load_series("ETTh2", tmp_path / "ETTh2.csv", download=True)
    assert calls[-1] == SOURCES["ETTh2"].url and frame.columns == ["date", *ETT_CHANNELS] and frame.height == 17420
