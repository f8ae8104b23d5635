"""Online learning in the runner: only matured targets, inputs before them, each position once; restart == an
uninterrupted run (weights and forecasts); learned weights tied to the model lineage; failed commits change
nothing; river-style conveniences; read-only audits."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch

from gdn2ts.models import EncoderConfig, StreamEncoder
from gdn2ts.streaming import FingerprintMismatchError, MemoryStore, OnlineRunner, SQLiteStore
from gdn2ts.streaming.history import plan_windows
from gdn2ts.streaming.learn import LearnConfig, decode_learned
from gdn2ts.streaming.runner import UnknownStreamError
from gdn2ts.streaming.train import pinball_loss

CHANNELS = ["load", "temp"]
H = 3
LEARN = LearnConfig(history=16, context=10, min_context=2, lr=1e-3, target_tolerance=0.0)


@pytest.fixture(autouse=True)
def one_thread():
    # tiny matrices: a second intra-op thread only adds hand-offs (and stalls badly on a busy machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def encoder(seed=0):
    torch.manual_seed(seed)
    return StreamEncoder(EncoderConfig(n_channels=2, hidden_size=16, n_layers=2, num_heads=2, head_dim=8,
                                       horizon=H)).double()


def grid_rows(stream, times, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for t in times:
        load, temp = rng.standard_normal(2)
        rows.append({"stream": stream, "time": float(t), "load": float(load),
                     "temp": None if rng.random() < 0.2 else float(temp)})
    return rows


def weights(enc):
    return {k: v.detach().clone() for k, v in enc.state_dict().items()}


def same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_learn_scores_only_matured_targets_from_inputs_before_them():
    rows = grid_rows("a", range(1, 21))
    runner = OnlineRunner(encoder(), MemoryStore(), CHANNELS, learning=LEARN)
    runner.observe(rows)
    result = runner.learn(["a"])
    assert result.steps == 1 and result.windows == 1 and result.version == 1 == runner.version
    # by hand: with the last observation at 20, positions up to 17 have matured (17 + 3 <= 20); the window is the
    # last 10 rows up to 17 (8 .. 17), from a zero state; positions with 2 or more rows before them are scored
    # against the rows 1 .. 3 hours later
    ref = encoder()
    frame = pl.DataFrame(rows).fill_null(float("nan"))
    vals = torch.tensor(frame.select(CHANNELS).to_numpy())
    window = slice(7, 17)
    out = ref(vals[window][None], torch.arange(8.0, 18.0, dtype=torch.float64)[None])
    targets = torch.stack([vals[7 + p + 1:7 + p + 1 + H] for p in range(10)])[None]  # [1, 10, H, C]
    valid = ~torch.isnan(targets)
    valid[:, :2] = False
    loss = pinball_loss(out["forecast"], targets, ref.config.quantiles, valid)
    opt = torch.optim.AdamW(ref.parameters(), lr=LEARN.lr, weight_decay=LEARN.weight_decay)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), LEARN.grad_clip)
    opt.step()
    assert result.targets == int(valid.sum()) and result.loss == pytest.approx(float(loss.detach()), rel=1e-12)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(runner.encoder.state_dict()[k], v, atol=1e-12, rtol=1e-10)
    # a target value observed later than every scored horizon is never read: the same update without it
    other = OnlineRunner(encoder(), MemoryStore(), CHANNELS, learning=LEARN)
    changed = [dict(r) for r in rows]
    changed[-1]["load"] = 1e6  # row 20: a target of position 17 only
    other.observe(changed)
    other.learn(["a"])
    assert not same_weights(weights(other.encoder), weights(runner.encoder))


def test_nothing_is_learned_before_the_horizon_has_passed_and_each_position_once():
    runner = OnlineRunner(encoder(), MemoryStore(), CHANNELS, learning=LearnConfig(
        history=16, context=10, min_context=0, target_tolerance=0.0))
    before = weights(runner.encoder)
    runner.observe(grid_rows("a", range(1, 4)))  # position 1 needs rows up to 4
    assert runner.learn(["a"]).steps == 0 and runner.version == 0
    assert same_weights(before, weights(runner.encoder))
    runner.observe(grid_rows("a", [4.0], seed=1))
    first = runner.learn(["a"])
    assert first.steps == 1 and first.windows == 1
    # nothing new has matured: nothing is learned twice
    assert runner.learn(["a"]).steps == 0 and runner.version == 1
    runner.observe([{"stream": "a", "time": 5.0, "load": 0.3, "temp": 0.1}])
    # only position 2 (targets 3, 4, 5) is new
    second = runner.learn(["a"])
    assert second.steps == 1 and second.targets <= H * len(CHANNELS) and runner.version == 2


def test_plan_windows_matches_targets_by_time_with_tolerance():
    cfg = LearnConfig(history=8, context=6, min_context=0, target_tolerance=0.5)
    t = np.array([-np.inf, -np.inf, 0.0, 0.9, 2.2, 2.6, 4.1, 6.0])
    v = np.arange(8.0)[:, None]
    v[5] = np.nan
    hist = {"hist.time": t[None], "hist.values": v[None], "learn.through": np.array([-np.inf])}
    plan = plan_windows(hist, np.array([6.0]), cfg, horizon=2, time_unit=1.0)
    # matured: origins with o + 2.5 <= 6 (0, 0.9, 2.2, 2.6); step k's target is the row nearest o + k within 0.5
    assert plan.times[0].tolist() == [0.0, 0.9, 2.2, 2.6] and plan.through.tolist() == [2.6]
    tg = plan.targets[0, :, :, 0]
    assert tg[0].tolist() == [3.0, 4.0]  # 1 -> 0.9, 2 -> 2.2
    assert tg[1, 0].item() == 4.0 and math.isnan(tg[1, 1].item())  # 1.9 -> 2.2; 2.9 -> 2.6 is missing
    assert math.isnan(tg[2, 0].item()) and tg[2, 1].item() == 6.0  # 3.2 -> none; 4.2 -> 4.1
    assert plan_windows({**hist, "learn.through": np.array([2.6])}, np.array([6.0]), cfg, 2, 1.0) is None


def _calls():
    """Observe and learn over four streams, two at a time (a working set of three spills)."""
    rows = {"a": grid_rows("a", range(1, 41), 1), "b": grid_rows("b", np.arange(0.5, 40.5, 1.0), 2),
            "c": grid_rows("c", range(2, 41, 2), 3), "d": grid_rows("d", range(1, 41), 4)}
    calls = []
    for block in range(0, 40, 5):
        for pair in (["a", "b"], ["c", "d"]):
            calls.append(("observe", [r for s in pair for r in rows[s] if block < r["time"] <= block + 5]))
            if block >= 10:
                calls.append(("learn", pair))
    return calls


def _play(runner, calls):
    for op, arg in calls:
        if op == "observe":
            runner.observe(arg)
        else:
            runner.learn(arg)


def test_restart_continues_learning_exactly(tmp_path):
    def make(store, learning=LEARN):
        return OnlineRunner(encoder(), store, CHANNELS, capacity=3, learning=learning)

    calls = _calls()
    whole = make(MemoryStore())
    _play(whole, calls)
    assert whole.version >= 10
    stop = len(calls) // 2 + 1
    first = make(SQLiteStore(tmp_path / "s.db"))
    _play(first, calls[:stop])
    assert calls[stop - 1][0] == "observe" and first.store.journal_head() > 0
    assert len(list(first.store.read_journal())) > 0  # unflushed journal entries after the last learn
    first.store.close()  # the process ends without a snapshot
    # a new process with the untrained model: it loads the learned weights and replays the journal with them
    second = make(SQLiteStore(tmp_path / "s.db"), learning=None)
    assert second.learning == LEARN and second.version == first.version
    _play(second, calls[stop:])
    assert second.version == whole.version
    assert same_weights(weights(second.encoder), weights(whole.encoder))
    ids = ["a", "b", "c", "d"]
    assert second.forecast(ids).equals(whole.forecast(ids))
    second.close()
    payload = SQLiteStore(tmp_path / "s.db").get_blob("model")
    assert decode_learned(payload).version == whole.version


def test_learned_weights_belong_to_one_model_lineage(tmp_path):
    path = tmp_path / "s.db"
    with OnlineRunner(encoder(), SQLiteStore(path), CHANNELS, learning=LEARN) as runner:
        runner.observe(grid_rows("a", range(1, 21)))
        runner.learn(["a"])
        learned = weights(runner.encoder)
    with pytest.raises(FingerprintMismatchError, match="blob 'model': the store's learned weights .version 1. "
                                                       "belong to model"):
        OnlineRunner(encoder(seed=1), SQLiteStore(path), CHANNELS)
    with pytest.raises(ValueError, match="the store learns with LearnConfig"):
        OnlineRunner(encoder(), SQLiteStore(path), CHANNELS,
                     learning=LearnConfig(history=20, context=10, min_context=2))
    # the model as learned is of the same lineage
    enc = encoder()
    enc.load_state_dict(learned)
    again = OnlineRunner(enc, SQLiteStore(path), CHANNELS)
    assert again.version == 1 and again.learning == LEARN and again.info(["a"])["steps"][0] == 20
    again.close()
    # a store that already holds streams without history cannot start learning
    plain = tmp_path / "plain.db"
    with OnlineRunner(encoder(), SQLiteStore(plain), CHANNELS) as runner:
        runner.observe(grid_rows("a", range(1, 4)))
    with pytest.raises(ValueError, match="learning needs a new store"):
        OnlineRunner(encoder(), SQLiteStore(plain), CHANNELS, learning=LEARN)
    with pytest.raises(ValueError, match="learn: this runner does not learn"):
        OnlineRunner(encoder(), SQLiteStore(plain), CHANNELS).learn(["a"])


def test_failed_learn_commit_changes_nothing():
    class FailingStore(MemoryStore):
        fail = False

        def commit(self):
            if self.fail and self.staged_blobs:
                raise OSError("disk full")
            super().commit()

    store = FailingStore()
    runner = OnlineRunner(encoder(), store, CHANNELS, learning=LEARN)
    runner.observe(grid_rows("a", range(1, 21)))
    before, blob = weights(runner.encoder), store.get_blob("model")
    record = store.get(["a"])["a"]
    store.fail = True
    with pytest.raises(OSError, match="disk full"):
        runner.learn(["a"])
    assert same_weights(before, weights(runner.encoder)) and runner.version == 0
    assert store.get_blob("model") == blob and not runner.learner.optimizer_state()
    assert torch.equal(store.get(["a"])["a"].tensors["learn.through"], record.tensors["learn.through"])
    store.fail = False
    runner.learn(["a"])
    clean = OnlineRunner(encoder(), MemoryStore(), CHANNELS, learning=LEARN)
    clean.observe(grid_rows("a", range(1, 21)))
    clean.learn(["a"])
    assert same_weights(weights(clean.encoder), weights(runner.encoder))


def test_learn_one_and_forecast_one():
    runner = OnlineRunner(encoder(), MemoryStore(), CHANNELS, learning=LEARN)
    results = [runner.learn_one("a", float(t), {"load": 0.1 * t, "temp": None if t % 3 else 1.0})
               for t in range(1, 16)]
    assert [r.steps for r in results] == [0] * 5 + [1] * 10  # position 3 (min_context 2) matures at 6
    out = runner.forecast_one("a")
    table = runner.forecast(["a"])
    assert list(out) == CHANNELS and len(out["load"]) == H
    assert out["temp"][1][0.9] == table.filter((pl.col("step") == 2) & (pl.col("channel") == "temp"))["q0.9"][0]
    assert len(runner.forecast_one("a", horizon=1)["load"]) == 1
    steps = runner.info(["a"])["steps"][0]
    for kwargs, pattern in [
        (dict(values={"pressure": 1.0}), r"learn_one: unknown channel 'pressure' \(channels are \['load', 'temp'\]\)"),
        (dict(values={"load": "high"}), "learn_one: channel 'load' expected a number or None, got 'high'"),
        (dict(values={"load": math.inf}), "column 'load' holds inf for stream 'a'"),
        (dict(values={"load": 1.0}, timestamp=15.0), "learn_one: stream 'a': timestamp 15.0 is not after its last"),
        (dict(values={"load": 1.0}, timestamp=math.nan), "learn_one: 'timestamp' expected a finite number"),
        (dict(values={"load": 1.0}, covariates={"hour": 1.0}), "learn_one: unknown covariate 'hour'"),
    ]:
        call = {"stream_id": "a", "timestamp": 16.0, **kwargs}
        with pytest.raises(ValueError, match=pattern):
            runner.learn_one(**call)
    assert runner.info(["a"])["steps"][0] == steps and runner.version == 10
    with pytest.raises(UnknownStreamError, match="unknown stream 'zz'") as err:
        runner.forecast_one("zz")
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)
    with pytest.raises(ValueError, match=r"'horizon' expected an int in \[1, 3\], got 4"):
        runner.forecast_one("a", horizon=4)
    with pytest.raises(UnknownStreamError, match="learn: unknown stream 'zz'"):
        runner.learn(["zz"])
    plain = OnlineRunner(encoder(), MemoryStore(), CHANNELS)
    with pytest.raises(ValueError, match="learn_one: this runner does not learn"):
        plain.learn_one("a", 1.0, {"load": 1.0})
    assert plain.observe_one("a", 1.0, {"load": 1.0}).accepted == 1


def test_audit_is_read_only_and_matches_what_observe_applies():
    runner = OnlineRunner(encoder(), MemoryStore(), CHANNELS, capacity=4)
    runner.observe(grid_rows("a", range(1, 6)) + grid_rows("b", range(1, 4), 1))
    batch = pl.DataFrame(grid_rows("a", [6.0, 7.5, 9.0], 2) + grid_rows("c", [1.0, 2.0], 3)) \
        .with_columns(pl.Series("onset", [False, True, False, True, False]))
    store_before = dict(runner.store.committed)
    pools_before = {k: v.clone() for k, v in runner.ws.pools.items()}
    audit = runner.audit(batch, tags="onset")
    assert runner.store.committed == store_before
    assert all(torch.equal(v, pools_before[k]) for k, v in runner.ws.pools.items())
    assert runner.info(["a", "c"])["steps"].to_list() == [5, 0]
    assert sorted(audit.associations["tag"].unique().to_list()) == ["a@7.5", "c@1"]
    energy = audit.energy
    assert energy.group_by("stream").agg(pl.col("step").max()).sort("stream").rows() == [("a", 2), ("c", 1)]
    # the audit starts from the stored state and ends where observe takes the state
    runner.observe(batch.drop("onset"))
    state, _ = runner._states_of(["a", "c"])
    last = energy.filter(pl.col("layer") == 1).sort("step").group_by("stream", "head", maintain_order=True).last()
    for row in last.iter_rows(named=True):
        s = state.layers[1].recurrent[["a", "c"].index(row["stream"]), row["head"]]
        assert row["energy_after"] == pytest.approx(float(s.square().sum()), rel=1e-9)
    with pytest.raises(ValueError, match="audit: stream 'a': timestamp 9.0 is not after its last observation 9.0"):
        runner.audit(grid_rows("a", [9.0]))
    with pytest.raises(ValueError, match="audit: tag 'x' expected a .stream, timestamp. of a row of the batch"):
        runner.audit(grid_rows("a", [10.0]), tags={"x": ("a", 11.0)})
    with pytest.raises(ValueError, match=r"unknown columns \['humidity'\]"):
        runner.audit([{"stream": "a", "time": 10.0, "humidity": 1.0}])
