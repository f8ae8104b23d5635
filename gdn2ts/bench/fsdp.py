"""FSDP1 against FSDP2 (and DDP) through the training command: launches of ``gdn2ts lm train`` per strategy, same
recipe, steps and processes, the strategies taking turns (``--repeats`` rounds, so that a change in the machine's
load hits all alike), and of each run: tokens/s over its last logging interval (the first holds the warm-up),
seconds from launch to the first step (construction, sharding, initialization), rank 0's peak memory (the GPU's
peak allocation, or the process's peak resident memory on the CPU), rank 0's weights and AdamW state, the seconds
of the final checkpoint, the final loss; then the median of each over the rounds.

CPU (gloo), the small model on tiny Shakespeare (the record in ``docs/results/lm/fsdp_cpu.json``)::

    python -m gdn2ts.bench.fsdp --recipe tasks/lm/train/tiny_shakespeare.yaml --devices 2 --steps 6 --repeats 3 \\
        --json docs/results/lm/fsdp_cpu.json --set --model small_gdn2 --data.block_len 256 --train.batch_size 2

Everything after ``--set`` goes to the command as it is. Run from the repository root (the recipes' data paths are
relative to it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from gdn2ts.bench.common import environment, write_json

__all__ = ["main", "measure"]


def measure(recipe: str, strategy: str, devices: int, steps: int, out: Path, extra: list[str],
            timeout: float = 3600) -> dict:
    """One launch of the training command with ``strategy`` on ``devices`` processes for ``steps`` steps (logged
    twice, no validation, a checkpoint at the end); its summary's measures."""
    cmd = [sys.executable, "-m", "gdn2ts.cli", "lm", "train", recipe, "--out", str(out), "--resume", "null",
           "--train.strategy", strategy, "--train.devices", str(devices), "--train.max_steps", str(steps),
           "--train.log_every", str(max(1, steps // 2)), "--train.val_every", "null", "--train.save_every", "null",
           "--quiet", "true", *extra]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    summary = json.loads((out / "summary.json").read_text())
    keep = ("tokens_per_s", "setup_seconds", "peak_memory_gib", "local_state_gib", "checkpoint_seconds", "train_loss",
            "train_seconds", "world_size", "mfu")
    return {"strategy": strategy, "devices": devices, "steps": steps, "wall_seconds": time.perf_counter() - t0,
            **{k: summary.get(k) for k in keep}}


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--set") + 1:] if "--set" in argv else []
    argv = argv[:argv.index("--set")] if "--set" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m gdn2ts.bench.fsdp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="tasks/lm/train/tiny_shakespeare.yaml")
    parser.add_argument("--strategies", nargs="+", default=["ddp", "fsdp", "fsdp2"])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default="runs/bench/fsdp")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    records = []
    for round_ in range(args.repeats):
        for strategy in args.strategies:
            record = measure(args.recipe, strategy, args.devices, args.steps, Path(args.out) / strategy, extra)
            records.append({"round": round_, **record})
            print(json.dumps(records[-1]), flush=True)
    measures = ("tokens_per_s", "setup_seconds", "peak_memory_gib", "local_state_gib", "checkpoint_seconds")
    medians = {s: {k: statistics.median(r[k] for r in records if r["strategy"] == s)
                   for k in measures if all(r.get(k) is not None for r in records)}
               for s in args.strategies}
    print(json.dumps({"median": medians}, indent=1))
    write_json(args.json, {"command": ["python", "-m", "gdn2ts.bench.fsdp", *sys.argv[1:]], "recipe": args.recipe,
                           "overrides": extra, "environment": environment(), "date": time.strftime("%Y-%m-%d"),
                           "median": medians, "runs": records})
    return records


if __name__ == "__main__":
    main()
