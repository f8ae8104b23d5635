"""The CPU round trip of the LM commands: train the tiny recipe on tiny Shakespeare, stop, resume, plot the
learning curves, generate; and the throughput mode."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from gdn2ts.cli import main

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "tasks" / "lm" / "train" / "tiny_shakespeare.yaml"
SHAKESPEARE = ROOT.parent / "shared" / "data" / "text" / "tinyshakespeare.txt"


def test_train_stop_resume_generate(tmp_path, monkeypatch, capsys):
    assert SHAKESPEARE.is_file(), f"the tiny recipe reads {SHAKESPEARE} (../shared beside the repository)"
    monkeypatch.chdir(ROOT)  # the recipe's data path is relative to the repository root
    out = tmp_path / "run"
    args = ["lm", "train", str(RECIPE), "--out", str(out), "--train.max_steps", "8", "--train.log_every", "2",
            "--train.val_every", "4", "--quiet", "true"]
    main([*args, "--train.stop_at", "4"])
    first = torch.load(out / "last.ckpt", weights_only=True)
    assert first["step"] == 4 and first["config"]["data"]["tokenizer"] == "bytes"
    main(args)  # resume: auto
    ckpt = torch.load(out / "last.ckpt", weights_only=True)
    assert ckpt["step"] == 8 and ckpt["tokens"] == 8 * 8 * 64 and ckpt["scheduler"]["last_epoch"] == 8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["tokens_per_s"] > 0 and summary["val_ppl"] < 258
    rows = []
    for version in sorted((out / "logs").iterdir()):
        with open(version / "metrics.csv") as f:
            rows += list(csv.DictReader(f))
    logged = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert logged == [2, 4, 6, 8] and all(float(r["tokens_per_s"]) > 0 for r in rows if r.get("train/loss"))
    assert [int(r["step"]) for r in rows if r.get("val/ppl")] == [4, 8]
    figure = tmp_path / "curves.png"
    capsys.readouterr()
    main(["lm", "curves", "--runs", f"[{out}]", "--out", str(figure), "--metrics", "[train/loss, val/ppl]"])
    table = capsys.readouterr().out
    assert figure.stat().st_size > 0 and "| run | steps |" in table and "| run | 8 |" in table
    main(["lm", "generate", "--checkpoint", str(out / "last.ckpt"), "--prompt", "ROMEO:", "--max_new_tokens",
          "20", "--temperature", "0"])
    text = capsys.readouterr().out
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")


def test_generate_and_train_errors_exit_with_a_message(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="checkpoint file"):
        main(["lm", "generate", "--checkpoint", str(tmp_path / "missing.ckpt")])
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit, match="vocab_size"):
        main(["lm", "train", str(RECIPE), "--out", str(tmp_path), "--vocab_size", "64", "--quiet", "true"])


def test_throughput_mode_writes_a_record(tmp_path):
    path = tmp_path / "tp.json"
    main(["lm", "throughput", "--model", "tiny_swa_gdn2", "--seq_len", "[16, 32]", "--tokens_per_step", "64",
          "--steps", "2", "--warmup", "1", "--device", "cpu", "--json", str(path), "--quiet", "true"])
    records = json.loads(path.read_text())
    assert [r["seq_len"] for r in records] == [16, 32] and [r["rows_per_step"] for r in records] == [4, 2]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in records)
    with pytest.raises(SystemExit, match="micro_tokens"):
        main(["lm", "throughput", "--model", "tiny_gdn2", "--seq_len", "[24]", "--tokens_per_step", "64",
              "--device", "cpu", "--quiet", "true"])


@pytest.mark.parametrize("name", ["tiny_shakespeare", "gdn2_1.3B_fineweb"])
def test_the_command_reads_a_recipe_as_load_train_recipe_does(name, monkeypatch):
    """``gdn2ts lm train RECIPE`` and :func:`load_train_recipe` read a recipe by the same parser: the same
    TrainRecipe, and a command-line override changes only its field."""
    import dataclasses

    import gdn2ts.lm.train_recipe as train_recipe

    seen = []
    monkeypatch.setattr(train_recipe, "run_recipe", lambda recipe, resume, quiet: seen.append(recipe) or {})
    path = train_recipe.TRAIN_RECIPE_DIR / f"{name}.yaml"
    main(["lm", "train", str(path), "--quiet", "true"])
    main(["lm", "train", str(path), "--train.max_steps", "8", "--quiet", "true"])
    loaded = train_recipe.load_train_recipe(name)
    assert seen[0] == loaded
    assert seen[1] == dataclasses.replace(loaded, train=dataclasses.replace(loaded.train, max_steps=8))
