"""Train a :class:`~gdn2ts.models.lm.CausalLM` with Lightning Fabric: next-token cross-entropy on packed blocks,
the paper's AdamW and warmup + cosine schedule, gradient accumulation and clipping, bf16-mixed, DDP or FSDP;
tokens/s, MFU and validation perplexity logged to CSV; tensors-only checkpoints with exact resume.

Fabric rather than the ``Trainer``: the loop is ours, so one optimizer step is exactly ``grad_accum``
micro-batches drawn in order from one deterministic stream, the checkpoint holds exactly the model, the optimizer,
the schedule and the data position (plain tensors and numbers), and a resumed run continues the same stream and
schedule bit for bit; the ``Trainer``'s epoch loop would have to be bent to each of these.

Data: ``train_data`` is an iterable of blocks ``{"input_ids": Long[T], "labels": Long[T], "doc_starts": Long[n]}``
with ``state_dict()`` / ``load_state_dict()`` (``gdn2ts.lm.data.PackedBlocks``), batched by ``collate``
(``gdn2ts.lm.data.collate_packed``: ``input_ids`` / ``labels`` ``[B, T]``, ``cu_seqlens`` ``[N + 1]``). With
several devices each process reads its own share of the data (``PackedBlocks`` shards by rank), and the checkpoint
keeps every process's position.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.loggers import CSVLogger
from lightning.fabric.strategies import FSDPStrategy

from gdn2ts.lm.flops import flops_per_token, mfu, peak_flops
from gdn2ts.lm.optim import OptimConfig, build_optimizer, build_scheduler, no_decay_names
from gdn2ts.lm.progress import TrainProgress
from gdn2ts.lm.train_config import TrainConfig
from gdn2ts.models.lm import CausalLM, LMBlock
from gdn2ts.models.lm_config import LMConfig

__all__ = ["IGNORE_INDEX", "TrainError", "fit_lm", "fsdp_strategy", "lm_loss", "make_fabric", "resolve", "train_step"]

# labels equal to this are not trained on (cross-entropy's ignore_index)
IGNORE_INDEX = -100


class TrainError(ValueError):
    """A training run cannot start or continue: bad data, a checkpoint of another run."""


def fsdp_strategy(train: TrainConfig) -> FSDPStrategy:
    """Lightning's FSDP strategy for the LM: every :class:`~gdn2ts.models.lm.LMBlock` is its own FSDP unit
    (``auto_wrap_policy``; the embedding, final norm and head stay in the root unit), ``train.fsdp_sharding``,
    activation checkpointing of the blocks when asked, and full (single-file) checkpoints.

    Example:
        >>> s = fsdp_strategy(TrainConfig(max_steps=1, strategy="fsdp"))
        >>> s._fsdp_kwargs["auto_wrap_policy"]._module_classes == {LMBlock}
        True
    """
    return FSDPStrategy(auto_wrap_policy={LMBlock}, sharding_strategy=train.fsdp_sharding, state_dict_type="full",
                        activation_checkpointing_policy={LMBlock} if train.activation_checkpointing else None)


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
    """A Fabric for ``train``'s accelerator, devices, precision and strategy, logging to CSV under ``out/logs``
    (one ``version_<n>`` folder per launch) when ``out`` is given. Not launched yet (call ``fabric.launch()``)."""
    accelerator, precision = resolve(train)
    strategy = fsdp_strategy(train) if train.strategy == "fsdp" else train.strategy
    loggers = CSVLogger(str(out), name="logs", flush_logs_every_n_steps=1) if out is not None else None
    return L.Fabric(accelerator=accelerator, devices=train.devices, precision=precision, strategy=strategy,
                    loggers=loggers)


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


class _Stream:
    """Micro-batches drawn in order from ``data`` (this process's share of it)."""

    def __init__(self, data, collate: Callable, batch_size: int):
        self.data, self.collate, self.batch_size = data, collate, batch_size
        self.it = iter(data)
        self.taken = 0

    def next_batch(self, device) -> dict:
        items = []
        for _ in range(self.batch_size):
            try:
                items.append(next(self.it))
            except StopIteration:
                raise TrainError(f"fit_lm: the training data ran out after {self.taken} blocks in this run; give "
                                 f"a repeating dataset (PackedBlocks(repeat=True)) or fewer steps") from None
            self.taken += 1
        return {k: v.to(device) for k, v in self.collate(items).items()}


def _data_state(fabric: L.Fabric, data) -> list:
    # each process reads its own share of the data: the checkpoint keeps every process's position, rank by rank
    mine = data.state_dict()
    if fabric.world_size == 1:
        return [mine]
    every = [None] * fabric.world_size
    torch.distributed.all_gather_object(every, mine)
    return every


@torch.no_grad()
def _evaluate(fabric: L.Fabric, model, blocks: list[dict], collate: Callable, batch_size: int, packed: bool
              ) -> float:
    # every process evaluates its own held-out blocks (the same number everywhere, as FSDP's forwards need)
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=fabric.device)
    for lo in range(0, len(blocks), batch_size):
        batch = {k: v.to(fabric.device) for k, v in collate(blocks[lo:lo + batch_size]).items()}
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


