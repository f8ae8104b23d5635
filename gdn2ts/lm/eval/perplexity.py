"""Perplexity of a causal LM on held-out tokens: mean next-token negative log-likelihood (nats), its exponential,
the tokens counted and, for text, bits per byte.

Blocks are scored independently (each starts from a fresh state), in eval mode under ``no_grad``, batched.
Positions whose label is ``-100`` are not counted. Packed blocks that carry ``doc_starts`` (as the data pipeline's
``PackedBlocks`` yields them) are scored with every document restarting at its boundary, as in training.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gdn2ts.lm.eval.mqar import IGNORE_INDEX

__all__ = ["PerplexityResult", "perplexity", "text_perplexity"]


@dataclass(frozen=True)
class PerplexityResult:
    """What :func:`perplexity` and :func:`text_perplexity` measured."""

    nll: float
    """Mean negative log-likelihood per predicted token, in nats."""
    perplexity: float
    """``exp(nll)``."""
    tokens: int
    """Predicted tokens counted."""
    bits_per_byte: float | None = None
    """Total NLL in bits over the UTF-8 bytes of the text (text only; None for token blocks)."""
    bytes: int | None = None
    """UTF-8 bytes of the text scored (text only)."""


def _as_item(item, op: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One block as ``(input_ids [T], labels [T], doc_starts or None)``."""
    if isinstance(item, torch.Tensor):
        if item.dim() != 1 or item.shape[0] < 2:
            raise ValueError(f"{op}: a block expected a 1-D token tensor of at least 2 tokens [T + 1], got shape "
                             f"{tuple(item.shape)}")
        return item[:-1], item[1:], None
    if isinstance(item, dict) and "input_ids" in item and "labels" in item:
        ids, labels = item["input_ids"], item["labels"]
        if not (isinstance(ids, torch.Tensor) and isinstance(labels, torch.Tensor) and ids.dim() == 1
                and ids.shape == labels.shape and ids.shape[0] >= 1):
            raise ValueError(f"{op}: a block expected 'input_ids' and 'labels' 1-D tensors of one length, got "
                             f"{getattr(ids, 'shape', type(ids).__name__)} and "
                             f"{getattr(labels, 'shape', type(labels).__name__)}")
        return ids, labels, item.get("doc_starts")
    raise ValueError(f"{op}: a block expected a 1-D token tensor [T + 1] or a dict with 'input_ids' and 'labels' "
                     f"(and optionally 'doc_starts'), got {type(item).__name__}")


def _blocks(blocks, op: str) -> Iterable:
    if isinstance(blocks, torch.Tensor):
        if blocks.dim() != 2 or blocks.shape[1] < 2:
            raise ValueError(f"{op}: argument 'blocks' expected a token tensor [N, T + 1] with T >= 1, got shape "
                             f"{tuple(blocks.shape)}")
        return iter(blocks)
    try:
        return iter(blocks)
    except TypeError:
        raise ValueError(f"{op}: argument 'blocks' expected a tensor [N, T + 1] or an iterable of blocks, got "
                         f"{type(blocks).__name__}") from None


def _score(model, batch: list, device, autocast_dtype) -> tuple[float, int]:
    """Summed NLL and counted tokens of one batch of blocks of one length."""
    ids = torch.stack([b[0] for b in batch]).to(device)
    labels = torch.stack([b[1] for b in batch]).to(device)
    packed = any(b[2] is not None for b in batch)
    with torch.autocast(ids.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        if packed:
            # every row is one or more documents: flatten to [1, B * T] and restart at each document boundary
            B, T = ids.shape
            starts = []
            for row, b in enumerate(batch):
                s = torch.zeros(1, dtype=torch.long)
                if b[2] is not None:
                    s = torch.cat([s, torch.as_tensor(b[2], dtype=torch.long).cpu().reshape(-1)]).unique()
                if int(s.min()) < 0 or int(s.max()) >= T:
                    raise ValueError(f"perplexity: a block's 'doc_starts' expected positions in [0, {T}), got "
                                     f"{s.tolist()}")
                # the row boundary is always a document boundary (rows are independent blocks)
                starts.append(s + row * T)
            cu = torch.cat([torch.cat(starts), torch.tensor([B * T])]).to(ids.device)
            logits, _ = model(ids.reshape(1, -1), cu_seqlens=cu)
            logits = logits.reshape(B, T, -1)
        else:
            logits, _ = model(ids)
    # half-precision logits are scored in fp32; fp64 stays fp64
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="sum")
    return float(nll), int((labels != IGNORE_INDEX).sum())


