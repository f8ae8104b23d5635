"""FSDP's pieces in one process: the meta-device initialization equals the CPU model, the data shares give the
same steps on any number of processes, sharded checkpoints round-trip, the strategies and settings, refusals.
The multi-process runs (gloo) are in test_lm_fsdp_gloo.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from gdn2ts.lm import checkpoint as ckpt
from gdn2ts.lm import load_recipe
from gdn2ts.lm.data import PackedBlocks
from gdn2ts.lm.generate import load_lm, read_lm_config
from gdn2ts.lm.meta_init import InitReplay
from gdn2ts.lm.optim import OptimConfig, build_optimizer
from gdn2ts.lm.sharding import LMFSDPStrategy, fsdp2_strategy, fsdp_strategy
from gdn2ts.lm.shares import ShareReader, check_layout
from gdn2ts.lm.sources import Documents
from gdn2ts.lm.tokenizer import load_tokenizer
from gdn2ts.lm.train import TrainError, fit_lm, make_fabric
from gdn2ts.lm.train_config import TrainConfig
from gdn2ts.models.lm import CausalLM, LMBlock
from gdn2ts.models.lm_config import MIXERS

TINY = dataclasses.replace(load_recipe("tiny_gdn2"), vocab_size=258)
DOCS = Documents([f"line {i}: " + "to be or not to be " * (i % 5 + 1) for i in range(120)])


def _blocks() -> PackedBlocks:
    return PackedBlocks(DOCS, load_tokenizer("bytes"), 16, repeat=True)


@pytest.mark.parametrize("mixer", MIXERS)
def test_meta_init_equals_the_model_built_on_the_cpu(mixer):
    # every mixer beside sliding-window attention (a hybrid); bit for bit, and the generator left as building leaves it
    cfg = dataclasses.replace(load_recipe("tiny_gdn2"), cell=(mixer, "swa"))
    with torch.device("meta"):
        meta = CausalLM(cfg)
    torch.manual_seed(7)
    replay = InitReplay(meta)
    after_replay = torch.get_rng_state()
    torch.manual_seed(7)
    ref = CausalLM(cfg)
    assert torch.equal(replay.final_state, torch.get_rng_state())
    assert torch.equal(after_replay, torch.manual_seed(7).get_state())  # the global generator untouched
    got = {}
    for unit, _ in reversed(replay.units):  # any order: each unit is rebuilt from its own recorded state
        got.update(replay.unit_values(unit))
    assert got.keys() == dict(ref.named_parameters()).keys()
    for name, p in ref.named_parameters():
        assert torch.equal(got[name], p), name
    assert all(p.is_meta for p in meta.parameters())  # the model itself is not touched


class _NoReset(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))  # set by the constructor alone: nothing can redo it


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.reset_parameters()

    def reset_parameters(self):
        with torch.no_grad():
            self.lin.weight.mul_(0.5)  # depends on the values before: not a whole-tensor fill


def test_meta_init_refuses_what_it_cannot_redo():
    with torch.device("meta"):
        no_reset, scaled = nn.Sequential(_NoReset()), _Scaled()
    with pytest.raises(ValueError, match=r"'0.w' is not written by any reset_parameters"):
        InitReplay(no_reset).unit_values("0")
    with pytest.raises(ValueError, match=r"_Scaled.reset_parameters\(\) runs aten.mul_.Tensor on lin.weight"):
        InitReplay(scaled)
    with pytest.raises(ValueError, match="on the meta device"):
        InitReplay(nn.Sequential(nn.Linear(2, 2)))
    with torch.device("meta"):
        tied = nn.Sequential(nn.Embedding(4, 2), nn.Linear(2, 4))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="shared by '0' and '1'"):
        InitReplay(tied)


def _read(reader: ShareReader, steps: int) -> list[list[list[int]]]:
    # each step's micro-batches as lists of block ids (their first tokens identify them)
    return [[[int(b["input_ids"][:8].sum()) * 1000 + int(b["position"][2:].sum()) for b in micro]
             for micro in reader.step()] for _ in range(steps)]


def test_shares_give_the_same_steps_on_any_number_of_processes():
    data = _blocks()
    # 4 shares: 4 processes x 1 micro-batch of 1 block, 2 x 2 micro-batches, 1 x 4 micro-batches: one step's
    # micro-batches in process-major order are the same
    layouts = {}
    for world, accum in ((4, 1), (2, 2), (1, 4)):
        readers = [ShareReader(data, 4, r, world, batch_size=1, grad_accum=accum) for r in range(world)]
        steps = [_read(r, 3) for r in readers]
        layouts[world] = [[m for rank in steps for m in rank[s]] for s in range(3)]
    assert layouts[4] == layouts[2] == layouts[1]
    # a share split across micro-batches: 2 shares, one process with batches of 1 block, 4 micro-batches
    two = ShareReader(data, 2, 0, 2, batch_size=2, grad_accum=1)
    one = ShareReader(data, 2, 0, 1, batch_size=1, grad_accum=4)
    assert [m for s in _read(two, 2) for m in s][0] == [b for m in _read(one, 1)[0][:2] for b in m]
    # positions round-trip: a reader continued from another's states reads on from there
    a = ShareReader(data, 2, 0, 1, batch_size=2, grad_accum=1)
    _read(a, 2)
    b = ShareReader(data, 2, 0, 1, batch_size=2, grad_accum=1)
    b.load([a.states()[0], a.states()[1]])
    assert _read(b, 1) == _read(a, 1)
    with pytest.raises(TrainError, match="3 processes cannot split evenly"):
        check_layout(4, 3, 1, 1)
    with pytest.raises(TrainError, match="which 4 data shares cannot supply evenly"):
        check_layout(4, 2, 1, 1)
    with pytest.raises(TrainError, match="holds 1 data positions, the run reads 2"):
        ShareReader(data, 2, 0, 1, 1, 2).load([a.states()[0]])
    with pytest.raises(TrainError, match=r"position 1 is of share\(s\) \[0\] of 2"):
        ShareReader(data, 2, 0, 1, 1, 2).load([a.states()[0], a.states()[0]])


def test_sharded_checkpoint_round_trip_and_refusals(tmp_path):
    torch.manual_seed(0)
    model = CausalLM(TINY)
    opt = build_optimizer(model, OptimConfig())
    model(torch.randint(0, 258, (2, 16)))[0].float().pow(2).mean().backward()
    opt.step()
    ckpt.save_sharded(tmp_path / "a.ckpt", model, opt, {"step": 1, "config": {"model": {"x": (1, 2)}}})
    files = sorted(p.name for p in (tmp_path / "a.ckpt").iterdir())
    # one file per unit (embedding, two blocks, final norm, head) of this process, and the plain values
    assert files == [f"shard-00001-model-0000{u}-of-00005.safetensors" for u in range(1, 6)] + ["state.json"]
    other = CausalLM(TINY)
    other_opt = build_optimizer(other, OptimConfig())
    plain = ckpt.load_sharded(tmp_path / "a.ckpt", other, other_opt)
    assert plain["step"] == 1 and plain["config"] == {"model": {"x": [1, 2]}}  # JSON: tuples come back as lists
    for (name, p), q in zip(model.named_parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q), name
        assert all(torch.equal(opt.state[p][k], other_opt.state[q][k]) for k in opt.state[p]), name
    assert other_opt.param_groups[0]["betas"] == (0.9, 0.95)  # a tuple again
    whole = ckpt.read_checkpoint(tmp_path / "a.ckpt")
    assert all(torch.equal(whole["model"][n], p) for n, p in model.named_parameters())
    # a full file loads into a fresh pair too, and so does one of the earlier format, whose optimizer state is
    # numbered as optimizer.state_dict() gives it
    ckpt.save_full(tmp_path / "b.ckpt", model, opt, {"step": 1})
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 2}, tmp_path / "old.ckpt")
    for name, step in (("b.ckpt", 1), ("old.ckpt", 2)):
        third = CausalLM(TINY)
        third_opt = build_optimizer(third, OptimConfig())
        assert ckpt.load_full(tmp_path / name, third, third_opt)["step"] == step
        for p, q in zip(model.parameters(), third.parameters(), strict=True):
            assert torch.equal(p, q) and torch.equal(opt.state[p]["exp_avg_sq"], third_opt.state[q]["exp_avg_sq"])
    (tmp_path / "a.ckpt" / "state.json").unlink()
    with pytest.raises(ValueError, match="not a complete sharded checkpoint"):
        ckpt.load_sharded(tmp_path / "a.ckpt", other, other_opt)
    bigger = CausalLM(dataclasses.replace(TINY, hidden_size=48))
    ckpt.save_sharded(tmp_path / "c.ckpt", model, opt, {"step": 1})
    with pytest.raises(ValueError, match="does not fit this model"):
        ckpt.load_sharded(tmp_path / "c.ckpt", bigger, build_optimizer(bigger, OptimConfig()))


def test_replace_never_leaves_no_checkpoint(tmp_path):
    target = tmp_path / "last.ckpt"
    assert ckpt.latest(tmp_path) is None
    (tmp_path / "new").mkdir()
    ckpt.replace(tmp_path / "new", target)  # a folder where nothing was
    assert target.is_dir() and ckpt.latest(tmp_path) == target
    (tmp_path / "file").write_text("x")
    ckpt.replace(tmp_path / "file", target)  # a file where a folder was
    assert target.read_text() == "x" and not (tmp_path / "last.ckpt.old").exists()
    # a save cut off between its two renames leaves only <name>.old: resume reads that
    target.rename(tmp_path / "last.ckpt.old")
    assert ckpt.latest(tmp_path) == tmp_path / "last.ckpt.old"


def test_one_process_sharded_run_resumes_and_loads_for_generation(tmp_path):
    # a sharded checkpoint written by one process: resumed (on its own share count) equal to a straight run,
    # and read by load_lm / read_lm_config like a full one
    def run(out, stop_at=None, checkpoint="auto", **kw):
        train = TrainConfig(batch_size=2, grad_accum=2, max_steps=4, stop_at=stop_at, log_every=1, val_every=None,
                            accelerator="cpu", precision="32-true", checkpoint=checkpoint, **kw)
        return fit_lm(TINY, _blocks(), OptimConfig(lr=3e-3, warmup_steps=1), train, tmp_path / out, quiet=True,
                      resume="auto")

    run("straight", data_shares=2)
    run("split", stop_at=2, checkpoint="sharded", data_shares=2)
    assert (tmp_path / "split" / "last.ckpt" / "state.json").is_file()
    summary = run("split")  # the shares come from the checkpoint; this launch writes a full file
    assert summary["steps"] == 4 and summary["peak_memory_gib"] > 0 and summary["setup_seconds"] > 0
    a = torch.load(tmp_path / "straight" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.ckpt", weights_only=True)
    assert all(torch.equal(w, b["model"][n]) for n, w in a["model"].items())
    assert a["data"] == b["data"] and len(a["data"]) == 2 and a["optimizer"]["state"].keys() == b["optimizer"][
        "state"].keys()
    run("sharded", checkpoint="sharded")
    model, config = load_lm(tmp_path / "sharded" / "last.ckpt")
    assert read_lm_config(tmp_path / "sharded" / "last.ckpt") == TINY and config["model"]["cell"] == ["gdn2"]
    with pytest.raises(TrainError, match="keep batch_size x grad_accum x processes"):
        fit_lm(TINY, _blocks(), OptimConfig(), TrainConfig(batch_size=2, max_steps=4, accelerator="cpu"),
               tmp_path / "split", resume="auto", quiet=True)
    with pytest.raises(TrainError, match="reads the data in 2 shares, train.data_shares is 4"):
        fit_lm(TINY, _blocks(), OptimConfig(), TrainConfig(batch_size=2, grad_accum=2, max_steps=4,
                                                           accelerator="cpu", data_shares=4),
               tmp_path / "split", resume="auto", quiet=True)


def test_settings_and_strategies():
    with pytest.raises(ValueError, match="NO_SHARD is data parallel"):
        TrainConfig(strategy="fsdp2", fsdp_sharding="NO_SHARD")
    for field, bad in (("checkpoint", "zip"), ("num_nodes", 0), ("data_shares", 0), ("strategy", "fsdp3")):
        with pytest.raises(ValueError, match=f"field '{field}'"):
            TrainConfig(**{field: bad})
    cfg = TrainConfig(strategy="fsdp2", devices=4, num_nodes=2)
    assert cfg.world_size == 8 and cfg.sharded_checkpoints
    assert not TrainConfig(strategy="ddp").sharded_checkpoints and TrainConfig(checkpoint="sharded").sharded_checkpoints
    s = fsdp_strategy(TrainConfig(strategy="fsdp", activation_checkpointing=True, fsdp_sharding="SHARD_GRAD_OP"))
    assert isinstance(s, LMFSDPStrategy) and s.sharding_strategy.name == "SHARD_GRAD_OP"
    assert s._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {LMBlock}
    hybrid = fsdp2_strategy(dataclasses.replace(cfg, fsdp_sharding="HYBRID_SHARD"))
    assert (hybrid._data_parallel_size, hybrid._tensor_parallel_size) == (2, 4)
    fabric = make_fabric(TrainConfig(strategy="ddp", devices=2, num_nodes=3, accelerator="cpu"))
    assert fabric.strategy.num_nodes == 3
    # FSDP1 runs on the CPU: Fabric accepts the strategy there (it refuses Lightning's own class off the GPU)
    fabric = make_fabric(TrainConfig(strategy="fsdp", devices=2, accelerator="cpu"))
    assert isinstance(fabric.strategy, LMFSDPStrategy)
