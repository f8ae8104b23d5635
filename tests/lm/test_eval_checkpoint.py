"""Evaluation from a `gdn2ts lm train` checkpoint alone: `gdn2ts lm eval` rebuilds the model from the configuration
saved with the weights, reproduces the run's own validation loss on its held-out documents, scores a text file,
and runs lm-evaluation-harness tasks; the harness route `recipe=...,weights=last.ckpt` builds the trained model
(the training recipe's vocabulary, not the model recipe's)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
from choice_task import write_choice_task

from gdn2ts.cli import main
from gdn2ts.lm.eval import perplexity
from gdn2ts.lm.eval.checkpoint import evaluate_checkpoint, held_out_blocks, kept_generators
from gdn2ts.lm.eval.harness import model_from_args
from gdn2ts.lm.generate import load_lm

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "tasks" / "lm" / "train" / "tiny_shakespeare.yaml"
SHAKESPEARE = ROOT.parent / "shared" / "data" / "text" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A checkpoint of `gdn2ts lm train` on the tiny recipe: 6 steps, validation on 8 held-out blocks at the end."""
    assert SHAKESPEARE.is_file(), f"the tiny recipe reads {SHAKESPEARE} (../shared beside the repository)"
    out = tmp_path_factory.mktemp("lm") / "run"
    here = Path.cwd()
    os.chdir(ROOT)  # the recipe's data path is relative to the repository root
    try:
        main(["lm", "train", str(RECIPE), "--out", str(out), "--train.max_steps", "6", "--train.val_every", "6",
              "--train.val_blocks", "8", "--quiet", "true"])
    finally:
        os.chdir(here)
    return out


def _val_loss(out: Path) -> float:
    rows = []
    for version in sorted((out / "logs").iterdir()):
        with open(version / "metrics.csv") as f:
            rows += [r for r in csv.DictReader(f) if r.get("val/loss")]
    return float(rows[-1]["val/loss"])


def test_eval_command_reproduces_the_runs_validation_loss(run, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    tmp = run.parent / "eval.json"
    main(["lm", "eval", str(run / "last.ckpt"), "--max_blocks", "8", "--json", str(tmp)])
    record = json.loads(tmp.read_text())
    p = record["perplexity"]
    assert record["tokenizer"] == "bytes" and record["model"] == "tiny_gdn2"
    assert p["source"] == "held-out split" and p["blocks"] == 8 and p["tokens"] == 8 * 64
    # the same documents, the same model: the loss training logged at its last validation
    assert p["nll"] == pytest.approx(_val_loss(run), rel=1e-5)
    assert "perplexity" in capsys.readouterr().out
    # and the same as scoring those blocks by hand
    model, config = load_lm(run / "last.ckpt")
    direct = perplexity(model, held_out_blocks(config, 8))
    assert direct.nll == pytest.approx(p["nll"], rel=1e-12)


def test_eval_scores_a_text_file_with_bits_per_byte(run, tmp_path):
    text = tmp_path / "speech.txt"
    text.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n" * 3)
    record = evaluate_checkpoint(run / "last.ckpt", text=text, block_len=32)
    p = record["perplexity"]
    assert p["bytes"] == len(text.read_bytes()) and 0 < p["bits_per_byte"] < 8 + 1e-9 and p["perplexity"] > 1


def test_eval_errors_name_the_problem(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the run's data paths do not resolve here
    with pytest.raises(SystemExit, match="gdn2ts lm eval: .*held-out split .* is empty|gdn2ts lm eval: .*paths"):
        main(["lm", "eval", str(run / "last.ckpt"), "--quiet", "true"])
    with pytest.raises(SystemExit, match="expected a checkpoint file"):
        main(["lm", "eval", str(tmp_path / "none.ckpt")])
    with pytest.raises(SystemExit, match="argument 'text' expected a text file"):
        main(["lm", "eval", str(run / "last.ckpt"), "--text", str(tmp_path / "none.txt")])
    weights = tmp_path / "w.pt"
    torch.save({"model": torch.load(run / "last.ckpt", weights_only=True)["model"]}, weights)
    with pytest.raises(SystemExit, match="not an LM training checkpoint"):
        main(["lm", "eval", str(weights)])


def test_harness_arguments_build_the_trained_model(run):
    ckpt = run / "last.ckpt"
    trained, config = load_lm(ckpt)
    # the documented route: the model recipe by name and the training checkpoint; the recipe has 64 tokens, the run
    # replaced them with the byte tokenizer's 258, and the checkpoint's configuration wins
    model, cfg = model_from_args(recipe="tiny_gdn2", weights=ckpt)
    assert model.config.vocab_size == 258 and cfg["data"]["tokenizer"] == "bytes"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values(),
                                                 strict=True))
    model, _ = model_from_args(checkpoint=ckpt)
    assert torch.equal(model.embed.weight, trained.embed.weight)
    with pytest.raises(ValueError, match=r"differs from recipe 'cpu_kda' in \[.*\]"):
        model_from_args(recipe="cpu_kda", weights=ckpt)
    with pytest.raises(ValueError, match="'checkpoint' expected alone"):
        model_from_args(recipe="tiny_gdn2", checkpoint=ckpt)
    with pytest.raises(ValueError, match="'checkpoint' or 'recipe' expected"):
        model_from_args()


def test_harness_tasks_from_a_checkpoint(run, tmp_path, monkeypatch):
    """lm_eval's evaluator through `gdn2ts lm eval --tasks` and through the registered class with
    `recipe=...,weights=last.ckpt` (the route docs/lm-eval.md documents), on a local two-choice task."""
    pytest.importorskip("lm_eval", reason="the optional lm-eval extra (pip install -e '.[lm-eval]')")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from gdn2ts.lm.eval import register_lm_eval

    rows = [{"q": "ROMEO: But soft, what light", "choices": [" through", " zzzz"], "label": 0},
            {"q": "First Citizen: Before we", "choices": [" qqqq", " proceed"], "label": 1}]
    write_choice_task(tmp_path, rows)
    monkeypatch.chdir(ROOT)
    record = evaluate_checkpoint(run / "last.ckpt", tasks=("tiny_choice",), include_path=tmp_path, max_blocks=2)
    acc = record["tasks"]["tiny_choice"]["acc,none"]
    cls = register_lm_eval()
    lm = cls(recipe="tiny_gdn2", weights=str(run / "last.ckpt"), device="cpu")
    with kept_generators():
        out = lm_eval.simple_evaluate(model=lm, tasks=["tiny_choice"], bootstrap_iters=0, log_samples=False,
                                      task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    assert out["results"]["tiny_choice"]["acc,none"] == acc
    with pytest.raises(ValueError, match="unknown harness task"):
        evaluate_checkpoint(run / "last.ckpt", tasks=("no_such_task",), include_path=tmp_path, max_blocks=1)
