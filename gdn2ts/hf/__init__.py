"""Hugging Face transformers for the causal LM (the ``hf`` extra: ``pip install -e ".[hf]"``).

:class:`GDN2TSConfig` (``model_type = "gdn2ts"``) and :class:`GDN2TSForCausalLM` wrap
:class:`~gdn2ts.models.lm.CausalLM` for every mixer and layout; importing this package registers them with
``AutoConfig`` and ``AutoModelForCausalLM``. :class:`GDN2TSCache` carries the recurrent states and the attention
layers' KV caches through ``generate``; :func:`export_checkpoint` turns a ``gdn2ts lm train`` checkpoint into a
``save_pretrained`` folder (``gdn2ts lm export``). See ``docs/hf.md``.

Example:
    >>> import torch
    >>> from transformers import AutoModelForCausalLM
    >>> cfg = GDN2TSConfig(lm={"vocab_size": 32, "hidden_size": 16, "num_cells": 1, "cell": ["mamba2"],
    ...                        "intermediate_size": 32, "num_heads": 2, "head_k_dim": 8, "head_v_dim": 8,
    ...                        "gate_low_rank": 4})
    >>> type(AutoModelForCausalLM.from_config(cfg)).__name__
    'GDN2TSForCausalLM'
"""

from __future__ import annotations

try:
    import transformers
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("gdn2ts.hf needs Hugging Face transformers, the 'hf' extra: pip install -e \".[hf]\"") from e

from gdn2ts.hf.cache import GDN2TSCache
from gdn2ts.hf.config import MODEL_TYPE, GDN2TSConfig
from gdn2ts.hf.export import export_checkpoint
from gdn2ts.hf.model import GDN2TSForCausalLM

__all__ = ["MODEL_TYPE", "GDN2TSCache", "GDN2TSConfig", "GDN2TSForCausalLM", "export_checkpoint"]

transformers.AutoConfig.register(MODEL_TYPE, GDN2TSConfig, exist_ok=True)
transformers.AutoModelForCausalLM.register(GDN2TSConfig, GDN2TSForCausalLM, exist_ok=True)
