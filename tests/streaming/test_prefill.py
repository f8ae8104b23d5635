"""Prefill, then decode: an observe call with many rows per stream runs the encoder's masked parallel forward, equal
to stepping every round (to float rounding), and a journal replay takes the same path as the call, bit for bit."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from gdn2ts.models import EncoderConfig, StreamEncoder
from gdn2ts.streaming import CommitPolicy, MemoryStore, OnlineRunner, SQLiteStore
from gdn2ts.streaming.history import append_history, history_template
from gdn2ts.streaming.learn import LearnConfig
from gdn2ts.streaming.rounds import (
    PrefillRule,
    append_history_rows,
    schedule,
    stepped,
    welford,
    welford_rows,
)

from tolerances import assert_close

CHANNELS = ["a", "b"]
# The prefilled and the stepped path (fp32 model) agree within the suite's fp32 tolerance (tests/tolerances.py:
# relative RMS error 1e-4, largest error 1e-3 of the largest magnitude): the chunked form of the recurrence adds in
# another order than the step. Measured over 150 rows: 3e-7 relative at most.


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def encoder(n_cov=0, seed=0):
    torch.manual_seed(seed)
    return StreamEncoder(EncoderConfig(n_channels=2, n_covariates=n_cov, hidden_size=16, n_layers=2, num_heads=2,
                                       head_dim=8, horizon=3))


def backfill(rows: dict[str, int], seed=0, t0: dict[str, float] | None = None, covariates=False) -> pl.DataFrame:
    """``rows[sid]`` rows per stream at irregular times, 25% of values missing and some rows with nothing observed,
    in shuffled order (observe sorts them)."""
    rng = np.random.default_rng(seed)
    out = []
    for sid, n in rows.items():
        times = (0.0 if t0 is None else t0[sid]) + np.cumsum(rng.uniform(0.2, 2.0, n))
        values = rng.standard_normal((n, 2))
        values[rng.random((n, 2)) < 0.25] = np.nan
        values[rng.random(n) < 0.05] = np.nan
        frame = {"stream": [sid] * n, "time": times, "a": values[:, 0], "b": values[:, 1]}
        if covariates:
            frame["hour"] = np.sin(times)
        out.append(pl.DataFrame(frame))
    frame = pl.concat(out).with_columns(pl.col("a", "b").fill_nan(None))
    return frame.sample(fraction=1.0, shuffle=True, seed=seed)


def records(runner, ids):
    runner.flush()
    return {sid: (r.steps, r.tensors) for sid, r in runner.store.get(ids).items()}


def copy_store(src, dst) -> None:
    """What a process that stopped without closing its runner left: the database, its log and the records' slab."""
    for suffix in ("", "-wal", "-slab"):
        if Path(f"{src}{suffix}").exists():
            shutil.copyfile(f"{src}{suffix}", f"{dst}{suffix}")


def quantiles(forecast: pl.DataFrame) -> torch.Tensor:
    return torch.from_numpy(forecast.select(pl.selectors.starts_with("q")).to_numpy())


def count_forwards(runner):
    calls = []
    forward = runner.encoder.forward

    def counted(*args, **kwargs):
        calls.append(args[0].shape[:2])
        return forward(*args, **kwargs)

    runner.encoder.forward = counted
    return calls


# ------------------------------------------------------------------------------------------------------------------


