"""Train a :class:`~gdn2ts.models.lm.CausalLM` with Lightning Fabric: next-token cross-entropy on packed blocks,
the paper's AdamW and warmup + cosine schedule, gradient accumulation and clipping, bf16-mixed, DDP, FSDP1 or
FSDP2 (built on the meta device, :mod:`gdn2ts.lm.sharding`); tokens/s, MFU and validation perplexity logged to
CSV; full or sharded tensors-only checkpoints (:mod:`gdn2ts.lm.checkpoint`) with exact resume, also on another
number of processes.

Fabric rather than the ``Trainer``: the loop is ours, so one optimizer step is exactly ``grad_accum``
micro-batches drawn in order from one deterministic stream, the checkpoint holds exactly the model, the optimizer,
the schedule and the data position (plain tensors and numbers), and a resumed run continues the same stream and
schedule bit for bit; the ``Trainer``'s epoch loop would have to be bent to each of these.

Data: ``train_data`` is an iterable of blocks ``{"input_ids": Long[T], "labels": Long[T], "doc_starts": Long[n]}``
with ``shard(share, shares)`` giving its shares, each with ``state_dict()`` / ``load_state_dict()``
(``gdn2ts.lm.data.PackedBlocks``), batched by ``collate`` (``gdn2ts.lm.data.collate_packed``: ``input_ids`` /
``labels`` ``[B, T]``, ``cu_seqlens`` ``[N + 1]``). It is read in a fixed number of shares, split over the
processes (:mod:`gdn2ts.lm.shares`), and the checkpoint keeps every share's position.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.loggers import CSVLogger

from gdn2ts.lm import checkpoint as ckpt
from gdn2ts.lm.flops import flops_per_token, mfu, peak_flops
from gdn2ts.lm.optim import OptimConfig, build_optimizer, build_scheduler, no_decay_names
from gdn2ts.lm.progress import TrainProgress
from gdn2ts.lm.sharding import fsdp_strategy, make_strategy, shard_model
from gdn2ts.lm.shares import ShareReader
from gdn2ts.lm.train_config import TrainConfig, TrainError
from gdn2ts.models.lm import CausalLM, LMBlock
from gdn2ts.models.lm_config import LMConfig

__all__ = ["IGNORE_INDEX", "TrainError", "fit_lm", "fsdp_strategy", "lm_loss", "make_fabric", "resolve", "train_step"]

# labels equal to this are not trained on (cross-entropy's ignore_index)
IGNORE_INDEX = -100


def resolve(train: TrainConfig) -> tuple[str, str]:
    """``(accelerator, precision)`` of ``train`` with ``auto`` decided: a GPU when present, ``bf16-mixed`` on a
    GPU and ``32-true`` on the CPU.

    Example:
        >>> resolve(TrainConfig(accelerator="cpu"))
        ('cpu', '32-true')
    """
    accelerator = "cuda" if train.accelerator == "gpu" else train.accelerator
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    precision = train.precision
    if precision == "auto":
        precision = "bf16-mixed" if accelerator == "cuda" else "32-true"
    return accelerator, precision


def make_fabric(train: TrainConfig, out: str | Path | None = None) -> L.Fabric:
    """A Fabric for ``train``'s accelerator, nodes, devices, precision and strategy, logging to CSV under
    ``out/logs`` (one ``version_<n>`` folder per launch) when ``out`` is given. Not launched yet (call
    ``fabric.launch()``)."""
    accelerator, precision = resolve(train)
    loggers = CSVLogger(str(out), name="logs", flush_logs_every_n_steps=1) if out is not None else None
    return L.Fabric(accelerator=accelerator, devices=train.devices, num_nodes=train.num_nodes, precision=precision,
                    strategy=make_strategy(train), loggers=loggers)


def lm_loss(model: torch.nn.Module, batch: dict, packed: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32) of a collated batch over its labels that are not ``IGNORE_INDEX``.

    ``packed``: the ``[B, T]`` rows run as one ``[1, B * T]`` sequence with ``cu_seqlens`` (document starts);
    otherwise as ``B`` sequences of ``T`` tokens.
    """
    ids = batch["input_ids"]
    if packed:
        logits, _ = model(ids.reshape(1, -1), cu_seqlens=batch["cu_seqlens"])
    else:
        logits, _ = model(ids)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["labels"].reshape(-1),
                           ignore_index=IGNORE_INDEX)


