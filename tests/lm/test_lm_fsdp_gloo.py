"""FSDP on two CPU processes (gloo), through the command as on a GPU machine: ``gdn2ts lm train --train.devices
2`` (Lightning starting the second process, or both started as torchrun would), sharded checkpoints, and a resume
on another number of processes that continues exactly the run one process would have trained uninterrupted.

The tiny recipe on tiny Shakespeare, 6 steps of 16 blocks of 64 bytes: two processes of 8 blocks read data shares
0 and 1, one process with ``grad_accum: 2`` reads share 0 then share 1 (``--train.data_shares 2`` for the
uninterrupted run; a resumed run takes the shares from its checkpoint).
"""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gdn2ts.cli import main

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "tasks" / "lm" / "train" / "tiny_shakespeare.yaml"
COMMON = ["--train.max_steps", "6", "--train.log_every", "1", "--train.val_every", "3", "--quiet", "true"]
ONE = ["--train.grad_accum", "2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _launch(args: list[str], external: bool = False, timeout: float = 240) -> None:
    """``python -m gdn2ts.cli lm train RECIPE ARGS --train.devices 2`` on gloo: one command whose Lightning starts
    the second process, or (``external``) both processes started here with ``LOCAL_RANK`` / ``WORLD_SIZE`` set,
    as torchrun, SLURM or a second node would. Each command runs in a process group of its own, killed on a
    timeout and when it returns."""
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GROUP_RANK")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    cmd = [sys.executable, "-m", "gdn2ts.cli", "lm", "train", str(RECIPE), *args, "--train.devices", "2"]
    ranks = [dict(env, LOCAL_RANK=str(r), NODE_RANK="0", WORLD_SIZE="2") for r in range(2)] if external else [env]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for e in ranks]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            _kill(p)
        pytest.fail(f"two-process training did not finish in {timeout} s:\n{procs[0].communicate()[0][-4000:]}")
    finally:
        for p in procs:
            _kill(p)
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]


def _metrics(out: Path) -> dict[str, list[tuple[int, float]]]:
    rows = []
    for version in sorted((out / "logs").iterdir()):
        with open(version / "metrics.csv") as f:
            rows += list(csv.DictReader(f))
    return {col: [(int(r["step"]), float(r[col])) for r in rows if r.get(col)]
            for col in ("train/loss", "val/loss", "grad_norm")}


def _train(out: Path, *args: str) -> None:
    main(["lm", "train", str(RECIPE), "--out", str(out), *COMMON, *args])


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe's data path is relative to the repository root


def test_fsdp2_on_two_processes_resumed_on_one_equals_one_uninterrupted_run(tmp_path):
    # without clipping every step is the same sum of the same two gradients: equal bit for bit in fp32 (with the
    # blocks' activations recomputed in the backward, which changes no value)
    no_clip = ["--optim.grad_clip", "null"]
    _launch(["--out", str(tmp_path / "split"), *COMMON, *no_clip, "--train.strategy", "fsdp2", "--train.stop_at", "3",
             "--train.activation_checkpointing", "true"])
    folder = tmp_path / "split" / "last.ckpt"
    # each process's pieces of each unit (embedding, two blocks, final norm, head), and the plain values
    assert sorted(p.name for p in folder.iterdir()) == [
        f"shard-0000{r}-model-0000{u}-of-00005.safetensors" for r in (1, 2) for u in range(1, 6)] + ["state.json"]
    _train(tmp_path / "split", *no_clip, *ONE)  # resume: auto, one process, a full checkpoint at the end
    _train(tmp_path / "straight", *no_clip, *ONE, "--train.data_shares", "2")
    a = torch.load(tmp_path / "straight" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.ckpt", weights_only=True)
    for name, w in a["model"].items():
        assert torch.equal(w, b["model"][name]), name
    for name, s in a["optimizer"]["state"].items():
        assert all(torch.equal(t, b["optimizer"]["state"][name][k]) for k, t in s.items()), name
    assert a["data"] == b["data"] and a["scheduler"] == b["scheduler"]
    assert (a["step"], a["tokens"], b["world_size"]) == (b["step"], b["tokens"], 1) == (6, 6 * 16 * 64, 1)
    straight, split = _metrics(tmp_path / "straight"), _metrics(tmp_path / "split")
    assert split["train/loss"] == straight["train/loss"] and len(straight["train/loss"]) == 6
    assert split["val/loss"] == straight["val/loss"] and [s for s, _ in split["val/loss"]] == [3, 6]


def test_fsdp1_resumes_a_one_process_checkpoint_on_two(tmp_path):
    # the other way, with FSDP1 and gradients clipped (to 0.25, below every step's norm): the two processes'
    # gradient norm sums the shards' squares in another order (the logged norms agree to about 1e-7), and the clip
    # factor carries that into each step; Adam divides the factor out (up to its eps), so the weights stay within
    # a few float32 ulps of the uninterrupted run's
    clip = ["--optim.grad_clip", "0.25"]
    _train(tmp_path / "split", *clip, *ONE, "--train.data_shares", "2", "--train.checkpoint", "sharded",
           "--train.stop_at", "3")
    # both processes started here, as torchrun or a second node would start them; the end gathered into a full file
    _launch(["--out", str(tmp_path / "split"), *COMMON, *clip, "--train.strategy", "fsdp", "--train.checkpoint",
             "full"], external=True)
    _train(tmp_path / "straight", *clip, *ONE, "--train.data_shares", "2")
    a = torch.load(tmp_path / "straight" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.ckpt", weights_only=True)
    assert b["world_size"] == 2 and a["data"] == b["data"] and a["step"] == b["step"] == 6
    for name, w in a["model"].items():
        torch.testing.assert_close(b["model"][name], w, rtol=1e-5, atol=1e-6, msg=name)
        for key, t in a["optimizer"]["state"][name].items():
            torch.testing.assert_close(b["optimizer"]["state"][name][key], t, rtol=1e-4, atol=1e-8, msg=name)
    straight, split = _metrics(tmp_path / "straight"), _metrics(tmp_path / "split")
    for col in ("train/loss", "val/loss", "grad_norm"):
        assert [s for s, _ in split[col]] == [s for s, _ in straight[col]], col
        assert [v for _, v in split[col]] == pytest.approx([v for _, v in straight[col]], rel=1e-5), col
    assert min(v for _, v in straight["grad_norm"]) > 0.25  # the clipping was at work on every step
