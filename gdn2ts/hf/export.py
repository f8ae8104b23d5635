"""A ``gdn2ts lm train`` checkpoint as a transformers folder: ``config.json``, ``generation_config.json`` and
``model.safetensors``, loadable with ``AutoModelForCausalLM.from_pretrained`` once :mod:`gdn2ts.hf` is imported."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from gdn2ts.hf.config import GDN2TSConfig
from gdn2ts.hf.model import GDN2TSForCausalLM
from gdn2ts.lm.generate import load_lm

__all__ = ["export_checkpoint", "DTYPES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, dtype: str = "float32") -> GDN2TSForCausalLM:
    """Write the model of ``checkpoint`` (a ``last.ckpt`` or ``step-<n>.ckpt`` of ``gdn2ts lm train``) to
    ``out_dir`` with ``save_pretrained`` (safetensors), its weights in ``dtype`` (float32, bfloat16 or float16).
    The EOS and BOS ids of the checkpoint's tokenizer go into the config, so that ``generate`` stops at EOS.
    Returns the model (in eval mode).

    Example:
        >>> import dataclasses, tempfile, torch
        >>> from gdn2ts.lm import build_model, load_recipe
        >>> model = build_model(dataclasses.replace(load_recipe("tiny_gdn2"), vocab_size=258))
        >>> folder = tempfile.mkdtemp()
        >>> torch.save({"model": model.state_dict(), "config": {"model": dataclasses.asdict(model.config),
        ...             "data": {"tokenizer": "bytes"}}}, f"{folder}/last.ckpt")
        >>> hf = export_checkpoint(f"{folder}/last.ckpt", f"{folder}/hf")
        >>> hf.config.eos_token_id, sorted(p.name for p in Path(f"{folder}/hf").iterdir())
        (257, ['config.json', 'generation_config.json', 'model.safetensors'])
    """
    op = "export_checkpoint"
    if dtype not in DTYPES:
        raise ValueError(f"{op}: argument 'dtype' expected one of {sorted(DTYPES)}, got {dtype!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{op}: argument 'out_dir' expected a folder (new or existing), got the file '{out_dir}'")
    try:
        model, config = load_lm(checkpoint)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError) as e:
        # torch.load's errors on a file that is not a torch checkpoint (or not a weights-only one)
        raise ValueError(f"{op}: '{checkpoint}' is not a checkpoint of gdn2ts lm train (torch.load: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    tokens = {}
    name = (config.get("data") or {}).get("tokenizer")
    if name is not None:
        from gdn2ts.lm.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(name)
        tokens = {"eos_token_id": tokenizer.eos_id, "bos_token_id": tokenizer.bos_id}
    hf_config = GDN2TSConfig.from_lm_config(model.config, **tokens)
    # built on the meta device, then given the checkpoint's module: no second copy of the weights
    with torch.device("meta"):
        hf = GDN2TSForCausalLM(hf_config)
    hf.model = model.to(DTYPES[dtype])
    hf.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out_dir)
    return hf
