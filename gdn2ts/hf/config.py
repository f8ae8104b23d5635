"""The Hugging Face configuration of the causal LM: an :class:`~gdn2ts.models.lm_config.LMConfig`, nested under
``lm`` so that its fields, their checks and their defaults stay in one place."""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PretrainedConfig

from gdn2ts.models.lm_config import LMConfig

__all__ = ["MODEL_TYPE", "GDN2TSConfig"]

MODEL_TYPE = "gdn2ts"


class GDN2TSConfig(PretrainedConfig):
    """``model_type = "gdn2ts"``: every mixer and layout of :class:`~gdn2ts.models.lm.CausalLM`, its fields in
    ``lm`` (a mapping of :class:`LMConfig` fields, checked by it), plus the token ids generation needs.

    ``config.json`` holds ``{"model_type": "gdn2ts", "lm": {...}, ...}``; ``vocab_size``, ``hidden_size`` and
    ``num_hidden_layers`` read through to ``lm``.

    Example:
        >>> cfg = GDN2TSConfig(lm={"vocab_size": 64, "hidden_size": 32, "num_cells": 1, "cell": ["gdn2", "swa"],
        ...                        "intermediate_size": 64, "num_heads": 2, "head_k_dim": 8, "head_v_dim": 8,
        ...                        "gate_low_rank": 4, "attn_num_heads": 2, "attn_head_dim": 16, "window": 8})
        >>> cfg.lm_config.layout, cfg.num_hidden_layers, cfg.vocab_size
        (('gdn2', 'swa'), 2, 64)
        >>> GDN2TSConfig(lm={"hidden_sise": 32})
        Traceback (most recent call last):
        ...
        ValueError: LMConfig: unknown field(s) ['hidden_sise']; expected some of [...]
    """

    model_type = MODEL_TYPE

    lm: dict | None = None
    """The :class:`LMConfig` fields (None: LMConfig's defaults, the paper's 1.3B recurrent model)."""
    bos_token_id: int | None = None
    """The token a document starts with, when the training data had one."""
    eos_token_id: int | list[int] | None = None
    """The token that ends a document; generation stops there."""
    pad_token_id: int | None = None
    """The token of padding (its positions are skipped through ``attention_mask``)."""
    use_cache: bool = True
    """Whether ``forward`` returns the decoding state (a :class:`~gdn2ts.hf.cache.GDN2TSCache`) by default."""
    tie_word_embeddings: bool = False
    """The head is never tied to the embedding; True is refused."""

    def __post_init__(self, **kwargs: Any):
        got = kwargs.get("model_type", MODEL_TYPE)
        if got != MODEL_TYPE:
            raise ValueError(f"GDN2TSConfig: field 'model_type' expected '{MODEL_TYPE}', got {got!r} (a config of "
                             f"another architecture; load it with its own class or AutoConfig)")
        flat = sorted(set(kwargs) & {f.name for f in dataclasses.fields(LMConfig)})
        if flat:
            raise ValueError(f"GDN2TSConfig: LMConfig field(s) {flat} given at the top level; expected them inside "
                             f"lm={{...}}")
        if self.lm is not None and not isinstance(self.lm, dict):
            raise ValueError(f"GDN2TSConfig: field 'lm' expected a mapping of LMConfig fields, got "
                             f"{type(self.lm).__name__}")
        if self.tie_word_embeddings:
            raise ValueError("GDN2TSConfig: field 'tie_word_embeddings' expected False (the model's head is untied), "
                             "got True")
        # checked (and completed with the defaults) by LMConfig; stored as plain JSON values
        fields = dataclasses.asdict(LMConfig.from_dict(dict(self.lm or {})))
        self.lm = {**fields, "cell": list(fields["cell"])}
        vocab = fields["vocab_size"]
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) and name == "eos_token_id" else [value]
            if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab
                                             for i in ids):
                raise ValueError(f"GDN2TSConfig: field '{name}' expected None or a token id in [0, {vocab}) (the "
                                 f"model's vocabulary), got {value!r}")
        super().__post_init__(**kwargs)

    @classmethod
    def from_lm_config(cls, config: LMConfig, **kwargs: Any) -> GDN2TSConfig:
        """The configuration of ``config`` (token ids and other fields as keywords).

        Example:
            >>> GDN2TSConfig.from_lm_config(LMConfig(hidden_size=64, num_heads=2), eos_token_id=2).lm["num_heads"]
            2
        """
        if not isinstance(config, LMConfig):
            raise ValueError(f"GDN2TSConfig.from_lm_config: argument 'config' expected an LMConfig, got "
                             f"{type(config).__name__}")
        return cls(lm=dataclasses.asdict(config), **kwargs)

    @property
    def lm_config(self) -> LMConfig:
        """The :class:`LMConfig` of ``lm``."""
        return LMConfig.from_dict(dict(self.lm))

    @property
    def vocab_size(self) -> int:
        return self.lm["vocab_size"]

    @property
    def hidden_size(self) -> int:
        return self.lm["hidden_size"]

    @property
    def num_hidden_layers(self) -> int:
        return self.lm["num_cells"] * len(self.lm["cell"])
