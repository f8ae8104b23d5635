"""Generation from a training checkpoint: rebuild the LM from the checkpoint's own config (a full checkpoint read
with ``torch.load(weights_only=True)``, a sharded one from its safetensors files and JSON: nothing is unpickled),
tokenize a prompt, decode with the recurrent step."""

from __future__ import annotations

from pathlib import Path

import torch

from gdn2ts.models.lm import CausalLM
from gdn2ts.models.lm_config import LMConfig

__all__ = ["generate_text", "load_lm", "read_lm_config"]


def load_lm(path: str | Path, device: str | torch.device = "cpu") -> tuple[CausalLM, dict]:
    """The model of a checkpoint written by :func:`~gdn2ts.lm.train.fit_lm` (a file, or a sharded checkpoint's
    folder; in eval mode, on ``device``) and the checkpoint's ``config`` (``model``, ``optim``, ``train``, and
    ``data`` when trained from a recipe)."""
    path = Path(path)
    if path.is_dir():
        from gdn2ts.lm.checkpoint import read_checkpoint

        ckpt = read_checkpoint(path)
    elif path.is_file():
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"load_lm: argument 'path' expected a checkpoint file or folder, got {str(path)!r}")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model" not in ckpt.get("config", {}):
        raise ValueError(f"load_lm: {str(path)!r} is not an LM training checkpoint (expected 'model' weights and "
                         f"'config' with the model's fields)")
    model = CausalLM(LMConfig.from_dict(dict(ckpt["config"]["model"])))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt["config"]


def read_lm_config(path: str | Path) -> LMConfig | None:
    """The model configuration stored in a ``gdn2ts lm train`` checkpoint, or None for a file of weights alone (a
    ``.safetensors`` file, or a ``torch.save`` file without a ``config`` holding the model's fields)."""
    path = Path(path)
    if path.is_dir():
        from gdn2ts.lm.checkpoint import peek

        model = peek(path).get("config", {}).get("model")
        return LMConfig.from_dict(dict(model)) if isinstance(model, dict) else None
    if not path.is_file():
        raise ValueError(f"read_lm_config: argument 'path' expected a checkpoint file or folder, got {str(path)!r}")
    if path.suffix == ".safetensors":
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises RuntimeError or pickle's errors for a file that is not a torch.save
        raise ValueError(f"read_lm_config: {str(path)!r} is not a checkpoint torch.load can read ({e})") from None
    model = ckpt.get("config", {}).get("model") if isinstance(ckpt, dict) else None
    return LMConfig.from_dict(dict(model)) if isinstance(model, dict) else None


def generate_text(model: CausalLM, tokenizer, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int | None = 50, seed: int = 0, bos: bool = False) -> str:
    """``prompt`` continued by ``max_new_tokens`` tokens (prefill in parallel, then one recurrent step per token);
    ``temperature == 0`` is greedy; generation ends early at EOS. Returns the prompt and its continuation as text.

    The prompt follows the token that precedes a document in training: BOS when the data had ``bos``, else EOS
    (the end of the previous document).

    Example:
        >>> from gdn2ts.lm import build_model
        >>> from gdn2ts.lm.tokenizer import load_tokenizer
        >>> import dataclasses
        >>> from gdn2ts.lm import load_recipe
        >>> model = build_model(dataclasses.replace(load_recipe("tiny_gdn2"), vocab_size=258))
        >>> text = generate_text(model, load_tokenizer("bytes"), "To be", max_new_tokens=5)
        >>> text.startswith("To be")
        True
    """
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"generate_text: argument 'prompt' expected a non-empty string, got {prompt!r}")
    ids = [tokenizer.bos_id if bos else tokenizer.eos_id] + list(tokenizer.encode(prompt))
    if max(ids) >= model.config.vocab_size:
        raise ValueError(f"generate_text: the tokenizer gives ids up to {max(ids)}, the model has "
                         f"{model.config.vocab_size} tokens; use the tokenizer the model was trained with")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature=temperature, top_k=top_k,
                         generator=gen)
    new = out[0, len(ids):].tolist()
    if tokenizer.eos_id in new:
        new = new[:new.index(tokenizer.eos_id)]
    return prompt + tokenizer.decode(new)