@torch.no_grad()
def perplexity(model, blocks, batch_size: int = 8, device=None, autocast_dtype: torch.dtype | None = None
               ) -> PerplexityResult:
    """Perplexity of ``model`` (``model(ids [B, T]) -> (logits [B, T, vocab], state)``) on token blocks.

    ``blocks``: a tensor ``[N, T + 1]`` (inputs ``[:, :-1]``, targets ``[:, 1:]``), or an iterable of 1-D
    tensors ``[T + 1]``, or of dicts ``{"input_ids": [T], "labels": [T], "doc_starts": [...] (optional)}``.
    Consecutive blocks of one length are batched ``batch_size`` at a time; ``device`` defaults to the model's.
    The model's train/eval mode is restored afterwards.

    Example:
        >>> from gdn2ts.models.lm import CausalLM
        >>> from gdn2ts.models.lm_config import LMConfig
        >>> model = CausalLM(LMConfig(vocab_size=16, hidden_size=16, num_cells=1, intermediate_size=32,
        ...                           num_heads=2, head_k_dim=8, head_v_dim=8, gate_low_rank=4))
        >>> r = perplexity(model, torch.randint(0, 16, (5, 9)), batch_size=2)
        >>> r.tokens, abs(r.perplexity - 16) < 1       # an untrained model is close to uniform
        (40, True)
    """
    op = "perplexity"
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{op}: argument 'batch_size' expected an int >= 1, got {batch_size!r}")
    items = _blocks(blocks, op)
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count, batch = 0.0, 0, []
    try:
        for item in items:
            block = _as_item(item, op)
            if batch and (len(batch) == batch_size or batch[0][0].shape != block[0].shape):
                s, c = _score(model, batch, device, autocast_dtype)
                total, count, batch = total + s, count + c, []
            batch.append(block)
        if batch:
            s, c = _score(model, batch, device, autocast_dtype)
            total, count = total + s, count + c
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError(f"{op}: argument 'blocks' expected at least one predicted token (a label other than "
                         f"{IGNORE_INDEX}), got none")
    nll = total / count
    return PerplexityResult(nll=nll, perplexity=math.exp(nll), tokens=count)


@torch.no_grad()
def text_perplexity(model, tokenizer, text: str, block_len: int = 1024, batch_size: int = 8, add_bos: bool = True,
                    device=None, autocast_dtype: torch.dtype | None = None) -> PerplexityResult:
    """Perplexity and bits per byte of ``text`` under ``model`` with ``tokenizer`` (``encode(str) -> list[int]``,
    and ``bos_id`` when ``add_bos``).

    The text is tokenized once, BOS-prefixed when ``add_bos`` (then every token of the text is predicted and bits
    per byte cover the whole text), and cut into consecutive blocks that each predict ``block_len`` tokens from the
    tokens before them within the block; the last block may be shorter. Without BOS the first token is context
    only, and bits per byte still divide by every byte of the text (a slight underestimate).

    Example:
        >>> from gdn2ts.models.lm import CausalLM
        >>> from gdn2ts.models.lm_config import LMConfig
        >>> class Bytes:                                # any tokenizer with encode and bos_id
        ...     bos_id = 256
        ...     def encode(self, text): return list(text.encode())
        >>> model = CausalLM(LMConfig(vocab_size=257, hidden_size=16, num_cells=1, intermediate_size=32,
        ...                           num_heads=2, head_k_dim=8, head_v_dim=8, gate_low_rank=4))
        >>> r = text_perplexity(model, Bytes(), "to be or not to be", block_len=8)
        >>> r.tokens, r.bytes, round(r.bits_per_byte * math.log(2) / r.nll, 6)   # bytes are tokens here
        (18, 18, 1.0)
    """
    op = "text_perplexity"
    if not isinstance(text, str) or not text:
        got = repr(text) if isinstance(text, str) else type(text).__name__
        raise ValueError(f"{op}: argument 'text' expected a non-empty string, got {got}")
    if isinstance(block_len, bool) or not isinstance(block_len, int) or block_len < 1:
        raise ValueError(f"{op}: argument 'block_len' expected an int >= 1, got {block_len!r}")
    if not callable(getattr(tokenizer, "encode", None)):
        raise ValueError(f"{op}: argument 'tokenizer' expected an object with encode(text) -> list[int], got "
                         f"{type(tokenizer).__name__}")
    tokens = list(tokenizer.encode(text))
    if add_bos:
        bos = getattr(tokenizer, "bos_id", None)
        if not isinstance(bos, int) or bos < 0:
            raise ValueError(f"{op}: argument 'add_bos' expected a tokenizer with a bos_id (an int >= 0), got "
                             f"bos_id={bos!r}; pass add_bos=False")
        tokens = [bos, *tokens]
    if len(tokens) < 2:
        raise ValueError(f"{op}: argument 'text' expected at least one token to predict, got {len(tokens)} "
                         f"token(s) in all")
    ids = torch.tensor(tokens, dtype=torch.long)
    # block i covers tokens [i * L, (i + 1) * L + 1): neighbours share one token, so each is predicted once
    blocks = [ids[i:i + block_len + 1] for i in range(0, len(tokens) - 1, block_len)]
    r = perplexity(model, blocks, batch_size=batch_size, device=device, autocast_dtype=autocast_dtype)
    n_bytes = len(text.encode("utf-8"))
    return PerplexityResult(nll=r.nll, perplexity=r.perplexity, tokens=r.tokens,
                            bits_per_byte=r.nll * r.tokens / (math.log(2) * n_bytes), bytes=n_bytes)
