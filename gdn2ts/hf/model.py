"""The causal LM as a transformers model: :class:`~gdn2ts.models.lm.CausalLM` inside a ``PreTrainedModel`` with
``GenerationMixin``, so that ``save_pretrained`` / ``from_pretrained`` (safetensors), ``AutoModelForCausalLM`` and
``generate`` work on it.

The forward is the model's own: whole calls through ``CausalLM.forward`` (prefill, training, scoring), and one
token per row with a filled cache through ``CausalLM.step``, exactly as :meth:`CausalLM.generate` decodes. Padding
(``attention_mask`` zeros, left-padded prompts in ``generate``) is skipped by every mixer: the recurrent states
pass through padded positions unchanged and the attention layers never attend to them, so each row of a padded
batch continues as it would alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from gdn2ts.hf.cache import GDN2TSCache
from gdn2ts.hf.config import GDN2TSConfig
from gdn2ts.models.lm import CausalLM

__all__ = ["GDN2TSForCausalLM"]

# transformers' common keyword arguments that this model cannot honour when they are set
_UNSUPPORTED = {
    "output_attentions": "attention weights (the recurrent layers have none)",
    "output_hidden_states": "hidden states of every layer",
    "inputs_embeds": "input embeddings (pass input_ids)",
    "position_ids": "position ids (positions follow from the cache and the attention mask)",
}


class GDN2TSForCausalLM(PreTrainedModel, GenerationMixin):
    """``input_ids [B, T] -> logits [B, T, vocab]`` of a :class:`CausalLM` built from ``config.lm``; ``self.model``
    is that CausalLM (its weights are this model's, under ``model.``).

    Example:
        >>> import torch
        >>> from gdn2ts.hf import GDN2TSConfig
        >>> cfg = GDN2TSConfig(lm={"vocab_size": 32, "hidden_size": 16, "num_cells": 1, "cell": ["gdn2", "swa"],
        ...                        "intermediate_size": 32, "num_heads": 2, "head_k_dim": 8, "head_v_dim": 8,
        ...                        "gate_low_rank": 4, "attn_num_heads": 2, "attn_head_dim": 8, "window": 4})
        >>> model = GDN2TSForCausalLM(cfg).eval()
        >>> prompt = torch.tensor([[1, 2, 3, 4]])
        >>> out = model.generate(prompt, max_new_tokens=5, do_sample=False)
        >>> torch.equal(out, model.model.generate(prompt, 5))
        True
    """

    config_class = GDN2TSConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["LMBlock"]
    supports_gradient_checkpointing = False

    def __init__(self, config: GDN2TSConfig):
        if not isinstance(config, GDN2TSConfig):
            raise ValueError(f"GDN2TSForCausalLM: argument 'config' expected a GDN2TSConfig, got "
                             f"{type(config).__name__}")
        super().__init__(config)
        self.model = CausalLM(config.lm_config)
        self.post_init()

    def _init_weights(self, module) -> None:
        # CausalLM initializes its own weights (the recurrent mixers keep their init, GDN2.md section 2); transformers'
        # generic init would replace it
        return None

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # a DynamicCache holds key/value lists only: generate gets a GDN2TSCache instead (below)
        return False

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs) -> None:
        """An empty :class:`GDN2TSCache` for ``generate`` (unless the caller passed a cache or ``use_cache=False``);
        the first call fills it."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if model_kwargs.get("cache") is None and generation_config.use_cache is not False:
            model_kwargs["cache"] = GDN2TSCache(self.model.config.layout)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.model.lm_head

    def set_output_embeddings(self, value: torch.nn.Linear) -> None:
        self.model.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: GDN2TSCache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """``input_ids`` ``[B, T]`` -> ``CausalLMOutputWithPast(loss, logits [B, T, vocab], cache)``.

        Args:
            input_ids: ``[B, T]`` token ids (after the tokens already in ``cache``).
            attention_mask: ``[B, T]`` or ``[B, seen + T]`` (transformers' convention: the cached tokens first),
                1 for tokens, 0 for padding; only the last ``T`` columns are read (the cache remembers the rest).
            cache: the state of the ``B`` sequences from an earlier call; filled in place and returned.
            use_cache: return the state (default ``config.use_cache``).
            labels: ``[B, T]`` targets of the next-token loss (shifted inside; -100 is ignored).
            logits_to_keep: keep the logits of the last ``n`` positions (0: all), or of the given indices.
            return_dict: False gives a tuple.
        """
        op = "GDN2TSForCausalLM.forward"
        for name, value in kwargs.items():
            if name in _UNSUPPORTED and value is not None and value is not False:
                raise ValueError(f"{op}: argument '{name}' is not supported: this model returns no "
                                 f"{_UNSUPPORTED[name]}")
            if name not in _UNSUPPORTED and value is not None:
                raise ValueError(f"{op}: unknown argument '{name}'")
        if input_ids is None:
            raise ValueError(f"{op}: argument 'input_ids' expected a tensor [B, T] of token ids, got None")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is not None and not isinstance(cache, GDN2TSCache):
            raise ValueError(f"{op}: argument 'cache' expected a GDN2TSCache (from an earlier call, or "
                             f"GDN2TSCache(model.model.config.layout)), got {type(cache).__name__}")
        if cache is not None and cache.layout != self.model.config.layout:
            raise ValueError(f"{op}: argument 'cache' expected the layout of this model {self.model.config.layout}, "
                             f"got {cache.layout}")
        T = input_ids.shape[-1]
        mask = self._current_mask(op, attention_mask, input_ids)
        state = None if cache is None else cache.state
        if state is not None and T == 1 and mask is None and not torch.is_grad_enabled():
            # one token per row: the recurrent step, as CausalLM.generate decodes
            logits, state = self.model.step(input_ids[:, 0], state)
            logits = logits[:, None]
        else:
            logits, state = self.model(input_ids, state, attention_mask=mask)
        if use_cache or cache is not None:
            if cache is None:
                cache = GDN2TSCache(self.model.config.layout)
            cache.state, cache.seen = state, cache.seen + T
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"{op}: argument 'labels' expected shape {tuple(input_ids.shape)} (as input_ids), "
                                 f"got {tuple(labels.shape)}")
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
        if isinstance(logits_to_keep, int):
            if logits_to_keep:
                logits = logits[:, -logits_to_keep:]
        else:
            logits = logits[:, logits_to_keep]
        out = CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)
        return out if return_dict is not False else out.to_tuple()

    @staticmethod
    def _current_mask(op: str, attention_mask, input_ids) -> torch.Tensor | None:
        """The mask of this call's ``T`` tokens (the last ``T`` columns), or None when nothing is padding."""
        if attention_mask is None:
            return None
        B, T = input_ids.shape
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 or \
                attention_mask.shape[0] != B or attention_mask.shape[1] < T:
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else \
                type(attention_mask).__name__
            raise ValueError(f"{op}: argument 'attention_mask' expected a 2-D tensor [B={B}, T >= {T}] (the cached "
                             f"tokens, then this call's), got {got}")
        mask = attention_mask[:, -T:].to(input_ids.device)
        # (the model checks the values; an all-ones mask takes the unmasked path)
        return None if bool((mask == 1).all()) else mask
