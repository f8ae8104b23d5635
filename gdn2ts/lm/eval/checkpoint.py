"""Evaluation from a training checkpoint alone: the model is rebuilt from the configuration saved with its weights,
the tokenizer and the held-out split from the data settings saved beside it (``gdn2ts lm train`` stores both), so
nothing about the run needs to be restated. Behind ``gdn2ts lm eval``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import torch

from gdn2ts.lm.eval.perplexity import perplexity, text_perplexity

__all__ = ["evaluate_checkpoint", "held_out_blocks", "kept_generators"]


@contextlib.contextmanager
def kept_generators():
    """Python's, NumPy's and torch's CPU random generators as they were, afterwards (the harness's evaluator
    seeds them all)."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


def held_out_blocks(config: dict, max_blocks: int | None = None) -> list:
    """The held-out blocks of the run whose checkpoint ``config`` is given (its ``data`` section): the documents
    that training kept out for validation, tokenized and packed as in training. A run without a ``data`` section
    (trained through the Python API on its own blocks) or with ``holdout: 0`` has none: a ValueError says so."""
    from gdn2ts.lm.data import build_dataset
    from gdn2ts.lm.train_recipe import DataConfig

    data = config.get("data")
    if not isinstance(data, dict):
        raise ValueError("the checkpoint records no data settings (a run trained through the Python API): pass a "
                         "text file to score with text=")
    data = DataConfig(**{k: (tuple(v) if k == "paths" else v) for k, v in data.items()})
    if data.holdout <= 0:
        raise ValueError("the run held nothing out (data.holdout = 0): pass a text file to score with text=")
    values = dataclasses.asdict(data)
    values["paths"] = list(data.paths)
    blocks = []
    for item in build_dataset(**values, split="val"):
        blocks.append(item)
        if max_blocks is not None and len(blocks) >= max_blocks:
            break
    if not blocks:
        raise ValueError(f"the held-out split of {list(data.paths)} is empty (run from the directory the run was "
                         "trained in: the data paths are relative to it)")
    return blocks


def evaluate_checkpoint(checkpoint: str | Path, text: str | Path | None = None, tasks: tuple[str, ...] = (),
                        include_path: str | Path | None = None, limit: int | float | None = None,
                        max_blocks: int | None = None, block_len: int | None = None, batch_size: int = 8,
                        device: str = "cpu", tokenizer: str | None = None, json_path: str | Path | None = None
                        ) -> dict:
    """Evaluate a ``gdn2ts lm train`` checkpoint: held-out perplexity and lm-evaluation-harness tasks.

    ``text``: a UTF-8 file scored with :func:`~gdn2ts.lm.eval.perplexity.text_perplexity` (with bits per byte);
    None: the run's own held-out documents (:func:`held_out_blocks`, at most ``max_blocks`` blocks). ``tasks``:
    harness task names (the optional ``lm-eval`` extra), with ``include_path`` a folder of task YAML files and
    ``limit`` examples per task. ``block_len``: tokens per scored block of ``text`` (default: the run's).
    Returns (and writes to ``json_path``) ``{"checkpoint", "model", "step", "perplexity": {...}, "tasks": {...}}``.
    """
    from gdn2ts.lm.generate import load_lm
    from gdn2ts.lm.tokenizer import load_tokenizer

    model, config = load_lm(checkpoint, device=device)
    data = config.get("data") or {}
    name = tokenizer or data.get("tokenizer")
    if name is None:
        raise ValueError("the checkpoint names no tokenizer: pass tokenizer=")
    tok = load_tokenizer(name)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer {name!r} has {tok.vocab_size} tokens, the model {model.config.vocab_size}")
    record: dict = {"checkpoint": str(checkpoint), "model": config.get("recipe"), "tokenizer": name}
    if text is not None:
        path = Path(text)
        if not path.is_file():
            raise ValueError(f"argument 'text' expected a text file, got {str(path)!r}")
        r = text_perplexity(model, tok, path.read_text(encoding="utf-8"),
                            block_len=block_len or int(data.get("block_len", 1024)), batch_size=batch_size,
                            add_bos=bool(data.get("bos", False)))
        record["perplexity"] = {"source": str(path), "nll": r.nll, "perplexity": r.perplexity, "tokens": r.tokens,
                                "bits_per_byte": r.bits_per_byte, "bytes": r.bytes}
    else:
        blocks = held_out_blocks(config, max_blocks)
        r = perplexity(model, blocks, batch_size=batch_size)
        record["perplexity"] = {"source": "held-out split", "blocks": len(blocks), "nll": r.nll,
                                "perplexity": r.perplexity, "tokens": r.tokens}
    record["tasks"] = _run_tasks(model, tok, tasks, include_path, limit, batch_size) if tasks else {}
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _run_tasks(model, tok, tasks, include_path, limit, batch_size) -> dict:
    from gdn2ts.lm.eval.harness import register_lm_eval

    cls = register_lm_eval()  # ImportError naming the extra when lm-eval is missing
    import lm_eval
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"argument 'include_path' expected a folder of task YAML files, got {str(include_path)!r}")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown harness task(s) {unknown} (folders of your own tasks go in include_path)")
    lm = cls(model=model, tokenizer=tok, device=str(next(model.parameters()).device), batch_size=batch_size)
    with kept_generators():
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                      bootstrap_iters=0, log_samples=False)
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "alias"}
            for task, metrics in out["results"].items()}
