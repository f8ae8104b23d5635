"""The config-driven causal language model: embedding, pre-norm [mixer, SwiGLU MLP] blocks, final norm, untied head.

The mixer of each block is chosen by name (:data:`~gdn2ts.models.lm_config.MIXERS`): the recurrent ones run the
GDN-2 op (chunked for ``forward``, recurrent for ``step``), the Mamba-3 ones their own scan and recurrence, the
attention ones keep a KV cache. Shapes: ``input_ids`` ``[B, T]`` int64 -> ``logits`` ``[B, T, vocab]``; the state
is one entry per block (:class:`~gdn2ts.layers.GDN2State`, :class:`~gdn2ts.layers.mamba3.Mamba3State` or
:class:`~gdn2ts.layers.attention.AttentionState`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gdn2ts.layers.attention import Attention, AttentionConfig, AttentionState
from gdn2ts.layers.block import Block
from gdn2ts.layers.gdn2 import GatedDeltaNet2, GDN2State
from gdn2ts.layers.mamba3 import Mamba3, Mamba3State
from gdn2ts.layers.mamba3_config import Mamba3Config
from gdn2ts.layers.mask import check_token_mask
from gdn2ts.layers.mlp import SwiGLU
from gdn2ts.layers.norm import RMSNorm
from gdn2ts.models.lm_config import LMConfig
from gdn2ts.ops.validate import check_values

__all__ = ["CausalLM", "LMBlock", "LMState"]

# One entry per block, first to last.
LMState = tuple[GDN2State | Mamba3State | AttentionState, ...]


class LMBlock(Block):
    """The LM's :class:`~gdn2ts.layers.block.Block`: the mixer named ``mixer`` built from ``config``, a SwiGLU
    MLP; ``[B, T, hidden] -> [B, T, hidden]`` with the mixer's state. Its own class so that FSDP and activation
    checkpointing wrap the LM's blocks by type.

    Example:
        >>> import torch
        >>> cfg = LMConfig(vocab_size=16, hidden_size=32, intermediate_size=48, num_heads=2, head_k_dim=8,
        ...                head_v_dim=8, gate_low_rank=4)
        >>> block = LMBlock(cfg, "kda")
        >>> y, state = block(torch.randn(2, 5, 32))
        >>> y.shape, state.recurrent.shape
        (torch.Size([2, 5, 32]), torch.Size([2, 2, 8, 8]))
    """

    def __init__(self, config: LMConfig, mixer: str):
        mixer_cfg = config.mixer_config(mixer)
        if isinstance(mixer_cfg, AttentionConfig):
            layer = Attention(mixer_cfg)
        elif isinstance(mixer_cfg, Mamba3Config):
            layer = Mamba3(mixer_cfg)
        else:
            layer = GatedDeltaNet2(mixer_cfg)
        super().__init__(layer, SwiGLU(config.hidden_size, config.intermediate_size), config.hidden_size,
                         config.norm_eps)
        self.name = mixer


class CausalLM(nn.Module):
    """Causal LM ``input_ids [B, T] -> logits [B, T, vocab]`` built from an :class:`LMConfig`.

    ``forward`` runs whole sequences (training, prefill), optionally continuing from a state; ``init_state`` and
    ``step`` decode one token per row with the recurrent op and the KV caches; ``generate`` prefills a prompt and
    then steps. Build on ``torch.device("meta")`` to count parameters without memory.

    Example:
        >>> import torch
        >>> cfg = LMConfig(vocab_size=50, hidden_size=32, num_cells=1, cell=("gdn2", "swa"), intermediate_size=48,
        ...                num_heads=2, head_k_dim=8, head_v_dim=8, gate_low_rank=4, attn_num_heads=2,
        ...                attn_head_dim=16, window=4)
        >>> model = CausalLM(cfg).double()
        >>> ids = torch.randint(0, 50, (2, 9))
        >>> logits, state = model(ids[:, :6])
        >>> for t in range(6, 9):
        ...     step_logits, state = model.step(ids[:, t], state)
        >>> full, _ = model(ids)
        >>> logits.shape, bool(torch.allclose(step_logits, full[:, -1], atol=1e-9))
        (torch.Size([2, 6, 50]), True)
    """

    def __init__(self, config: LMConfig):
        super().__init__()
        if not isinstance(config, LMConfig):
            raise ValueError(f"CausalLM: argument 'config' expected an LMConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(LMBlock(config, name) for name in config.layout)
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, ``init_std``) for the embedding, head, MLPs and attention projections; the residual outputs
        (``down_proj``, attention ``o_proj``) get ``init_std / sqrt(2 * layers)`` so that the residual stream's
        variance does not grow with depth; norms 1; the recurrent mixers keep their own init."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.num_layers)
        nn.init.normal_(self.embed.weight, std=std)
        nn.init.normal_(self.lm_head.weight, std=std)
        self.norm.reset_parameters()
        for block in self.blocks:
            block.mixer_norm.reset_parameters()
            block.mlp_norm.reset_parameters()
            mlp = block.mlp
            for lin in (mlp.gate_proj, mlp.up_proj):
                nn.init.normal_(lin.weight, std=std)
            nn.init.normal_(mlp.down_proj.weight, std=out_std)
            if isinstance(block.mixer, Attention):
                for lin in (block.mixer.q_proj, block.mixer.k_proj, block.mixer.v_proj):
                    nn.init.normal_(lin.weight, std=std)
                nn.init.normal_(block.mixer.o_proj.weight, std=out_std)

    # ----------------------------------------------------------------------------------------------------------

    def init_state(self, batch: int, device=None, dtype: torch.dtype | None = None) -> LMState:
        """The state of ``batch`` fresh sequences: zero recurrent states and conv tails, empty KV caches.
        ``dtype`` is the activation dtype (default: the parameters')."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"CausalLM.init_state: argument 'batch' expected an int >= 1, got {batch!r}")
        return tuple(b.mixer.init_state(batch, device=device, dtype=dtype) for b in self.blocks)

    def forward(self, input_ids: torch.Tensor, state: LMState | None = None, cu_seqlens: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LMState | None]:
        """``input_ids`` ``[B, T]`` -> ``(logits [B, T, vocab], new_state)``; differentiable.

        ``state`` continues ``B`` sequences (from :meth:`init_state`, or a previous call); it is not modified.
        ``cu_seqlens`` ``[N + 1]`` packs ``N`` documents into ``input_ids`` ``[1, total]`` (training on packed
        blocks: flatten ``[B, T]`` to ``[1, B * T]`` and include the row boundaries); every mixer restarts at each
        boundary, and the returned state is None.

        ``attention_mask`` ``[B, T]`` (bool or 0/1) skips the tokens where it is False (padding): the recurrent
        mixers pass their state through them unchanged, the attention mixers never attend to them (the returned
        state remembers them for later calls and steps), and their logits carry no meaning. A row whose skipped
        tokens all come first (left padding, as in a batch of prompts of different lengths) gets what it gets
        alone; attention positions count skipped tokens, so a gap between kept tokens is a distance to attention.

        Example:
            >>> import torch
            >>> cfg = LMConfig(vocab_size=20, hidden_size=16, num_cells=1, cell=("kda", "swa"),
            ...                intermediate_size=32, num_heads=2, head_k_dim=8, head_v_dim=8, gate_low_rank=4,
            ...                attn_num_heads=2, attn_head_dim=8, window=3)
            >>> model = CausalLM(cfg).double()
            >>> a, b = torch.randint(0, 20, (1, 5)), torch.randint(0, 20, (1, 4))
            >>> packed, _ = model(torch.cat([a, b], 1), cu_seqlens=torch.tensor([0, 5, 9]))
            >>> bool(torch.allclose(packed[:, 5:], model(b)[0], atol=1e-10))
            True
        """
        op = "CausalLM.forward"
        self._check_ids(op, "input_ids", input_ids, 2)
        if cu_seqlens is not None and state is not None:
            raise ValueError(f"{op}: argument 'state' expected None when cu_seqlens packs documents (each starts "
                             f"fresh), got {type(state).__name__}")
        if attention_mask is not None:
            if cu_seqlens is not None:
                raise ValueError(f"{op}: argument 'attention_mask' expected None when cu_seqlens packs documents "
                                 f"(use one of the two), got a tensor of shape {tuple(attention_mask.shape)}")
            attention_mask = check_token_mask(op, "attention_mask", attention_mask, tuple(input_ids.shape),
                                              input_ids.device)
        states = self._check_state(op, state)
        x = self.embed(input_ids)
        new = []
        for block, s in zip(self.blocks, states, strict=True):
            x, s = block(x, s, cu_seqlens=cu_seqlens, attention_mask=attention_mask)
            new.append(s)
        return self.lm_head(self.norm(x)), None if cu_seqlens is not None else tuple(new)

    @torch.no_grad()
    def step(self, token: torch.Tensor, state: LMState | None = None) -> tuple[torch.Tensor, LMState]:
        """One token per row: ``token`` ``[B]`` -> ``(logits [B, vocab], new_state)``. Inference only."""
        self._check_ids("CausalLM.step", "token", token, 1)
        states = self._check_state("CausalLM.step", state)
        x = self.embed(token)
        new = []
        for block, s in zip(self.blocks, states, strict=True):
            x, s = block.step(x, s)
            new.append(s)
        return self.lm_head(self.norm(x)), tuple(new)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Prefill ``input_ids`` ``[B, T]`` in parallel, then decode ``max_new_tokens`` one step at a time;
        returns ``[B, T + max_new_tokens]``. ``temperature == 0`` is greedy; otherwise samples from the softmax
        of ``logits / temperature``, restricted to the ``top_k`` most likely tokens when given.
        ``attention_mask`` ``[B, T]`` marks left padding (0) of prompts of different lengths: each row continues
        as it would alone (see :meth:`forward`); every row's last prompt token must be kept.

        Example:
            >>> import torch
            >>> cfg = LMConfig(vocab_size=20, hidden_size=16, num_cells=1, intermediate_size=32, num_heads=2,
            ...                head_k_dim=8, head_v_dim=8, gate_low_rank=4)
            >>> out = CausalLM(cfg).generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4)
            >>> out.shape, out[0, :3].tolist()
            (torch.Size([1, 7]), [1, 2, 3])
        """
        op = "CausalLM.generate"
        self._check_ids(op, "input_ids", input_ids, 2)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"{op}: argument 'max_new_tokens' expected an int >= 0, got {max_new_tokens!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
                math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"{op}: argument 'temperature' expected a finite float >= 0 (0: greedy), "
                             f"got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"{op}: argument 'top_k' expected None or an int >= 1, got {top_k!r}")
        if input_ids.shape[1] == 0:
            raise ValueError(f"{op}: argument 'input_ids' expected at least one prompt token per row, got shape "
                             f"{tuple(input_ids.shape)}")
        if attention_mask is not None:
            attention_mask = check_token_mask(op, "attention_mask", attention_mask, tuple(input_ids.shape),
                                              input_ids.device)
            if check_values(attention_mask) and not bool(attention_mask[:, -1].all()):
                rows = attention_mask[:, -1].logical_not().nonzero()[:, 0].tolist()
                raise ValueError(f"{op}: argument 'attention_mask' expected left padding (every row's last prompt "
                                 f"token kept), got rows {rows} ending in padding")
        logits, state = self(input_ids, attention_mask=attention_mask)
        logits = logits[:, -1]
        out = [input_ids]
        for i in range(max_new_tokens):
            token = self._pick(logits, temperature, top_k, generator)
            out.append(token[:, None])
            if i + 1 < max_new_tokens:
                logits, state = self.step(token, state)
        return torch.cat(out, dim=1)

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
        if temperature == 0:
            return logits.argmax(-1)
        logits = logits.float() / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]

    # ----------------------------------------------------------------------------------------------------------

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts: ``blocks`` (the paper's non-embedding count: every mixer, MLP and pre-norm),
        ``embedding``, ``head``, ``final_norm`` and ``total``. Works on the meta device.

        Example:
            >>> cfg = LMConfig(vocab_size=10, hidden_size=8, num_cells=1, cell=("swa",), intermediate_size=4,
            ...                attn_num_heads=2, attn_head_dim=4)
            >>> CausalLM(cfg).num_parameters()
            {'blocks': 368, 'embedding': 80, 'head': 80, 'final_norm': 8, 'total': 536}
        """
        count = {name: sum(p.numel() for p in part.parameters())
                 for name, part in (("blocks", self.blocks), ("embedding", self.embed), ("head", self.lm_head),
                                    ("final_norm", self.norm))}
        count["total"] = sum(p.numel() for p in self.parameters())
        return count

    def _check_ids(self, op: str, name: str, ids, ndim: int) -> None:
        want = "[B, T]" if ndim == 2 else "[B]"
        if not isinstance(ids, torch.Tensor) or ids.dim() != ndim or ids.dtype not in (torch.int32, torch.int64):
            got = f"{ids.dtype} shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"{op}: argument '{name}' expected an int64/int32 tensor {want}, got {got}")
        if ids.shape[0] == 0:
            raise ValueError(f"{op}: argument '{name}' expected at least one row, got shape {tuple(ids.shape)}")
        vocab = self.config.vocab_size
        # reading values synchronizes a CUDA device: checked on the CPU, or when GDN2TS_CHECK_VALUES=1
        if ids.numel() and check_values(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"{op}: argument '{name}' expected token ids in [0, {vocab}), got values in "
                             f"[{int(ids.min())}, {int(ids.max())}]")

    def _check_state(self, op: str, state) -> tuple:
        if state is None:
            return (None,) * len(self.blocks)
        if not isinstance(state, (tuple, list)) or len(state) != len(self.blocks):
            got = f"{len(state)} entries" if isinstance(state, (tuple, list)) else type(state).__name__
            raise ValueError(f"{op}: argument 'state' expected one entry per block ({len(self.blocks)}, from "
                             f"init_state or a previous call), got {got}")
        for i, (block, s) in enumerate(zip(self.blocks, state, strict=True)):
            kind = (AttentionState if isinstance(block.mixer, Attention)
                    else Mamba3State if isinstance(block.mixer, Mamba3) else GDN2State)
            if not isinstance(s, kind):
                article = "an" if kind is AttentionState else "a"
                raise ValueError(f"{op}: argument 'state[{i}]' expected {article} {kind.__name__} (block {i} is "
                                 f"'{block.name}'), got {type(s).__name__}")
        return tuple(state)
