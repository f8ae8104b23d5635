"""LM training: the optimizer's groups and schedule, FLOPs per token, exact resume, bad input (FSDP: test_lm_fsdp*)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from gdn2ts.lm import build_model, load_recipe
from gdn2ts.lm.curves import read_metrics
from gdn2ts.lm.data import PackedBlocks
from gdn2ts.lm.flops import flops_per_token, matmul_params, mfu, peak_flops
from gdn2ts.lm.optim import OptimConfig, WarmupCosine, build_optimizer, build_scheduler, no_decay_names
from gdn2ts.lm.sources import Documents
from gdn2ts.lm.tokenizer import load_tokenizer
from gdn2ts.lm.train import TrainError, fit_lm
from gdn2ts.lm.train_config import TrainConfig
from gdn2ts.lm.train_recipe import list_train_recipes, load_train_recipe, model_config
from gdn2ts.models.lm_config import LMConfig

TINY = dataclasses.replace(load_recipe("tiny_gdn2"), vocab_size=258)
DOCS = Documents([f"line {i}: " + "to be or not to be " * (i % 5 + 1) for i in range(300)])


def _blocks(block_len: int = 32) -> PackedBlocks:
    return PackedBlocks(DOCS, load_tokenizer("bytes"), block_len, repeat=True)


def test_weight_decay_spares_vectors_norms_and_decay_parameters():
    model = build_model(dataclasses.replace(load_recipe("tiny_gdn2"), cell=("gdn2", "mamba2")))
    model.blocks[0].mlp.up_proj.weight._no_weight_decay = True  # any marked parameter is spared too
    names = no_decay_names(model)
    params = dict(model.named_parameters())
    for name, p in params.items():
        vector = p.dim() < 2
        assert (name in names) == (vector or name == "blocks.0.mlp.up_proj.weight"), name
    assert {"blocks.0.mixer.A_log", "blocks.0.mixer.dt_bias", "blocks.1.mixer.D", "norm.weight",
            "blocks.0.mixer_norm.weight", "blocks.0.mixer.o_norm.weight", "blocks.0.mixer.g_proj.1.bias"} <= names
    assert "embed.weight" not in names and "lm_head.weight" not in names
    assert {"embed.weight", "lm_head.weight"} <= no_decay_names(model, decay_embeddings=False)
    opt = build_optimizer(model, OptimConfig())
    decay, keep = opt.param_groups
    assert decay["weight_decay"] == 0.1 and keep["weight_decay"] == 0.0
    assert {id(p) for p in keep["params"]} == {id(params[n]) for n in names}
    assert len(decay["params"]) + len(keep["params"]) == len(params)
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["lr"] == 4e-4


def test_warmup_then_cosine_to_a_tenth():
    model = build_model("tiny_gdn2")
    cfg = OptimConfig(lr=1e-3, warmup_steps=4)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[-1] == pytest.approx(1e-4) and min(lrs[4:]) == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))  # never rises after the warmup
    assert lrs[4 + 15 // 2] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 7 / 15)))
    assert WarmupCosine(0, 1, 0.1)(0) == 1.0


def test_flops_per_token_formula():
    # an attention-only model: 6 x matmul weights + 12 x heads x head_dim x mean context
    cfg = LMConfig(vocab_size=10, hidden_size=8, num_cells=1, cell=("attention",), intermediate_size=16,
                   attn_num_heads=2, attn_head_dim=4)
    weights = 4 * 8 * 8 + 3 * 8 * 16 + 8 * 10  # q, k, v, o; the MLP; the head (not the embedding)
    assert matmul_params(cfg) == weights
    assert flops_per_token(cfg, 5) == 6 * weights + 12 * 2 * 4 * 3.0  # mean context (1+2+3+4+5)/5 = 3
    swa = dataclasses.replace(cfg, cell=("swa",), window=2)
    assert flops_per_token(swa, 5) == 6 * weights + 12 * 2 * 4 * (1 + 2 * 4) / 5
    # a recurrent model adds 3 x HV x (6KV + 2C(3K + 2V) + C^2/3) per layer
    rec = load_recipe("tiny_gdn2")
    per_layer = 3 * 2 * (6 * 64 + 2 * 64 * (3 * 8 + 2 * 8) + 64 * 64 / 3)
    assert flops_per_token(rec, 100) == pytest.approx(6 * matmul_params(rec) + 2 * per_layer)
    assert mfu(1e9, 1e3, 2e12) == 0.5 and mfu(1e9, 1e3, None) is None
    assert peak_flops("cpu") is None and peak_flops("cpu", 2.0) == 2e12
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(rec, 0)


def _train(out, steps: int, stop_at: int | None = None, resume=None) -> dict:
    train = TrainConfig(batch_size=2, grad_accum=2, max_steps=steps, stop_at=stop_at, log_every=2, val_every=3,
                        val_blocks=2, accelerator="cpu", precision="32-true")
    return fit_lm(TINY, _blocks(), OptimConfig(lr=3e-3, warmup_steps=2), train, out, resume=resume,
                  val_data=PackedBlocks(DOCS, load_tokenizer("bytes"), 32),
                  quiet=True)


def test_resume_continues_the_same_run_exactly(tmp_path):
    _train(tmp_path / "straight", 6)
    first = _train(tmp_path / "split", 6, stop_at=3)
    assert first["steps"] == 3
    second = _train(tmp_path / "split", 6, resume="auto")
    assert second["steps"] == 6 and second["tokens"] == 6 * 2 * 2 * 32
    a = torch.load(tmp_path / "straight" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.ckpt", weights_only=True)
    for name, w in a["model"].items():
        assert torch.equal(w, b["model"][name]), name
    for i, s in a["optimizer"]["state"].items():
        assert torch.equal(s["exp_avg_sq"], b["optimizer"]["state"][i]["exp_avg_sq"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 6
    assert a["data"] == b["data"] and a["step"] == b["step"] == 6
    # the weights moved, and the split run's logs cover both launches
    assert not torch.equal(a["model"]["embed.weight"], build_model(TINY).embed.weight)
    versions = sorted((tmp_path / "split" / "logs").iterdir())
    assert len(versions) == 2 and all((v / "metrics.csv").is_file() for v in versions)


def test_bad_runs_are_named(tmp_path):
    with pytest.raises(ValueError, match="'max_steps' or 'max_tokens'"):
        TrainConfig(max_steps=None)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="betas"):
        OptimConfig(betas=(0.9, 1.5))
    with pytest.raises(TrainError, match="block_len"):
        fit_lm(TINY, _blocks(), OptimConfig(), TrainConfig(max_steps=None, max_tokens=100), tmp_path, quiet=True)
    with pytest.raises(TrainError, match="resumable dataset"):
        fit_lm(TINY, [], OptimConfig(), TrainConfig(max_steps=1), tmp_path, quiet=True)
    with pytest.raises(TrainError, match="'optim' expected OptimConfig, got dict"):
        fit_lm(TINY, _blocks(), {"lr": 1e-3}, TrainConfig(max_steps=1), tmp_path, quiet=True)
    assert not any(tmp_path.iterdir())  # nothing written by the refused runs
    train = TrainConfig(batch_size=2, max_steps=1, accelerator="cpu", val_every=None)
    fit_lm(TINY, _blocks(), OptimConfig(), train, tmp_path / "a", quiet=True)
    other = dataclasses.replace(TINY, hidden_size=16)
    with pytest.raises(TrainError, match="another model"):
        fit_lm(other, _blocks(), OptimConfig(), train, tmp_path / "a", resume="auto", quiet=True)
    with pytest.raises(TrainError, match="ran out"):
        fit_lm(TINY, PackedBlocks(Documents(["short"]), load_tokenizer("bytes"), 4), OptimConfig(), train,
               tmp_path / "b", quiet=True)
    recipe = dataclasses.replace(load_train_recipe("tiny_shakespeare"), vocab_size=100)
    with pytest.raises(ValueError, match="vocab_size >= 258"):
        model_config(recipe, tokenizer_vocab=258)


def test_every_training_recipe_loads():
    names = list_train_recipes()
    assert {"tiny_shakespeare", "small_shakespeare", "gdn2_1.3B_fineweb", "swa_gdn2_1.3B_fineweb"} <= set(names)
    for name in names:
        recipe = load_train_recipe(name)
        cfg = model_config(recipe)
        assert cfg.vocab_size >= (258 if recipe.data.tokenizer == "bytes" else 32000)
    paper = load_train_recipe("gdn2_1.3B_fineweb")
    assert paper.train.tokens_per_step(paper.data.block_len, paper.train.devices) == 128 * 4096
    assert (paper.optim.lr, paper.optim.betas, paper.optim.weight_decay) == (4e-4, (0.9, 0.95), 0.1)
    assert paper.train.total_steps(4096, 8) == math.ceil(100e9 / (128 * 4096))


def test_accumulation_equals_one_big_batch_and_budget_sets_the_steps(tmp_path):
    # two micro-batches of 2 blocks accumulate to the gradient of one batch of 4 (every label counts)
    runs = {}
    for name, batch, accum in (("big", 4, 1), ("accum", 2, 2)):
        train = TrainConfig(batch_size=batch, grad_accum=accum, max_steps=None, max_tokens=500, accelerator="cpu",
                            precision="32-true", val_every=None, peak_tflops=1e-3, log_every=1)
        runs[name] = fit_lm(TINY, _blocks(), OptimConfig(warmup_steps=1), train, tmp_path / name, block_len=32,
                            quiet=True)
        assert runs[name]["steps"] == 4  # ceil(500 / (4 x 32))
    a = torch.load(tmp_path / "big" / "last.ckpt", weights_only=True)["model"]
    b = torch.load(tmp_path / "accum" / "last.ckpt", weights_only=True)["model"]
    for name, w in a.items():
        torch.testing.assert_close(w, b[name], rtol=1e-5, atol=1e-6, msg=name)
    # Adam hides a gradient's scale from the weights: the logged gradient norms and losses show it
    big, acc = read_metrics(tmp_path / "big"), read_metrics(tmp_path / "accum")
    for col in ("grad_norm", "train/loss"):
        assert big[col].to_list() == pytest.approx(acc[col].to_list(), rel=1e-5), col
    # with a peak given, the MFU is logged: flops/token x tokens/s / peak
    s = runs["big"]
    assert s["mfu"] == pytest.approx(s["flops_per_token"] * s["tokens_per_s"] / 1e9)
    assert s["flops_per_token"] == flops_per_token(TINY, 32)


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    # about two minutes on a 2-core CPU: inductor compiles the forward and the backward
    weights = {}
    for compiled in (False, True):
        train = TrainConfig(batch_size=2, max_steps=2, accelerator="cpu", precision="32-true", val_every=None,
                            compile=compiled)
        fit_lm(TINY, _blocks(), OptimConfig(warmup_steps=1), train, tmp_path / str(compiled), quiet=True)
        weights[compiled] = torch.load(tmp_path / str(compiled) / "last.ckpt", weights_only=True)["model"]
    assert weights[True].keys() == weights[False].keys()  # plain names, no compile prefix
    for name, w in weights[False].items():
        torch.testing.assert_close(weights[True][name], w, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize(("text", "message"), [
    ("model: tiny_gdn2\ndata: {paths: [a.txt], tokenizr: bytes}\n", "does not accept option 'data.tokenizr'"),
    ("model: tiny_gdn2\ndata: {paths: [a.txt]}\noptimizer: {lr: 1.0}\n", "does not accept option 'optimizer.lr'"),
    ("data: {paths: [a.txt]}\n", "required: recipe.model"),
    ("model: tiny_gdn2\ndata: {paths: [a.txt]}\ntrain: {max_steps: many}\n", "recipe.train.max_steps"),
    ("model: tiny_gdn2\ndata: {paths: [a.txt]}\noptim: {betas: [0.9, 2.0]}\n", "OptimConfig: field 'betas'"),
    ("model: tiny_gdn2\ndata: {source: text}\n", "DataConfig: field 'paths'"),
])
def test_train_recipe_errors_name_the_field_and_the_file(tmp_path, text, message):
    """The one loader (jsonargparse, as ``gdn2ts lm train --config``) refuses unknown, missing and mistyped fields
    and passes on the sections' own checks, naming the file."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        load_train_recipe(path)
    assert str(path) in str(err.value)
    with pytest.raises(ValueError, match="expected a YAML path or one of"):
        load_train_recipe("no_such_recipe")