def train_step(fabric: L.Fabric, model, optimizer, batches: list[dict], grad_clip: float | None, packed: bool
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step over the micro-batches ``batches`` (gradients accumulated, synchronized across processes
    only on the last, clipped to ``grad_clip``); returns the mean loss (a device tensor) and the gradient norm
    before clipping (None without clipping)."""
    total = torch.zeros((), device=fabric.device)
    for i, batch in enumerate(batches):
        with fabric.no_backward_sync(model, enabled=i + 1 < len(batches)):
            loss = lm_loss(model, batch, packed)
            fabric.backward(loss / len(batches))
        total += loss.detach() / len(batches)
    norm = fabric.clip_gradients(model, optimizer, max_norm=grad_clip) if grad_clip else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, norm


def _peak_memory_gib(device: torch.device) -> float:
    # what bounds the model's size: the device's peak allocation on a GPU, the process's peak resident memory
    # (interpreter and libraries included) on the CPU
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _local_state_gib(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
    # this process's weights and optimizer state (its shards under FSDP): what sharding divides
    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    tensors = [local(p) for p in model.parameters()]
    tensors += [local(t) for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**30


def _batch(collate: Callable, blocks: list[dict], device) -> dict:
    return {k: v.to(device) for k, v in collate(blocks).items()}


def _data_states(fabric: L.Fabric, reader: ShareReader) -> list[dict]:
    # each process reads its own shares: the checkpoint keeps every share's position, share by share
    mine = reader.states()
    every = [mine]
    if fabric.world_size > 1:
        every = [None] * fabric.world_size
        torch.distributed.all_gather_object(every, mine)
    merged = {s: state for part in every for s, state in part.items()}
    return [merged[s] for s in range(reader.shares)]


def _plain(value):
    # what a value reads back as from JSON (tuples become lists): configs compare equal across both formats
    return json.loads(json.dumps(value))


def _check_resume(path: Path, saved: dict, config: dict, train: TrainConfig, world_size: int) -> int:
    """The run's data shares from the checkpoint's plain values ``saved``; a TrainError when the checkpoint is of
    another model, another number of blocks per step, or shares this launch cannot split."""
    if _plain(saved.get("config", {}).get("model")) != _plain(config["model"]):
        raise TrainError(f"fit_lm: checkpoint {str(path)!r} holds another model "
                         f"({saved.get('config', {}).get('model')}), expected {config['model']}")
    was = saved.get("config", {}).get("train", {})
    saved_world = saved.get("world_size", was.get("devices", 1) * was.get("num_nodes", 1))
    before = was.get("batch_size", 0) * was.get("grad_accum", 0) * saved_world
    now = train.batch_size * train.grad_accum * world_size
    if before != now:
        raise TrainError(f"fit_lm: checkpoint {str(path)!r} was written by a run taking {before} blocks per step "
                         f"(batch_size {was.get('batch_size')} x grad_accum {was.get('grad_accum')} x {saved_world} "
                         f"processes), this launch takes {now} ({train.batch_size} x {train.grad_accum} x "
                         f"{world_size}); keep batch_size x grad_accum x processes to continue the run")
    shares = len(saved.get("data") or [])
    if shares < 1:
        raise TrainError(f"fit_lm: checkpoint {str(path)!r} holds no data positions (expected one per data share)")
    if train.data_shares is not None and train.data_shares != shares:
        raise TrainError(f"fit_lm: checkpoint {str(path)!r} reads the data in {shares} shares, train.data_shares "
                         f"is {train.data_shares}; the shares are fixed for a run (leave data_shares unset)")
    return shares


@torch.no_grad()
def _evaluate(fabric: L.Fabric, model, blocks: list[dict], collate: Callable, batch_size: int, packed: bool
              ) -> float:
    # every process evaluates its own held-out blocks (the same number everywhere, as FSDP's forwards need)
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=fabric.device)
    for lo in range(0, len(blocks), batch_size):
        batch = _batch(collate, blocks[lo:lo + batch_size], fabric.device)
        n = (batch["labels"] != IGNORE_INDEX).sum()
        sums += torch.stack([lm_loss(model, batch, packed).double() * n, n.double()])
    model.train()
    sums = fabric.all_reduce(sums, reduce_op="sum")
    return float(sums[0] / sums[1].clamp(min=1))


def _take(data: Iterable, n: int) -> list[dict]:
    out = []
    for item in data:
        out.append(item)
        if len(out) == n:
            break
    return out


def _build(fabric: L.Fabric, model_config: LMConfig, optim: OptimConfig, train: TrainConfig):
    """``(model, core, optimizer)``: the model set up by Fabric, the module the checkpoints read (sharded, not
    compiled) and the optimizer. FSDP builds on the meta device (:func:`~gdn2ts.lm.sharding.shard_model`);
    otherwise the model is built on its device directly."""
    if train.strategy in ("fsdp", "fsdp2"):
        with torch.device("meta"):
            model = CausalLM(model_config)
        no_decay = no_decay_names(model, optim.decay_embeddings)
        model = shard_model(model, fabric, train)
    else:
        with fabric.init_module():
            model = CausalLM(model_config)
        no_decay = no_decay_names(model, optim.decay_embeddings)
        if train.activation_checkpointing:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

            apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, LMBlock))
    core = model
    # Fabric unwraps a compiled model, applies the strategy and compiles again; checkpoints hold the plain names
    model = fabric.setup_module(torch.compile(model) if train.compile else model)
    optimizer = fabric.setup_optimizers(build_optimizer(model, optim, no_decay))
    return model, core, optimizer


def fit_lm(model_config: LMConfig, train_data, optim: OptimConfig, train: TrainConfig, out: str | Path,
           collate: Callable | None = None, val_data: Iterable | None = None, resume: str | Path | None = None,
           block_len: int | None = None, meta: dict | None = None, quiet: bool = False,
           fabric: L.Fabric | None = None) -> dict:
    """Train ``model_config``'s LM on ``train_data`` (module docstring) for ``train.total_steps`` optimizer steps.

    Writes ``out/last.ckpt`` (and ``out/step-<n>.ckpt`` every ``train.save_every`` steps; files, or folders with
    sharded checkpoints), CSV metrics under ``out/logs/`` and ``out/summary.json``. ``resume``: a checkpoint of
    this run to continue from, full or sharded, written by any number of processes (``"auto"``: ``out/last.ckpt``
    when it exists). ``val_data``: held-out blocks; with ``shard()`` (``PackedBlocks``) the first
    ``train.val_blocks`` of each data share, so the same blocks on any number of processes. ``block_len``: tokens
    per block, needed with a token budget (``train.max_tokens``). ``meta``: plain values stored in the checkpoint
    under ``config`` (the data and tokenizer settings, for generation). Returns the summary (steps, tokens,
    losses, perplexity, tokens/s, MFU, checkpoint path, seconds from launch to the first step, rank 0's peak memory
    in GiB up to the last step, before the final checkpoint: the GPU's peak allocation, or the process's peak
    resident memory on the CPU; rank 0's weights and optimizer state in GiB, its shards under FSDP; the seconds
    the final checkpoint took).
    """
    for name, value, kind in (("model_config", model_config, LMConfig), ("optim", optim, OptimConfig),
                              ("train", train, TrainConfig)):
        if not isinstance(value, kind):
            raise TrainError(f"fit_lm: argument '{name}' expected {kind.__name__}, got {type(value).__name__}")
    if train.max_tokens is not None and not (isinstance(block_len, int) and block_len >= 1):
        raise TrainError(f"fit_lm: argument 'block_len' expected the data's block length (an int >= 1) with a "
                         f"token budget (train.max_tokens), got {block_len!r}")
    if not all(hasattr(train_data, m) for m in ("shard", "state_dict", "load_state_dict")):
        raise TrainError(f"fit_lm: argument 'train_data' expected a resumable dataset with shard(), state_dict() "
                         f"and load_state_dict() (gdn2ts.lm.data.PackedBlocks), got {type(train_data).__name__}")
    if collate is None:
        from gdn2ts.lm.data import collate_packed as collate
    out = Path(out)
    if resume == "auto":
        resume = ckpt.latest(out)
    saved = None
    if resume is not None:
        if not Path(resume).exists():
            raise TrainError(f"fit_lm: argument 'resume' expected a checkpoint file or folder, got {str(resume)!r}")
        saved = ckpt.peek(resume)
    fabric = fabric or make_fabric(train, out)
    fabric.launch()
    started = time.perf_counter()
    if train.threads is not None and fabric.device.type == "cpu":
        torch.set_num_threads(train.threads)
    world = fabric.world_size
    config = {"model": dataclasses.asdict(model_config), "optim": dataclasses.asdict(optim),
              "train": dataclasses.asdict(train), **(meta or {})}
    shares = train.data_shares or world
    if saved is not None:
        shares = _check_resume(Path(resume), saved, config, train, world)
    reader = ShareReader(train_data, shares, fabric.global_rank, world, train.batch_size, train.grad_accum)
    fabric.seed_everything(train.seed, verbose=False)
    model, core, optimizer = _build(fabric, model_config, optim, train)
    total = train.total_steps(block_len or 1, world)
    scheduler = build_scheduler(optimizer, optim, total)
    # the checkpoints' plain values; the model, optimizer and schedule are added when saving
    state = {"step": 0, "tokens": 0, "world_size": world, "config": config}
    if saved is not None:
        load = ckpt.load_sharded if Path(resume).is_dir() else ckpt.load_full
        plain = load(resume, core, optimizer.optimizer)
        scheduler.load_state_dict(plain["scheduler"])
        state.update(step=plain["step"], tokens=plain["tokens"])
        reader.load(plain["data"])
    val_blocks = []
    if val_data is not None and train.val_every:
        if hasattr(val_data, "shard"):
            val_blocks = [b for s in reader.mine for b in _take(val_data.shard(s, shares), train.val_blocks)]
        else:
            val_blocks = _take(val_data, train.val_blocks)
    if world > 1:
        # every process must run the same number of validation forwards (FSDP gathers weights in each)
        n = torch.tensor(len(val_blocks), device=fabric.device)
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MIN)
        val_blocks = val_blocks[:int(n)]
    if val_data is not None and train.val_every and not val_blocks:
        raise TrainError("fit_lm: the validation data yields no blocks")
    peak = peak_flops(fabric.device, train.peak_tflops)
    progress = TrainProgress(total, disable=quiet or fabric.global_rank != 0)
    summary: dict = {"checkpoint": str(out / "last.ckpt")}

    def save(path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        plain = {**state, "data": _data_states(fabric, reader), "scheduler": scheduler.state_dict()}
        if train.sharded_checkpoints:
            ckpt.save_sharded(tmp, core, optimizer.optimizer, plain)
        else:
            ckpt.save_full(tmp, core, optimizer.optimizer, plain, cpu_offload=fabric.device.type != "cpu")
        if fabric.global_rank == 0:
            ckpt.replace(tmp, path)
        fabric.barrier()

    def validate(step: int) -> None:
        loss = _evaluate(fabric, model, val_blocks, collate, train.batch_size, train.packed)
        summary.update(val_loss=loss, val_ppl=math.exp(min(loss, 700.0)))
        fabric.log_dict({"val/loss": loss, "val/ppl": summary["val_ppl"]}, step=step)
        progress.note(val_ppl=summary["val_ppl"])

    model.train()
    summary["setup_seconds"] = time.perf_counter() - started
    start_step = state["step"]
    progress.start(start_step)
    flops = None
    losses, seen, paused, train_seconds = [], 0, 0.0, 0.0
    clock = time.perf_counter()
    end = total if train.stop_at is None else min(total, train.stop_at)
    for step in range(start_step, end):
        lr = optimizer.param_groups[0]["lr"]
        batches = [_batch(collate, micro, fabric.device) for micro in reader.step()]
        step_loss, norm = train_step(fabric, model, optimizer, batches, optim.grad_clip, train.packed)
        scheduler.step()
        seq_len = batches[0]["input_ids"].shape[1]
        state["step"] = step + 1
        state["tokens"] += train.tokens_per_step(seq_len, world)
        losses.append(step_loss)
        seen += 1
        done = step + 1 == end
        if (step + 1) % train.log_every == 0 or done:
            # the mean over the processes' losses, step by step; .item() waits for the device, so the clock
            # covers the interval's work
            step_losses = torch.stack(losses)
            if world > 1:
                step_losses = fabric.all_reduce(step_losses, reduce_op="mean")
            mean_loss = float(step_losses.mean())
            now = time.perf_counter()
            elapsed = now - clock - paused
            train_seconds += elapsed
            tps = seen * train.tokens_per_step(seq_len, world) / elapsed
            flops = flops if flops is not None else flops_per_token(model_config, seq_len)
            util = mfu(flops, tps, peak, world)
            row = {"train/loss": mean_loss, "lr": lr, "tokens_per_s": tps, "tokens": state["tokens"]}
            if norm is not None:
                row["grad_norm"] = float(norm)
            if util is not None:
                row["mfu"] = util
            fabric.log_dict(row, step=step + 1)
            summary.update(train_loss=mean_loss, tokens_per_s=tps, mfu=util)
            progress.note(loss=mean_loss, tokens_per_s=tps)
            losses, seen, paused, clock = [], 0, 0.0, now
        # validation and checkpoints are kept out of the tokens/s
        t = time.perf_counter()
        if val_blocks and ((step + 1) % train.val_every == 0 or done):
            validate(step + 1)
        if train.save_every and (step + 1) % train.save_every == 0 and not done:
            save(out / f"step-{step + 1:06d}.ckpt")
        paused += time.perf_counter() - t
        progress.advance(step + 1)
    progress.stop()
    # the training's peak, before the final checkpoint's own buffers
    summary["peak_memory_gib"] = _peak_memory_gib(fabric.device)
    t = time.perf_counter()
    save(out / "last.ckpt")
    summary["checkpoint_seconds"] = time.perf_counter() - t
    for logger in fabric.loggers:
        logger.finalize("success")
    summary.update(steps=state["step"], total_steps=total, tokens=state["tokens"], train_seconds=train_seconds,
                   world_size=world, flops_per_token=flops, local_state_gib=_local_state_gib(core, optimizer.optimizer))
    if fabric.global_rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
