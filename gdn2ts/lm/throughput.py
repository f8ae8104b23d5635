"""Training throughput of a model recipe: timed optimizer steps on random tokens at given context lengths with a
fixed token budget per step (the paper's measurement: the 1.3B hybrid on one H100, 38.0 K tokens/s at 2K context
and 36.1 K at 16K). Each step is the training step of :func:`~gdn2ts.lm.train.fit_lm` (forward, backward, gradient
clipping, AdamW), so the figure is what training gets."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from gdn2ts.lm.flops import flops_per_token, mfu, peak_flops
from gdn2ts.lm.optim import OptimConfig, build_optimizer, no_decay_names
from gdn2ts.lm.recipes import load_recipe
from gdn2ts.lm.train import make_fabric, resolve, train_step
from gdn2ts.lm.train_config import TrainConfig
from gdn2ts.models.lm import CausalLM, LMBlock

__all__ = ["measure_throughput"]


def _check(name: str, value, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"measure_throughput: argument '{name}' expected an int >= {low}, got {value!r}")


def measure_throughput(model: str = "swa_gdn2_1.3B", seq_lens: tuple[int, ...] = (2048, 16384),
                       tokens_per_step: int = 32768, micro_tokens: int | None = None, steps: int = 10,
                       warmup: int = 3, accelerator: str = "auto", precision: str = "auto", packed: bool = False,
                       activation_checkpointing: bool = False, compile: bool = False,
                       peak_tflops: float | None = None, seed: int = 0,
                       json_path: str | None = None, quiet: bool = False) -> list[dict]:
    """Tokens/s of training ``model`` (a recipe name or path) at each context length in ``seq_lens``.

    Every optimizer step takes ``tokens_per_step`` tokens: rows of ``seq_len`` tokens, in micro-batches of
    ``micro_tokens`` (gradient accumulation; None: one micro-batch). ``warmup`` untimed steps (compilation,
    autotuning, allocator) come before ``steps`` timed ones. ``packed``: rows as one packed sequence with
    ``cu_seqlens`` at the row starts (False: ``[B, T]`` rows). ``compile``: ``torch.compile`` the model (the
    warmup steps should cover the compilation). Returns one record per context length (tokens/s,
    MFU when the device's peak is known, seconds per step, peak memory on a GPU) and writes them to ``json_path``.

    Example:
        >>> rows = measure_throughput("tiny_gdn2", seq_lens=(32,), tokens_per_step=128, steps=2, warmup=1,
        ...                           accelerator="cpu", quiet=True)
        >>> rows[0]["rows_per_step"], rows[0]["tokens_per_s"] > 0
        (4, True)
    """
    seq_lens = tuple(seq_lens)
    for s in seq_lens:
        _check("seq_lens", s)
    for name, value, low in (("tokens_per_step", tokens_per_step, 1), ("steps", steps, 1), ("warmup", warmup, 0)):
        _check(name, value, low)
    micro_tokens = tokens_per_step if micro_tokens is None else micro_tokens
    _check("micro_tokens", micro_tokens)
    for s in seq_lens:
        if tokens_per_step % micro_tokens or micro_tokens % s:
            raise ValueError(f"measure_throughput: 'micro_tokens' ({micro_tokens}) expected a multiple of each "
                             f"seq_len (got {s}) that divides 'tokens_per_step' ({tokens_per_step})")
    config = load_recipe(model)
    train = TrainConfig(accelerator=accelerator, precision=precision, activation_checkpointing=activation_checkpointing,
                        compile=compile, packed=packed, max_steps=steps, threads=None)
    fabric = make_fabric(train)
    fabric.launch()
    fabric.seed_everything(seed, verbose=False)
    with fabric.init_module():
        net = CausalLM(config)
    no_decay = no_decay_names(net)
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        apply_activation_checkpointing(net, check_fn=lambda m: isinstance(m, LMBlock))
    net = fabric.setup_module(torch.compile(net) if compile else net)
    optimizer = fabric.setup_optimizers(build_optimizer(net, OptimConfig(), no_decay))
    cuda = fabric.device.type == "cuda"
    peak = peak_flops(fabric.device, peak_tflops)
    gen = torch.Generator().manual_seed(seed)
    records = []
    for seq_len in seq_lens:
        rows = micro_tokens // seq_len
        accum = tokens_per_step // micro_tokens

        def batch(rows=rows, seq_len=seq_len):
            ids = torch.randint(0, config.vocab_size, (rows, seq_len + 1), generator=gen)
            cu = torch.arange(0, rows * seq_len + 1, seq_len, dtype=torch.int32)
            return {"input_ids": ids[:, :-1].to(fabric.device), "labels": ids[:, 1:].to(fabric.device),
                    "cu_seqlens": cu.to(fabric.device)}

        if cuda:
            torch.cuda.reset_peak_memory_stats(fabric.device)
        for i in range(warmup + steps):
            if i == warmup:
                if cuda:
                    torch.cuda.synchronize(fabric.device)
                start = time.perf_counter()
            loss, _ = train_step(fabric, net, optimizer, [batch() for _ in range(accum)], 1.0, packed)
        loss = float(loss)  # waits for the device
        seconds = time.perf_counter() - start
        tps = steps * tokens_per_step / seconds
        flops = flops_per_token(config, seq_len)
        rec = {"model": model, "seq_len": seq_len, "tokens_per_step": tokens_per_step, "rows_per_step": rows * accum,
               "micro_batches": accum, "steps": steps, "warmup": warmup, "seconds_per_step": seconds / steps,
               "tokens_per_s": tps, "flops_per_token": flops, "mfu": mfu(flops, tps, peak), "loss": loss,
               "precision": resolve(train)[1], "packed": packed,
               "activation_checkpointing": activation_checkpointing, "compile": compile,
               "peak_memory_gb": torch.cuda.max_memory_allocated(fabric.device) / 2**30 if cuda else None,
               "device": torch.cuda.get_device_name(fabric.device) if cuda else platform.processor() or "cpu",
               "torch": torch.__version__}
        records.append(rec)
        if not quiet:
            util = "" if rec["mfu"] is None else f", MFU {rec['mfu']:.1%}"
            print(f"{model} at {seq_len} tokens: {tps:,.0f} tokens/s ({rows * accum} rows per step, "
                  f"{seconds / steps:.3f} s per step{util})")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(records, indent=1) + "\n")
    return records