def fit_lm(model_config: LMConfig, train_data, optim: OptimConfig, train: TrainConfig, out: str | Path,
           collate: Callable | None = None, val_data: Iterable | None = None, resume: str | Path | None = None,
           block_len: int | None = None, meta: dict | None = None, quiet: bool = False,
           fabric: L.Fabric | None = None) -> dict:
    """Train ``model_config``'s LM on ``train_data`` (module docstring) for ``train.total_steps`` optimizer steps.

    Writes ``out/last.ckpt`` (and ``out/step-<n>.ckpt`` every ``train.save_every`` steps), CSV metrics under
    ``out/logs/`` and ``out/summary.json``. ``resume``: a checkpoint of this run to continue from (``"auto"``:
    ``out/last.ckpt`` when it exists). ``block_len``: tokens per block, needed with a token budget
    (``train.max_tokens``). ``meta``: plain values stored in the checkpoint under ``config`` (the
    data and tokenizer settings, for generation). Returns the summary (steps, tokens, losses, perplexity,
    tokens/s, MFU, checkpoint path).
    """
    for name, value, kind in (("model_config", model_config, LMConfig), ("optim", optim, OptimConfig),
                              ("train", train, TrainConfig)):
        if not isinstance(value, kind):
            raise TrainError(f"fit_lm: argument '{name}' expected {kind.__name__}, got {type(value).__name__}")
    if train.max_tokens is not None and not (isinstance(block_len, int) and block_len >= 1):
        raise TrainError(f"fit_lm: argument 'block_len' expected the data's block length (an int >= 1) with a "
                         f"token budget (train.max_tokens), got {block_len!r}")
    if not (hasattr(train_data, "state_dict") and hasattr(train_data, "load_state_dict")):
        raise TrainError(f"fit_lm: argument 'train_data' expected a resumable dataset with state_dict() and "
                         f"load_state_dict() (gdn2ts.lm.data.PackedBlocks), got {type(train_data).__name__}")
    if collate is None:
        from gdn2ts.lm.data import collate_packed as collate
    out = Path(out)
    fabric = fabric or make_fabric(train, out)
    fabric.launch()
    if train.threads is not None and fabric.device.type == "cpu":
        torch.set_num_threads(train.threads)
    fabric.seed_everything(train.seed, verbose=False)
    # FSDP shards a model built on the CPU; otherwise it is built on its device directly
    with fabric.init_module() if train.strategy != "fsdp" else contextlib.nullcontext():
        model = CausalLM(model_config)
    no_decay = no_decay_names(model, optim.decay_embeddings)
    if train.activation_checkpointing and train.strategy != "fsdp":
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, LMBlock))
    # Fabric unwraps a compiled model, applies the strategy and compiles again; checkpoints hold the plain names
    model = fabric.setup_module(torch.compile(model) if train.compile else model)
    optimizer = fabric.setup_optimizers(build_optimizer(model, optim, no_decay))
    total = train.total_steps(block_len or 1, fabric.world_size)
    scheduler = build_scheduler(optimizer, optim, total)
    config = {"model": dataclasses.asdict(model_config), "optim": dataclasses.asdict(optim),
              "train": dataclasses.asdict(train), **(meta or {})}
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "data": [], "step": 0, "tokens": 0,
             "config": config}
    if resume == "auto":
        resume = out / "last.ckpt" if (out / "last.ckpt").is_file() else None
    if resume is not None:
        if not Path(resume).is_file():
            raise TrainError(f"fit_lm: argument 'resume' expected a checkpoint file, got {str(resume)!r}")
        saved = torch.load(resume, map_location="cpu", weights_only=True, mmap=True)
        if saved.get("config", {}).get("model") != config["model"]:
            raise TrainError(f"fit_lm: checkpoint {str(resume)!r} holds another model "
                             f"({saved.get('config', {}).get('model')}), expected {config['model']}")
        del saved
        fabric.load(resume, state, weights_only=True)
        if len(state["data"]) != fabric.world_size:
            raise TrainError(f"fit_lm: checkpoint {str(resume)!r} was written by {len(state['data'])} processes, "
                             f"this run has {fabric.world_size}; resume with the same number of devices")
        train_data.load_state_dict(state["data"][fabric.global_rank])
    stream = _Stream(train_data, collate, train.batch_size)
    val_blocks = _take(val_data, train.val_blocks) if val_data is not None and train.val_every else []
    if fabric.world_size > 1:
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
        state["data"] = _data_state(fabric, train_data)
        fabric.save(tmp, state)
        fabric.barrier()
        if fabric.global_rank == 0:
            os.replace(tmp, path)

    def validate(step: int) -> None:
        loss = _evaluate(fabric, model, val_blocks, collate, train.batch_size, train.packed)
        summary.update(val_loss=loss, val_ppl=math.exp(min(loss, 700.0)))
        fabric.log_dict({"val/loss": loss, "val/ppl": summary["val_ppl"]}, step=step)
        progress.note(val_ppl=summary["val_ppl"])

    model.train()
    start_step = state["step"]
    progress.start(start_step)
    flops = None
    losses, seen, paused, train_seconds = [], 0, 0.0, 0.0
    clock = time.perf_counter()
    end = total if train.stop_at is None else min(total, train.stop_at)
    for step in range(start_step, end):
        lr = optimizer.param_groups[0]["lr"]
        batches = [stream.next_batch(fabric.device) for _ in range(train.grad_accum)]
        step_loss, norm = train_step(fabric, model, optimizer, batches, optim.grad_clip, train.packed)
        scheduler.step()
        seq_len = batches[0]["input_ids"].shape[1]
        state["step"] = step + 1
        state["tokens"] += train.tokens_per_step(seq_len, fabric.world_size)
        losses.append(step_loss)
        seen += 1
        done = step + 1 == end
        if (step + 1) % train.log_every == 0 or done:
            # .item() waits for the device, so the clock covers the interval's work
            mean_loss = float(torch.stack(losses).mean())
            now = time.perf_counter()
            elapsed = now - clock - paused
            train_seconds += elapsed
            tps = seen * train.tokens_per_step(seq_len, fabric.world_size) / elapsed
            flops = flops if flops is not None else flops_per_token(model_config, seq_len)
            util = mfu(flops, tps, peak, fabric.world_size)
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
    save(out / "last.ckpt")
    for logger in fabric.loggers:
        logger.finalize("success")
    summary.update(steps=state["step"], total_steps=total, tokens=state["tokens"], train_seconds=train_seconds,
                   world_size=fabric.world_size, flops_per_token=flops)
    if fabric.global_rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
