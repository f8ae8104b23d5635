"""MQAR: the generator's sequences answer their own queries, are deterministic, and reject impossible levels; the
accuracy metric counts only answers; the ``gdn2ts lm mqar`` command runs the tiny recipe end to end, writes its
record, table and figure, continues an interrupted grid, and its recipes load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from gdn2ts.cli import main
from gdn2ts.lm.eval import (
    IGNORE_INDEX,
    MQAR_MIXERS,
    MQARConfig,
    MQAREvalConfig,
    MQARModelConfig,
    MQARTrainConfig,
    make_mqar,
    mqar_accuracy,
    mqar_report,
    run_mqar,
)
from gdn2ts.models.lm_config import RECURRENT_MIXERS

ROOT = Path(__file__).resolve().parents[2]
# the per-level recipes of `gdn2ts lm mqar`; the grid recipes (with `widths:`) are tests/lm/test_mqar_grid.py's
RECIPES = sorted(p for p in (ROOT / "tasks" / "lm" / "mqar").glob("*.yaml")
                 if "widths" not in yaml.safe_load(p.read_text()))


@pytest.mark.parametrize("cfg", [MQARConfig(vocab_size=64, num_pairs=8, seq_len=40),
                                 MQARConfig(vocab_size=17, num_pairs=8, seq_len=21, num_queries=2),
                                 MQARConfig(vocab_size=8192, num_pairs=64, seq_len=256),
                                 MQARConfig(vocab_size=8192, num_pairs=64, seq_len=256, query_power=0.01)])
def test_every_query_is_answered_by_its_pair(cfg):
    ids, labels = make_mqar(cfg, 32, seed=3)
    P, T, Q = cfg.num_pairs, cfg.seq_len, cfg.queries
    assert ids.shape == labels.shape == (32, T) and ids.dtype == labels.dtype == torch.long
    keys, values = ids[:, 0:2 * P:2], ids[:, 1:2 * P:2]
    assert bool(((keys >= 1) & (keys < 1 + cfg.n_keys)).all())
    assert bool(((values >= 1 + cfg.n_keys) & (values < cfg.vocab_size)).all())
    # nothing is labelled in the pairs; the query region holds the filler except at the queries
    assert bool((labels[:, :2 * P] == IGNORE_INDEX).all())
    for row in range(32):
        k, v = keys[row].tolist(), values[row].tolist()
        assert len(set(k)) == P and len(set(v)) == P
        asked = (labels[row] != IGNORE_INDEX).nonzero()[:, 0]
        assert len(asked) == Q
        assert bool(((asked - 2 * P) % 2 == 0).all()) and int(asked.max()) < T
        q_keys = ids[row, asked].tolist()
        assert len(set(q_keys)) == Q
        assert labels[row, asked].tolist() == [v[k.index(x)] for x in q_keys]
        rest = torch.ones(T, dtype=torch.bool)
        rest[:2 * P] = False
        rest[asked] = False
        assert bool((ids[row, rest] == 0).all())


def test_generator_is_deterministic_and_advances():
    cfg = MQARConfig(vocab_size=64, num_pairs=4, seq_len=32)
    a, la = make_mqar(cfg, 8, seed=5)
    b, lb = make_mqar(cfg, 8, seed=5)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, make_mqar(cfg, 8, seed=6)[0])
    gen = torch.Generator().manual_seed(5)
    first, second = make_mqar(cfg, 8, gen)[0], make_mqar(cfg, 8, gen)[0]
    assert torch.equal(first, a) and not torch.equal(first, second)


def test_queries_reach_every_slot_and_order():
    """The query positions and the order of the asked pairs are spread, not fixed."""
    cfg = MQARConfig(vocab_size=64, num_pairs=4, seq_len=24, num_queries=2)
    ids, labels = make_mqar(cfg, 400, seed=0)
    positions = set((labels != IGNORE_INDEX).nonzero()[:, 1].tolist())
    assert positions == {8 + 2 * s for s in range(cfg.query_slots)}
    first_asked = ids[:, 8:][labels[:, 8:] != IGNORE_INDEX].reshape(400, 2)[:, 0]
    which = [ids[r, 0:8:2].tolist().index(int(first_asked[r])) for r in range(400)]
    assert set(which) == {0, 1, 2, 3}


@pytest.mark.parametrize("fields, message", [
    (dict(vocab_size=16, num_pairs=8, seq_len=40), "field 'vocab_size' expected at least 17"),
    (dict(vocab_size=64, num_pairs=8, seq_len=30), "field 'seq_len' expected at least 32"),
    (dict(vocab_size=64, num_pairs=4, seq_len=30, num_queries=5), "field 'num_queries' expected at most"),
    (dict(vocab_size=64, num_pairs=0, seq_len=30), "field 'num_pairs' expected an int >= 1"),
    (dict(vocab_size=64, num_pairs=2, seq_len=30, name=""), "field 'name' expected None or a non-empty"),
])
def test_impossible_levels_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        MQARConfig(**fields)


def test_bad_generator_arguments():
    cfg = MQARConfig(vocab_size=64, num_pairs=4, seq_len=24)
    with pytest.raises(ValueError, match="argument 'num_examples' expected an int >= 1"):
        make_mqar(cfg, 0)
    with pytest.raises(ValueError, match="argument 'seed' expected an int >= 0 or a torch.Generator"):
        make_mqar(cfg, 2, seed=-1)
    with pytest.raises(ValueError, match="argument 'config' expected an MQARConfig"):
        make_mqar({"num_pairs": 4}, 2)


def test_accuracy_counts_answers_only():
    cfg = MQARConfig(vocab_size=32, num_pairs=3, seq_len=16)
    ids, labels = make_mqar(cfg, 4, seed=1)
    oracle = torch.full((4, 16, 32), -1.0)
    mask = labels != IGNORE_INDEX
    # right everywhere it is scored, wrong (token 0) everywhere else
    oracle[..., 0] = 0.0
    oracle[mask] = torch.nn.functional.one_hot(labels[mask], 32).float()
    assert mqar_accuracy(oracle, labels) == (12, 12)
    wrong = oracle.clone()
    row, col = mask.nonzero()[0].tolist()
    wrong[row, col] = -wrong[row, col]
    assert mqar_accuracy(wrong, labels) == (11, 12)
    with pytest.raises(ValueError, match="argument 'labels' expected shape"):
        mqar_accuracy(oracle, labels[:, :-1])


def _tiny_args(tmp_path, *extra):
    return ["lm", "mqar", "--config", str(ROOT / "tasks/lm/mqar/tiny.yaml"), "--out", str(tmp_path),
            "--quiet", "true", *extra]


def test_command_runs_tiny_recipe_and_continues(tmp_path, monkeypatch):
    main(_tiny_args(tmp_path))
    record = json.loads((tmp_path / "mqar.json").read_text())
    tiny = yaml.safe_load((ROOT / "tasks/lm/mqar/tiny.yaml").read_text())
    assert record["config"]["mixers"] == tiny["mixers"] == ["gdn2", "gdn"]
    assert len(record["runs"]) == 2 and record["levels"] == ["4 pairs / 24 tokens"]
    for run in record["runs"].values():
        assert 0 <= run["accuracy"] <= 1 and run["curve"]["step"][-1] == tiny["train"]["steps"]
        assert run["eval_curve"]["step"] == [15, 30] and len(run["curve"]["loss"]) == 3
    # matched state: both recurrent mixers hold the same floats per layer
    assert {m["state_floats_per_layer"] for m in record["models"].values()} == {2 * 8 * 8}
    table = (tmp_path / "mqar.md").read_text()
    assert "| gdn2 |" in table and "| gdn |" in table and "(1) |" in table
    assert (tmp_path / "mqar.png").stat().st_size > 1000

    # a rerun of the same config trains nothing (the runs are kept); another config is refused
    calls = []
    monkeypatch.setattr(mqar_report, "train_mqar_run", lambda *a, **k: calls.append(a))
    main(_tiny_args(tmp_path))
    assert calls == [] and json.loads((tmp_path / "mqar.json").read_text())["runs"] == record["runs"]
    with pytest.raises(SystemExit, match="gdn2ts lm mqar: run_mqar: '.*' holds runs of another config"):
        main(_tiny_args(tmp_path, "--train.steps", "31"))


def test_interrupted_grid_resumes_with_the_missing_runs(tmp_path, monkeypatch):
    args = dict(levels=(MQARConfig(vocab_size=16, num_pairs=2, seq_len=10),),
                model=MQARModelConfig(hidden_size=16, num_layers=1, intermediate_size=16, num_heads=2,
                                      head_k_dim=8, head_v_dim=8, gate_low_rank=4, attn_head_dim=8),
                mixers=("gdn2", "kda"), train=MQARTrainConfig(steps=2, batch_size=2, warmup_steps=1, seeds=(0, 1)),
                evaluation=MQAREvalConfig(num_examples=4, curve_examples=2), out=tmp_path, device="cpu", quiet=True)
    real = mqar_report.train_mqar_run
    calls = []

    def crash_on_third(*a, **k):
        calls.append((a[1], a[2]))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(mqar_report, "train_mqar_run", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_mqar(**args)
    assert len(json.loads((tmp_path / "mqar.json").read_text())["runs"]) == 2
    calls.clear()
    monkeypatch.setattr(mqar_report, "train_mqar_run", lambda *a, **k: (calls.append((a[1], a[2])), real(*a, **k))[1])
    record = run_mqar(**args)
    assert calls == [("kda", 0), ("kda", 1)] and len(record["runs"]) == 4


def test_pair_mix_trains_on_easier_sequences_of_the_level():
    level = MQARConfig(vocab_size=64, num_pairs=8, seq_len=32, num_queries=6)
    mix = MQARTrainConfig(pair_mix=[0.125, 0.5, 1.0]).levels(level)
    assert [(lv.num_pairs, lv.queries, lv.seq_len, lv.vocab_size) for lv in mix] == [(1, 1, 32, 64), (4, 4, 32, 64),
                                                                                      (8, 6, 32, 64)]
    with pytest.raises(ValueError, match="field 'pair_mix' expected a non-empty list of fractions in"):
        MQARTrainConfig(pair_mix=(0.0, 1.0))


def test_bad_grid_arguments(tmp_path):
    level = MQARConfig(vocab_size=16, num_pairs=2, seq_len=10)
    common = dict(model=MQARModelConfig(), train=MQARTrainConfig(), evaluation=MQAREvalConfig(), out=tmp_path)
    with pytest.raises(ValueError, match="argument 'mixers' expected distinct names"):
        run_mqar((level,), mixers=("gdn2", "lstm"), **common)
    with pytest.raises(ValueError, match="argument 'levels' expected distinct levels"):
        run_mqar((level, level), mixers=("gdn2",), **common)
    with pytest.raises(ValueError, match="field 'seeds' expected a non-empty list of distinct ints"):
        MQARTrainConfig(seeds=(0, 0))
    with pytest.raises(ValueError, match="field 'attn_head_dim' expected an even int"):
        MQARModelConfig(attn_head_dim=7)
    assert not (tmp_path / "mqar.json").exists()


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_mqar_recipe_loads(path):
    recipe = yaml.safe_load(path.read_text())
    levels = [MQARConfig(**lv) for lv in recipe["levels"]]
    model = MQARModelConfig(**recipe["model"])
    train = MQARTrainConfig(**recipe["train"])
    MQAREvalConfig(**recipe["evaluation"])
    for mixer in recipe["mixers"]:
        model.lm_config(mixer, levels[0].vocab_size)
    if path.stem == "paper":
        # the paper's comparison: every mixer at one recurrent state size, three seeds, two levels or more
        assert set(MQAR_MIXERS) <= set(recipe["mixers"]) and len(train.seeds) >= 3 and len(levels) >= 2
        assert all(m in RECURRENT_MIXERS for m in MQAR_MIXERS)


def test_recipes_present():
    assert {p.stem for p in RECIPES} >= {"tiny", "paper"}


@pytest.mark.gpu
def test_tiny_recipe_on_cuda_with_bf16(tmp_path):
    """The GPU path of the harness: batches drawn on the device, bf16 autocast, the Triton kernels."""
    main(_tiny_args(tmp_path, "--device", "cuda", "--mixers", "[gdn2, kda, mamba2, swa]"))
    record = json.loads((tmp_path / "mqar.json").read_text())
    assert record["device"].startswith("cuda") and len(record["runs"]) == 4
    assert all(0 <= r["accuracy"] <= 1 and r["loss"] is not None for r in record["runs"].values())
