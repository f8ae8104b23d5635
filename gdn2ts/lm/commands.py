"""The LM training commands: ``gdn2ts lm train``, ``gdn2ts lm generate``, ``gdn2ts lm throughput`` and
``gdn2ts lm export``."""

from __future__ import annotations

from pathlib import Path

import torch

from gdn2ts.lm.optim import OptimConfig
from gdn2ts.lm.train_config import TrainConfig
from gdn2ts.lm.train_recipe import DataConfig

__all__ = ["lm_curves", "lm_export", "lm_generate", "lm_throughput", "lm_train"]

_OPTIM = OptimConfig()
_TRAIN = TrainConfig()


def lm_train(model: str, data: DataConfig, optim: OptimConfig = _OPTIM, train: TrainConfig = _TRAIN,
             vocab_size: int | None = None, out: str = "runs/lm", resume: str | None = "auto",
             quiet: bool = False) -> dict:
    """Train a language model from a recipe: ``gdn2ts lm train tasks/lm/train/tiny_shakespeare.yaml``.

    Writes out/last.ckpt (tensors and plain values only; a folder when sharded), out/logs/version_<n>/metrics.csv
    and out/summary.json.

    Args:
        model: a model recipe name in tasks/lm/ (small_gdn2, ...) or a YAML path.
        data: the documents, tokenizer, block length and held-out fraction.
        optim: AdamW and the warmup + cosine schedule.
        train: nodes, devices, precision, strategy (ddp, fsdp, fsdp2), batch, data shares, length, logging and
            checkpoints (full or sharded).
        vocab_size: replaces the model recipe's vocabulary size.
        out: output folder.
        resume: a checkpoint (file or sharded folder, from any number of processes) to continue from; auto:
            out/last.ckpt when it exists; null: start afresh.
        quiet: no progress bar.
    """
    from gdn2ts.lm.train import TrainError
    from gdn2ts.lm.train_recipe import TrainRecipe, run_recipe

    try:
        recipe = TrainRecipe(model=model, data=data, optim=optim, train=train, vocab_size=vocab_size, out=out)
        summary = run_recipe(recipe, resume=resume, quiet=quiet)
    except (ValueError, TrainError, OSError) as e:
        raise SystemExit(f"gdn2ts lm train: {e}") from None
    if not quiet:
        ppl = f", validation perplexity {summary['val_ppl']:.2f}" if "val_ppl" in summary else ""
        print(f"lm train: {summary['steps']} steps, {summary['tokens']:,} tokens{ppl}; checkpoint "
              f"{summary['checkpoint']}")
    return summary


def lm_generate(checkpoint: str, prompt: str = "\n", max_new_tokens: int = 200, temperature: float = 0.8,
                top_k: int | None = 50, seed: int = 0, device: str = "cpu", tokenizer: str | None = None) -> str:
    """Continue a prompt with a trained checkpoint (prefill, then the recurrent step per token) and print it.

    Args:
        checkpoint: a last.ckpt written by gdn2ts lm train.
        prompt: text to continue.
        max_new_tokens: tokens to generate (fewer when EOS comes first).
        temperature: sampling temperature; 0 is greedy.
        top_k: sample among the k most likely tokens (null: all).
        seed: sampling seed.
        device: cpu or cuda.
        tokenizer: the tokenizer (default: the one in the checkpoint's data settings).
    """
    from gdn2ts.lm.generate import generate_text, load_lm
    from gdn2ts.lm.tokenizer import load_tokenizer

    try:
        model, config = load_lm(checkpoint, device=device)
        data = config.get("data", {})
        name = tokenizer or data.get("tokenizer")
        if name is None:
            raise ValueError("the checkpoint names no tokenizer; pass --tokenizer")
        text = generate_text(model, load_tokenizer(name), prompt, max_new_tokens, temperature, top_k, seed,
                             bos=bool(data.get("bos", False)))
    except (ValueError, OSError) as e:
        raise SystemExit(f"gdn2ts lm generate: {e}") from None
    print(text)
    return text


def lm_throughput(model: str = "swa_gdn2_1.3B", seq_len: tuple[int, ...] = (2048, 16384),
                  tokens_per_step: int = 32768, micro_tokens: int | None = None, steps: int = 10, warmup: int = 3,
                  device: str = "auto", precision: str = "auto", packed: bool = False,
                  activation_checkpointing: bool = False, compile: bool = False, peak_tflops: float | None = None,
                  threads: int | None = None,
                  json: str | None = None, quiet: bool = False) -> list[dict]:
    """Training tokens/s of a model recipe at fixed tokens per step on random tokens (the paper: swa_gdn2_1.3B on
    one H100, 38.0 K tokens/s at 2K context, 36.1 K at 16K).

    Args:
        model: a model recipe name in tasks/lm/ or a YAML path.
        seq_len: context lengths.
        tokens_per_step: tokens per optimizer step at every context length.
        micro_tokens: tokens per forward/backward (gradient accumulation up to tokens_per_step); null: one.
        steps: timed optimizer steps.
        warmup: untimed steps first.
        device: auto, cpu or gpu.
        precision: auto (bf16-mixed on a GPU), 32-true, bf16-mixed or bf16-true.
        packed: rows as one packed sequence with cu_seqlens (False: [B, T] rows).
        activation_checkpointing: recompute each block in the backward.
        compile: torch.compile the model (give warmup steps enough for the compilation).
        peak_tflops: the device's dense bf16 peak for the MFU (default: from the GPU's name).
        threads: torch CPU threads.
        json: path of the JSON record.
        quiet: print nothing.
    """
    from gdn2ts.lm.throughput import measure_throughput

    if threads is not None:
        torch.set_num_threads(threads)
    try:
        records = measure_throughput(model, seq_lens=tuple(seq_len), tokens_per_step=tokens_per_step,
                                     micro_tokens=micro_tokens, steps=steps, warmup=warmup, accelerator=device,
                                     precision=precision, packed=packed,
                                     activation_checkpointing=activation_checkpointing, compile=compile,
                                     peak_tflops=peak_tflops,
                                     json_path=json, quiet=quiet)
    except ValueError as e:
        raise SystemExit(f"gdn2ts lm throughput: {e}") from None
    if quiet is False and json:
        print(f"lm throughput: {len(records)} records to {json}")
    return records


