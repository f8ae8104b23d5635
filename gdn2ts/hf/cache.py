"""The decoding state of :class:`~gdn2ts.hf.model.GDN2TSForCausalLM` as a transformers ``Cache``.

It holds the model's own :data:`~gdn2ts.models.lm.LMState`: per layer a fixed-size recurrent state
(:class:`~gdn2ts.layers.GDN2State`, :class:`~gdn2ts.layers.mamba3.Mamba3State`) or an attention layer's KV cache
(:class:`~gdn2ts.layers.attention.AttentionState`, with the mask of the padding it skipped). ``generate`` keeps it
between steps, reorders it for beam search and expands it for several sequences per prompt.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from gdn2ts.models.lm_config import ATTENTION_MIXERS

__all__ = ["GDN2TSCache"]


def _map_rows(state, fn):
    """Apply ``fn`` to every per-row tensor of an LM state (the attention caches' position counters have no rows)."""
    out = []
    for s in state:
        out.append(type(s)(*(t if t is None or t.dim() == 0 else fn(t) for t in s)))
    return tuple(out)


class GDN2TSCache(Cache):
    """The state of a batch of sequences, one entry per layer of ``layout``; empty (``state is None``) until the
    model's first call fills it. Passed to and returned by the model as ``cache``.

    Example:
        >>> import torch
        >>> from gdn2ts.hf import GDN2TSConfig, GDN2TSForCausalLM
        >>> cfg = GDN2TSConfig(lm={"vocab_size": 32, "hidden_size": 16, "num_cells": 1, "cell": ["kda", "swa"],
        ...                        "intermediate_size": 32, "num_heads": 2, "head_k_dim": 8, "head_v_dim": 8,
        ...                        "gate_low_rank": 4, "attn_num_heads": 2, "attn_head_dim": 8, "window": 4})
        >>> out = GDN2TSForCausalLM(cfg)(torch.tensor([[1, 2, 3], [4, 5, 6]]), use_cache=True)
        >>> cache = out.cache
        >>> cache.get_seq_length(), cache.batch_size, cache.is_linear
        (3, 2, [True, False])
    """

    def __init__(self, layout: tuple[str, ...] | list[str], state: tuple | None = None, seen: int = 0):
        super().__init__(layers=[])
        layout = tuple(layout)
        if not layout:
            raise ValueError("GDN2TSCache: argument 'layout' expected the mixer name of every layer, got none")
        if state is not None and (not isinstance(state, tuple) or len(state) != len(layout)):
            raise ValueError(f"GDN2TSCache: argument 'state' expected one entry per layer ({len(layout)}), got "
                             f"{len(state) if isinstance(state, tuple) else type(state).__name__}")
        self.layout = layout
        self.state = state
        self.seen = seen

    def __repr__(self) -> str:
        return f"GDN2TSCache(layers={len(self.layout)}, batch={self.batch_size}, seen={self.seen})"

    def __len__(self) -> int:
        return len(self.layout)

    # ----------------------------------------------------------------------------------------------------------
    # what generate reads

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen by every row, padding included."""
        return self.seen

    def get_max_length(self, layer_idx: int | None = None) -> int:
        """-1: the cache has no fixed length (attention caches grow or slide; recurrent states are fixed)."""
        return -1

    @property
    def batch_size(self) -> int:
        """Rows of the state; -1 while empty."""
        return -1 if self.state is None else int(self.state[0][0].shape[0])

    @property
    def is_linear(self) -> list[bool]:
        """Per layer: True for a recurrent mixer (no per-token cache)."""
        return [name not in ATTENTION_MIXERS for name in self.layout]

    @property
    def is_sliding(self) -> list[bool]:
        return [name == "swa" for name in self.layout]

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self.layout)

    @property
    def is_compileable(self) -> bool:
        # each call replaces the state tensors (no static addresses for CUDA graphs)
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    # ----------------------------------------------------------------------------------------------------------
    # what generate changes

    def reset(self) -> None:
        """Back to empty: the next call starts fresh sequences."""
        self.state, self.seen = None, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Rows ``beam_idx`` of the state (beam search)."""
        if self.state is not None:
            self.state = _map_rows(self.state, lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.state is not None:
            self.state = _map_rows(self.state, lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            self.state = _map_rows(self.state, lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("GDN2TSCache.crop: a recurrent state cannot be taken back to an earlier token (assisted and "
                         "speculative decoding need that); decode without an assistant model")

    def activate_past_recording(self, *args, **kwargs) -> None:
        self.crop(0)

    def update(self, *args, **kwargs):
        raise ValueError("GDN2TSCache.update: the cache is filled by GDN2TSForCausalLM itself (it holds recurrent "
                         "states, not per-layer key/value lists)")
