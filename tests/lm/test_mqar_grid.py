"""The MQAR grid of the Zoology protocol: the tiny recipe end to end through the command (record, table, figure),
shards that merge into one report, resumption after an interruption, worker processes, parameters matched within
5 % in the shipped grid, the learning rate chosen on validation and never on test, the t-intervals against values
worked by hand, the training mixture's interleave, the power-law queries, and errors that name the bad field."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from gdn2ts.cli import main
from gdn2ts.lm.eval import mqar_grid
from gdn2ts.lm.eval.mqar import IGNORE_INDEX, MQARConfig, make_mqar
from gdn2ts.lm.eval.mqar_grid import grid_runs, run_grid, shard_runs
from gdn2ts.lm.eval.mqar_grid_config import (
    MQARGridConfig,
    MQARGridEvalConfig,
    MQARGridTask,
    MQARGridTrainConfig,
    match_parameters,
)
from gdn2ts.lm.eval.mqar_grid_report import select_learning_rates, summarize_grid, t_interval, t_quantile
from gdn2ts.lm.eval.mqar_run import MQARModelConfig
from gdn2ts.models.lm_config import ATTENTION_MIXERS

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tasks/lm/mqar/zoology_tiny.yaml"
GRID_RECIPES = sorted(p for p in (ROOT / "tasks/lm/mqar").glob("*.yaml") if "widths" in yaml.safe_load(p.read_text()))


def load(path: Path) -> MQARGridConfig:
    r = yaml.safe_load(path.read_text())
    return MQARGridConfig(MQARGridTask(**r["task"]), r["widths"], r["mixers"], MQARGridTrainConfig(**r["train"]),
                          MQARGridEvalConfig(**r["evaluation"]), r.get("match_tolerance", 0.05))


def fake_run(config, run, intermediate_size, held_out, device):
    """A stand-in for training: accuracies that are a function of the run, instantly."""
    acc = 0.1 * (run.lr_index + 1) + 0.01 * run.seed
    return {"mixer": run.mixer, "width": run.width, "lr_index": run.lr_index, "lr": run.lr, "seed": run.seed,
            "intermediate_size": intermediate_size, "parameters": 1, "valid": {k: acc for k in held_out["valid"]},
            "test": {k: {"accuracy": acc, "sequence_accuracy": 0.0, "loss": 1.0} for k in held_out["test"]},
            "curve": {"step": [1], "loss": [1.0]}, "train_seconds": 0.01, "eval_seconds": 0.0,
            "steps_per_second": 100.0, "device": "cpu"}


def test_tiny_grid_through_the_command(tmp_path, monkeypatch):
    main(["lm", "mqar-grid", "--config", str(TINY), "--out", str(tmp_path), "--quiet", "true"])
    record = json.loads((tmp_path / "mqar_grid.json").read_text())
    assert record["runs_done"] == record["runs_total"] == 8 and len(list((tmp_path / "runs").glob("*.json"))) == 8
    assert record["levels"] == ["2 pairs / 16 tokens", "8 pairs / 32 tokens"]
    run = record["runs"]["gdn2/d32/lr1/s0"]
    assert set(run["valid"]) == set(run["test"]) == set(record["levels"]) and run["curve"]["step"] == [3, 6]
    assert all(0 <= r["test"][lv]["accuracy"] <= 1 for r in record["runs"].values() for lv in record["levels"])
    # every model's parameters and state are recorded; the state is the same for both mixers, the MLPs differ
    models = record["models"]["32"]
    assert {m["state_floats_per_layer"] for m in models.values()} == {2 * 8 * 16}
    assert models["gdn2"]["intermediate_size"] == 32 < models["gdn"]["intermediate_size"]
    assert run["parameters"] == models["gdn2"]["parameters"]
    # one chosen rate per (mixer, width); one cell per level with its interval
    assert set(record["summary"]["selection"]) == {"gdn2/32", "gdn/32"}
    assert len(record["summary"]["cells"]) == 4 and all(c["n"] == 2 and c["complete"]
                                                        for c in record["summary"]["cells"])
    table = (tmp_path / "mqar_grid.md").read_text()
    assert "| gdn2 | 17,924 | 32 | 256 |" in table and "Runs: 8 of 8" in table and "*" in table
    assert (tmp_path / "mqar_grid.png").stat().st_size > 5000

    # a second invocation trains nothing and rebuilds the same report
    monkeypatch.setattr(mqar_grid, "train_grid_run", lambda *a, **k: pytest.fail("a finished run ran again"))
    mqar_grid.mqar_grid(**_tiny_kwargs(), out=str(tmp_path), quiet=True)
    again = json.loads((tmp_path / "mqar_grid.json").read_text())
    assert again["runs"] == record["runs"] and again["summary"] == record["summary"]
    # another config in the same folder is refused, naming the way out
    with pytest.raises(SystemExit, match="holds another grid config; pass fresh=True"):
        main(["lm", "mqar-grid", "--config", str(TINY), "--out", str(tmp_path), "--quiet", "true",
              "--train.steps", "7"])


def _tiny_kwargs() -> dict:
    c = load(TINY)
    return dict(task=c.task, widths=c.widths, mixers=c.mixers, train=c.train, evaluation=c.evaluation,
                device="cpu", threads=1)


def test_shards_merge_into_one_report_and_resume(tmp_path, monkeypatch):
    config = load(TINY)
    calls = []

    def counting(*a, **k):
        calls.append(a[1].key)
        return fake_run(*a, **k)

    monkeypatch.setattr(mqar_grid, "train_grid_run", counting)
    first = run_grid(config, tmp_path, shard="1/2", device="cpu", quiet=True)
    assert first["runs_done"] == 4 and first["runs_total"] == 8
    assert calls == [r.key for r in grid_runs(config)[0::2]]
    # an interruption after one run of the second shard keeps that run; the rerun does only the rest
    real = counting

    def crash_on_second(*a, **k):
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(mqar_grid, "train_grid_run", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_grid(config, tmp_path, shard="2/2", device="cpu", quiet=True)
    assert len(list((tmp_path / "runs").glob("*.json"))) == 5
    calls.clear()
    monkeypatch.setattr(mqar_grid, "train_grid_run", counting)
    merged = run_grid(config, tmp_path, shard="2/2", device="cpu", quiet=True)
    assert calls == [r.key for r in grid_runs(config)[3::2]]
    assert merged["runs_done"] == 8 and set(merged["runs"]) == {r.key for r in grid_runs(config)}
    assert all(c["complete"] for c in merged["summary"]["cells"])
    # stop_after_s=0 starts nothing; report_only rebuilds without training
    calls.clear()
    run_grid(config, tmp_path, fresh=True, stop_after_s=0, device="cpu", quiet=True)
    assert calls == [] and not list((tmp_path / "runs").glob("*.json"))
    assert run_grid(config, tmp_path, report_only=True, quiet=True)["runs_done"] == 0


def test_workers_train_in_their_own_processes(tmp_path):
    config = load(TINY)
    record = run_grid(config, tmp_path, only_mixers=["gdn"], only_widths=[32], shard="1/2", workers=2,
                      device="cpu", threads=1, quiet=True)
    assert sorted(record["runs"]) == ["gdn/d32/lr0/s0", "gdn/d32/lr1/s0"]
    assert all(r["device"] == "cpu" for r in record["runs"].values())


def test_shipped_grid_matches_parameters_and_state():
    config = load(ROOT / "tasks/lm/mqar/zoology.yaml")
    assert len(config.train.seeds) >= 5 and len(config.train.lrs) >= 4
    assert {w.hidden_size for w in config.widths} == {64, 128, 256}
    assert config.task.vocab_size == 8192
    assert {"gdn2", "erase_only", "write_only", "kda", "gdn", "mamba2", "attention"} <= set(config.mixers)
    assert any(m.startswith("mamba3") for m in config.mixers)
    smallest = min(config.widths, key=lambda w: w.hidden_size)
    # the largest level asks more pairs than the smallest state has key directions
    assert max(lv.num_pairs for lv in config.task.test_levels) > smallest.num_heads * smallest.head_k_dim
    for shape in config.widths:
        models = match_parameters(shape, config.mixers, config.task.vocab_size, config.match_tolerance)
        counts = [m["parameters"] for m in models.values()]
        assert max(counts) <= 1.05 * min(counts), (shape.hidden_size, counts)
        states = {m["state_floats_per_layer"] for name, m in models.items() if name not in ATTENTION_MIXERS}
        assert states == {shape.num_heads * shape.head_k_dim * shape.head_v_dim}
        assert all(m["intermediate_size"] >= shape.intermediate_size for m in models.values())


def test_parameter_match_fails_loudly_when_it_cannot_hold():
    shape = MQARModelConfig(hidden_size=32, num_layers=2, intermediate_size=64, num_heads=2, head_k_dim=8,
                            head_v_dim=16, gate_low_rank=8, attn_head_dim=16)
    with pytest.raises(ValueError, match="match_parameters: mixer 'gdn' at width 32 has .* more than 0% from"):
        match_parameters(shape, ("gdn2", "gdn"), vocab_size=64, tolerance=0.0)


def _runs(valid: dict, test: dict) -> list[dict]:
    return [{"mixer": "gdn2", "width": 64, "lr_index": i, "lr": lr, "seed": s, "valid": {"L": valid[i][s]},
             "test": {"L": {"accuracy": test[i][s]}}}
            for i, lr in enumerate((1e-3, 1e-2)) for s in range(3)]


def test_learning_rate_is_chosen_on_validation_not_test():
    # validation prefers the first rate, test the second: the choice and the reported numbers follow validation
    valid = {0: [0.6, 0.7, 0.8], 1: [0.2, 0.3, 0.1]}
    test = {0: [0.5, 0.6, 0.7], 1: [0.99, 0.98, 0.97]}
    runs = _runs(valid, test)
    chosen = select_learning_rates(runs, [1e-3, 1e-2])[("gdn2", 64)]
    assert chosen["lr_index"] == 0 and chosen["lr"] == 1e-3 and chosen["seeds"] == [3, 3]
    assert chosen["scores"] == pytest.approx([0.7, 0.2])
    cell = summarize_grid(runs, [1e-3, 1e-2], ["L"], 3)["cells"][0]
    assert cell["lr"] == 1e-3 and cell["mean"] == pytest.approx(0.6) and cell["per_seed"] == {0: 0.5, 1: 0.6, 2: 0.7}
    # equal validation scores go to the first rate; a diverged run (None) counts as 0
    tie = _runs({0: [0.5] * 3, 1: [0.5] * 3}, test)
    assert select_learning_rates(tie, [1e-3, 1e-2])[("gdn2", 64)]["lr_index"] == 0
    nan = _runs({0: [0.5, None, 0.5], 1: [0.4] * 3}, test)
    assert select_learning_rates(nan, [1e-3, 1e-2])[("gdn2", 64)]["scores"][0] == pytest.approx(1 / 3)


def test_t_interval_by_hand():
    # t(0.975, 4) = 2.7764451 (tables); s = sqrt(0.004 / 4) = 0.0316228; half width = t * s / sqrt(5) = 0.039264
    assert t_quantile(0.975, 4) == pytest.approx(2.7764451, abs=1e-7)
    assert [round(t_quantile(0.975, d), 3) for d in (1, 2, 3, 9)] == [12.706, 4.303, 3.182, 2.262]
    r = t_interval([0.90, 0.92, 0.94, 0.96, 0.98])
    half = 2.7764451 * math.sqrt(0.001) / math.sqrt(5)
    assert r["n"] == 5 and r["mean"] == pytest.approx(0.94) and r["sd"] == pytest.approx(math.sqrt(0.001))
    assert (r["low"], r["high"]) == pytest.approx((0.94 - half, 0.94 + half), abs=1e-8)
    assert half == pytest.approx(0.039264, abs=1e-6)
    # two seeds: t(0.975, 1) = 12.7062; [0.2, 0.4]: 0.3 ± 12.7062 * 0.141421 / 1.414214 = 0.3 ± 1.27 -> [0, 1]
    assert (t_interval([0.2, 0.4])["low"], t_interval([0.2, 0.4])["high"]) == (0.0, 1.0)
    r = t_interval([0.5, 0.5, 0.5])
    assert (r["low"], r["high"], r["sd"]) == (0.5, 0.5, 0.0)
    assert t_interval([0.3]) == {"n": 1, "mean": 0.3, "sd": None, "low": None, "high": None}
    with pytest.raises(ValueError, match="argument 'df' expected an int >= 1"):
        t_quantile(0.975, 0)


def test_training_mixture_interleaves_by_weight():
    lv = [MQARConfig(vocab_size=64, num_pairs=p, seq_len=32) for p in (1, 2, 3, 4, 5)]
    task = MQARGridTask(lv, lv[:1], train_weights=[5, 1, 1, 1, 1])
    order = task.schedule(900)
    assert [order.count(i) for i in range(5)] == [500, 100, 100, 100, 100]
    for n in (9, 50, 451):
        # every prefix holds each level within one step of its share
        assert all(abs(order[:n].count(i) - n * w / 9) <= 1 for i, w in enumerate((5, 1, 1, 1, 1)))
    assert MQARGridTask(lv[:2], lv[:1]).schedule(4) == (0, 1, 0, 1)


def test_power_law_queries_come_early_and_stay_answerable():
    near = MQARConfig(vocab_size=8192, num_pairs=8, seq_len=128, query_power=0.01)
    ids, labels = make_mqar(near, 200, seed=0)
    pos = (labels != IGNORE_INDEX).nonzero()[:, 1]
    uniform_pos = (make_mqar(replace(near, query_power=None), 200, seed=0)[1] != IGNORE_INDEX).nonzero()[:, 1]
    # 56 slots after the pairs: the power law puts most queries in the first few, the uniform draw does not
    assert float((pos < 16 + 2 * 8).float().mean()) > 0.3 > float((uniform_pos < 16 + 2 * 8).float().mean())
    for row in range(200):
        pairs = dict(zip(ids[row, 0:16:2].tolist(), ids[row, 1:16:2].tolist(), strict=True))
        asked = labels[row] != IGNORE_INDEX
        assert int(asked.sum()) == 8 and len(set(ids[row][asked].tolist())) == 8
        assert all(pairs[k] == v for k, v in zip(ids[row][asked].tolist(), labels[row][asked].tolist(), strict=True))
    assert torch.equal(make_mqar(near, 200, seed=0)[0], ids)
    with pytest.raises(ValueError, match="field 'query_power' expected None or a float in"):
        MQARConfig(vocab_size=64, num_pairs=2, seq_len=16, query_power=0.0)


def test_random_filler_changes_only_the_filler():
    zero = MQARConfig(vocab_size=8192, num_pairs=8, seq_len=64, query_power=0.01)
    ids, labels = make_mqar(zero, 50, seed=3)
    noisy, noisy_labels = make_mqar(replace(zero, filler="random"), 50, seed=3)
    filler = ids == 0
    assert torch.equal(noisy_labels, labels) and torch.equal(noisy[~filler], ids[~filler])
    assert float((noisy[filler] != 0).float().mean()) > 0.99 and int(noisy.max()) < 8192
    with pytest.raises(ValueError, match="field 'filler' expected 'zero' or 'random'"):
        replace(zero, filler="noise")


@pytest.mark.parametrize("change, message", [
    (dict(mixers=("gdn2", "lstm")), "field 'mixers' expected a non-empty list of distinct names"),
    (dict(widths="twice"), "field 'widths' expected a non-empty list of model shapes of distinct hidden_size"),
    (dict(evaluation=MQARGridEvalConfig(valid_seed=5, test_seed=6)), "valid_seed and test_seed at least 2 apart"),
    (dict(match_tolerance=2.0), "field 'match_tolerance' expected a float in"),
])
def test_bad_grid_configs_are_named(change, message):
    config = load(TINY)
    fields = dict(task=config.task, widths=config.widths, mixers=config.mixers, train=config.train,
                  evaluation=config.evaluation)
    if change.get("widths") == "twice":
        change = dict(widths=config.widths * 2)
    with pytest.raises(ValueError, match=message):
        MQARGridConfig(**{**fields, **change})


def test_bad_parts_are_named(tmp_path):
    a = MQARConfig(vocab_size=64, num_pairs=2, seq_len=16)
    with pytest.raises(ValueError, match="field 'train_weights' expected empty or 1 positive numbers"):
        MQARGridTask((a,), (a,), train_weights=(1, 2))
    with pytest.raises(ValueError, match="field 'test_levels' expected the train levels' vocabulary"):
        MQARGridTask((a,), (replace(a, vocab_size=128),))
    with pytest.raises(ValueError, match="field 'train_levels' expected levels with distinct labels"):
        MQARGridTask((a, a), (a,))
    with pytest.raises(ValueError, match="field 'lrs' expected a non-empty list of distinct learning rates"):
        MQARGridTrainConfig(lrs=(1e-3, 1e-3))
    with pytest.raises(ValueError, match="field 'seeds' expected a non-empty list of distinct ints"):
        MQARGridTrainConfig(seeds=())
    with pytest.raises(ValueError, match="argument 'shard' expected 'i/n' with 1 <= i <= n, got '3/2'"):
        shard_runs([], "3/2")
    config = load(TINY)
    with pytest.raises(ValueError, match="argument 'only_mixers' expected names from the grid's mixers"):
        grid_runs(config, only_mixers=["kda"])
    with pytest.raises(ValueError, match="argument 'only_widths' expected hidden sizes from the grid's widths"):
        grid_runs(config, only_widths=[64])
    with pytest.raises(ValueError, match="argument 'workers' expected an int >= 1"):
        run_grid(config, tmp_path, workers=0)
    with pytest.raises(SystemExit, match="gdn2ts lm mqar-grid: .*field 'mixers'"):
        main(["lm", "mqar-grid", "--config", str(TINY), "--out", str(tmp_path), "--mixers", "[gdn2, rnn]"])
    # nothing was written by the refused calls
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("path", GRID_RECIPES, ids=[p.stem for p in GRID_RECIPES])
def test_every_grid_recipe_loads(path):
    config = load(path)
    assert grid_runs(config) and config.digest == load(path).digest


@pytest.mark.gpu
def test_tiny_grid_on_cuda_with_workers(tmp_path):
    """The GPU path: batches drawn on the device, bf16 autocast, the Triton kernels, runs in worker processes."""
    main(["lm", "mqar-grid", "--config", str(TINY), "--out", str(tmp_path), "--quiet", "true", "--device", "cuda",
          "--workers", "2", "--mixers", "[gdn2, mamba2, mamba3_siso, attention]"])
    record = json.loads((tmp_path / "mqar_grid.json").read_text())
    assert record["runs_done"] == 16 and all(r["device"].startswith("cuda") for r in record["runs"].values())
    assert all(r["test"][lv]["loss"] is not None for r in record["runs"].values() for lv in record["levels"])