def lm_curves(runs: list[str], out: str = "lm_curves.png", metrics: tuple[str, ...] = ("train/loss", "val/loss"),
              names: list[str] | None = None, title: str | None = None, quiet: bool = False) -> str:
    """Learning curves of training runs in one figure, and a Markdown table of their final figures.

    Args:
        runs: output folders of gdn2ts lm train runs.
        out: the figure (PNG).
        metrics: one panel each (train/loss, val/loss, val/ppl, tokens_per_s, mfu, lr, grad_norm).
        names: a label per run (default: the folder names).
        title: the figure's title.
        quiet: print nothing.
    """
    from gdn2ts.lm.curves import final_table, markdown_table, plot_curves

    labels = list(names) if names is not None else [Path(r).name for r in runs]
    if len(labels) != len(runs) or len(set(labels)) != len(labels):
        raise SystemExit(f"gdn2ts lm curves: 'names' expected one distinct label per run ({len(runs)}), got {labels}")
    try:
        table = dict(zip(labels, runs, strict=True))
        plot_curves(table, out, metrics=tuple(metrics), title=title)
        text = markdown_table(final_table(table))
    except (ValueError, OSError) as e:
        raise SystemExit(f"gdn2ts lm curves: {e}") from None
    if not quiet:
        print(text)
        print(f"\nfigure: {out}")
    return text


def lm_export(checkpoint: str, out: str, dtype: str = "float32", quiet: bool = False) -> str:
    """Export a checkpoint of gdn2ts lm train as a Hugging Face transformers folder.

    gdn2ts lm export runs/lm/x/last.ckpt hf/x writes config.json, generation_config.json and model.safetensors;
    load them with AutoModelForCausalLM.from_pretrained after import gdn2ts.hf (the hf extra; docs/hf.md).

    Args:
        checkpoint: a last.ckpt or step-<n>.ckpt written by gdn2ts lm train.
        out: the folder to write (created if missing).
        dtype: the weights' dtype: float32, bfloat16 or float16.
        quiet: print nothing.
    """
    try:
        from gdn2ts.hf import export_checkpoint
    except ImportError as e:
        raise SystemExit(f"gdn2ts lm export: {e}") from None
    try:
        model = export_checkpoint(checkpoint, out, dtype=dtype)
    except (ValueError, OSError) as e:
        raise SystemExit(f"gdn2ts lm export: {e}") from None
    if not quiet:
        layout = ", ".join(model.model.config.cell)
        print(f"lm export: {model.model.num_parameters()['total']:,} parameters ({model.model.config.num_cells} x "
              f"[{layout}]) to {out}")
    return str(out)


def lm_eval(checkpoint: str, text: str | None = None, tasks: tuple[str, ...] = (), include_path: str | None = None,
            limit: float | None = None, max_blocks: int | None = None, block_len: int | None = None,
            batch_size: int = 8, device: str = "cpu", tokenizer: str | None = None, json: str | None = None,
            quiet: bool = False) -> dict:
    """Evaluate a checkpoint of gdn2ts lm train: held-out perplexity, and lm-evaluation-harness tasks.

    The model comes from the configuration saved with the weights; the tokenizer and the held-out documents from
    the run's data settings (run it from the directory the run was trained in: data paths are relative to it).

    Args:
        checkpoint: a last.ckpt or step-<n>.ckpt written by gdn2ts lm train.
        text: a UTF-8 text file to score instead of the run's held-out documents (with bits per byte).
        tasks: lm-evaluation-harness task names (the lm-eval extra: pip install -e ".[lm-eval]").
        include_path: a folder of your own harness task YAML files.
        limit: examples per task (an int, or a fraction below 1).
        max_blocks: score at most this many held-out blocks.
        block_len: tokens per scored block of text (default: the run's block_len).
        batch_size: blocks or requests per forward.
        device: cpu or cuda.
        tokenizer: override the checkpoint's tokenizer.
        json: path of the JSON record.
        quiet: print nothing.
    """
    from gdn2ts.lm.eval.checkpoint import evaluate_checkpoint

    try:
        record = evaluate_checkpoint(checkpoint, text=text, tasks=tuple(tasks), include_path=include_path,
                                     limit=limit, max_blocks=max_blocks, block_len=block_len, batch_size=batch_size,
                                     device=device, tokenizer=tokenizer, json_path=json)
    except (ValueError, OSError, ImportError) as e:
        raise SystemExit(f"gdn2ts lm eval: {e}") from None
    if not quiet:
        p = record["perplexity"]
        extra = f", {p['bits_per_byte']:.4f} bits/byte" if "bits_per_byte" in p else ""
        print(f"lm eval: {p['source']}: perplexity {p['perplexity']:.4f} (nll {p['nll']:.4f} over "
              f"{p['tokens']:,} tokens{extra})")
        for task, metrics in record["tasks"].items():
            print(f"  {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
    return record
