"""gdn2ts lm export: a checkpoint written by gdn2ts lm train (the tiny hybrid recipe, a few steps on tiny
Shakespeare) becomes a transformers folder whose model scores and generates exactly as the checkpoint's own; bad
checkpoints and folders are refused with a message."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gdn2ts.cli import main
from gdn2ts.hf import GDN2TSForCausalLM, export_checkpoint
from gdn2ts.lm.generate import load_lm

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "tasks" / "lm" / "train" / "tiny_shakespeare.yaml"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)  # the recipe's data path is relative to the repository root
        main(["lm", "train", str(RECIPE), "--model", "tiny_swa_gdn2", "--out", str(out), "--train.max_steps", "3",
              "--train.log_every", "1", "--train.val_every", "3", "--quiet", "true"])
    return out / "last.ckpt"


def test_export_of_a_trained_checkpoint_loads_and_generates_as_the_checkpoint(checkpoint, tmp_path, capsys):
    folder = tmp_path / "hf"
    main(["lm", "export", str(checkpoint), str(folder)])
    assert "lm export:" in capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert isinstance(model, GDN2TSForCausalLM) and model.model.config.cell == ("gdn2", "swa")
    assert (model.config.eos_token_id, model.config.bos_token_id) == (257, 256)  # the byte tokenizer's
    own, _ = load_lm(checkpoint)
    for (name, p), (_, q) in zip(own.state_dict().items(), model.model.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    prompt = torch.tensor([[257] + list(b"ROMEO:")])
    assert torch.equal(model(prompt).logits, own(prompt)[0])
    # past the window of 8; generation stops early only at EOS, which the tokens say
    out = model.generate(prompt, max_new_tokens=12, do_sample=False)
    want = own.generate(prompt, 12)
    n = out.shape[1]
    assert torch.equal(out, want[:, :n]) and (n == want.shape[1] or out[0, -1] == 257)


def test_export_in_bfloat16_halves_the_weights(checkpoint, tmp_path):
    model = export_checkpoint(checkpoint, tmp_path / "bf16", dtype="bfloat16")
    loaded = GDN2TSForCausalLM.from_pretrained(tmp_path / "bf16")
    assert loaded.dtype == torch.bfloat16 and model.model.embed.weight.dtype == torch.bfloat16
    full = export_checkpoint(checkpoint, tmp_path / "fp32")
    size = {d: (tmp_path / d / "model.safetensors").stat().st_size for d in ("bf16", "fp32")}
    assert size["bf16"] < 0.6 * size["fp32"] and full.dtype == torch.float32


def test_export_refuses_what_is_not_a_checkpoint(checkpoint, tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="gdn2ts lm export: .*notes.ckpt' is not a checkpoint of gdn2ts lm train"):
        main(["lm", "export", str(text), str(tmp_path / "out")])
    other = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(SystemExit, match="is not an LM training checkpoint"):
        main(["lm", "export", str(other), str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="checkpoint file"):
        main(["lm", "export", str(tmp_path / "missing.ckpt"), str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="'out_dir' expected a folder"):
        main(["lm", "export", str(checkpoint), str(text)])
    with pytest.raises(ValueError, match="'dtype' expected one of"):
        export_checkpoint(checkpoint, tmp_path / "x", dtype="int8")
    assert not (tmp_path / "out").exists() and not (tmp_path / "x").exists()