def test_schedule_covers_every_row_once_and_bounds_padding():
    rng = np.random.default_rng(0)
    rule = PrefillRule()
    cases = [np.array([5]), np.array([3, 3, 1]), np.array([1] * 200_000), np.full(100, 10_000),
             np.array([10_000] + [1] * 99_999), np.full(300, 700)]
    for _ in range(30):
        counts = rng.integers(1, 400, size=int(rng.integers(1, 60)))
        cases.append(np.bincount(counts)[1:][::-1].cumsum()[::-1])  # sizes of streams with these row counts
    prefilled = 0
    for sizes in cases:
        covered = np.zeros(int(sizes.sum()), dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        last = (0, 0)
        for r0, r1, s0, s1, prefill in schedule(sizes):
            assert (r0, s0) >= last and r1 > r0 and s1 > s0
            last = (r0, s0)
            if prefill:
                prefilled += 1
                assert (s1 - s0) * (r1 - r0) <= max(rule.cells, r1 - r0)
                # padding at most half of the run a piece comes from
                assert (2 * sizes[r0:r1] >= sizes[r0]).all()
            else:
                assert r1 == r0 + 1 and s0 == 0 and s1 == sizes[r0]
            for r in range(r0, r1):
                n = min(int(sizes[r]), s1) - s0
                covered[starts[r] + s0:starts[r] + s0 + max(n, 0)] += 1
        assert (covered == 1).all()
    assert prefilled > 30
    # the cost rule: one stream's 100,000 rows are prefilled, and so is the long tail after one wide round; 10,000
    # streams of 100 rows each step (their batched steps are as cheap per row); one round always steps
    assert all(p[4] for p in schedule(np.ones(100_000, int)))
    assert [p[4] for p in schedule(np.array([10_000] + [1] * 99_999))][:1] == [False]
    assert all(p[4] for p in schedule(np.array([10_000] + [1] * 99_999))[1:])
    assert not any(p[4] for p in schedule(np.full(100, 10_000)))
    assert schedule(np.array([4096])) == [(0, 1, 0, 4096, False)]
    assert not any(p[4] for p in schedule(np.full(rule.min_rounds - 1, 7)))
    assert all(p[4] for p in schedule(np.full(rule.min_rounds, 7)))
    # with a free forward every run of enough rounds prefills; with a free round none does
    assert all(p[4] for p in schedule(np.full(100, 10_000), PrefillRule(forward_us=0, cell_us=0)))
    assert not any(p[4] for p in schedule(np.ones(500, int), PrefillRule(round_us=0)))


def test_block_statistics_and_histories_equal_row_by_row():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 37, 3, generator=gen, dtype=torch.float64) * 3 + 10
    x[torch.rand(5, 37, 3, generator=gen) < 0.3] = float("nan")
    x[1] = float("nan")  # a stream with nothing observed
    x[2, 5:30] = float("nan")
    times = torch.cumsum(torch.rand(5, 37, generator=gen, dtype=torch.float64), 1)
    covs = torch.randn(5, 37, 2, generator=gen, dtype=torch.float64)
    stats = {"stats.count": torch.tensor([[0.0] * 3, [4.0] * 3, [1.0] * 3, [9.0] * 3, [2.0] * 3],
                                         dtype=torch.float64)}
    stats["stats.mean"] = torch.randn(5, 3, generator=gen, dtype=torch.float64) * (stats["stats.count"] > 0)
    stats["stats.m2"] = torch.rand(5, 3, generator=gen, dtype=torch.float64) * (stats["stats.count"] > 1)
    seq = dict(stats)
    for t in range(37):
        seq = welford(seq, x[:, t])
    block = welford_rows(stats, x)
    torch.testing.assert_close(block["stats.count"], seq["stats.count"], rtol=0, atol=0)
    for k in ("stats.mean", "stats.m2"):
        torch.testing.assert_close(block[k], seq[k], rtol=1e-12, atol=1e-12)
    for history in (4, 50):
        hist = {k: v.expand(5, *v.shape[1:]).clone() for k, v in history_template(
            LearnConfig(history=history, context=2, min_context=0), 3, 2, "cpu").items() if k.startswith("hist.")}
        seq = hist
        for t in range(37):
            seq = append_history(seq, times[:, t], x[:, t], covs[:, t])
        got = append_history_rows(hist, times, x, covs)
        for k in seq:
            torch.testing.assert_close(got[k], seq[k], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("n_cov", [0, 1])
def test_prefill_equals_stepping(n_cov):
    rows = {"long": 150, "mid": 90, "short": 70, "one": 1, "few": 5}
    covariates = ["hour"] if n_cov else []
    first = backfill({"long": 3, "mid": 2}, seed=1, covariates=bool(n_cov))
    t0 = {sid: 100.0 for sid in rows}
    batch = backfill(rows, seed=2, t0=t0, covariates=bool(n_cov))
    results = []
    for prefill in (True, False):
        runner = OnlineRunner(encoder(n_cov), MemoryStore(), CHANNELS, covariates)
        if not prefill:
            runner.stepper.plan = stepped  # every round a step: the path before prefill
        forwards = count_forwards(runner)
        runner.observe(first)  # states that do not start empty
        result = runner.observe(batch)
        assert result.accepted == batch.height and not result.rejected
        assert (len(forwards) > 0) == prefill
        ids = list(rows)
        results.append((records(runner, ids), runner.forecast(ids), runner.stats(ids), runner.info(ids)))
    (rec_p, fc_p, st_p, info_p), (rec_s, fc_s, st_s, info_s) = results
    assert info_p.equals(info_s)
    for sid in rows:
        assert rec_p[sid][0] == rec_s[sid][0] == (rows[sid] + (3 if sid == "long" else 2 if sid == "mid" else 0))
        for k, t in rec_s[sid][1].items():
            if k in ("last_time", "stats.count"):
                assert torch.equal(rec_p[sid][1][k], t)
            else:
                assert_close(f"{sid} {k}", rec_p[sid][1][k], t, torch.float32)
    assert_close("forecast", quantiles(fc_p), quantiles(fc_s), torch.float32)
    np.testing.assert_allclose(st_p["mean"].to_numpy(), st_s["mean"].to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(st_p["var"].to_numpy(), st_s["var"].to_numpy(), rtol=1e-10)
    # the states moved: equal paths, not two no-ops
    assert not torch.allclose(rec_p["long"][1]["layer0.recurrent"], torch.zeros(()))


def test_prefill_with_learning_keeps_the_same_histories():
    learning = LearnConfig(history=64, context=8, min_context=2)
    batch = backfill({"x": 100, "y": 40, "z": 33}, seed=3)
    got = []
    for prefill in (True, False):
        runner = OnlineRunner(encoder(), MemoryStore(), CHANNELS, learning=learning)
        if not prefill:
            runner.stepper.plan = stepped
        runner.observe(batch)
        got.append(records(runner, ["x", "y", "z"]))
    for sid in ("x", "y", "z"):
        for k, t in got[1][sid][1].items():
            if k.startswith("hist.") or k in ("learn.through", "last_time", "stats.count"):
                assert torch.equal(got[0][sid][1][k].nan_to_num(7.0), t.nan_to_num(7.0)), (sid, k)
            else:
                assert_close(f"{sid} {k}", got[0][sid][1][k], t, torch.float32)


def test_a_prefill_piece_with_nothing_observed_changes_nothing():
    runner = OnlineRunner(encoder(), MemoryStore(), CHANNELS)
    runner.observe({"stream": ["q"], "time": [0.5], "a": [1.0], "b": [2.0]})
    before = records(runner, ["q"])["q"]
    empty = pl.DataFrame({"stream": ["q"] * 20, "time": np.arange(1.0, 21.0), "a": [None] * 20, "b": [None] * 20},
                         schema={"stream": pl.String, "time": pl.Float64, "a": pl.Float64, "b": pl.Float64})
    assert runner.observe(empty).accepted == 20
    steps, after = records(runner, ["q"])["q"]
    assert steps == 21 and all(torch.equal(after[k], before[1][k]) for k in after)


def test_replay_of_prefilled_calls_is_bit_identical(tmp_path):
    """A process that stops without closing: the next runner replays its journal (prefilled and stepped calls,
    streams evicted after a call riding along from other states) and gets the very same states."""
    db = tmp_path / "s.db"
    ids = [f"s{i}" for i in range(6)]
    calls = [backfill({sid: 30 + 7 * i for i, sid in enumerate(ids[:4])}, seed=10),
             backfill({sid: 2 for sid in ids[2:]}, seed=11, t0=dict.fromkeys(ids, 500.0)),
             backfill({sid: 40 for sid in ids[3:]}, seed=12, t0=dict.fromkeys(ids, 600.0))]
    runner = OnlineRunner(encoder(), SQLiteStore(db), CHANNELS, capacity=4,
                          policy=CommitPolicy(snapshot_every=1000))
    forwards = count_forwards(runner)
    for part in calls:
        runner.observe(part)
    assert forwards  # the first and last calls were prefilled
    copy = tmp_path / "copy.db"
    copy_store(db, copy)
    want = records(runner, ids)
    runner.close()
    replayed = OnlineRunner(encoder(), SQLiteStore(copy), CHANNELS, capacity=6)
    assert replayed.seq == 3
    got = records(replayed, ids)
    replayed.close()
    for sid in ids:
        assert got[sid][0] == want[sid][0]
        for k, t in want[sid][1].items():
            assert torch.equal(got[sid][1][k], t), (sid, k)
