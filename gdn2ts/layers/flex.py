"""Causal and sliding-window attention through FlexAttention block masks: the keys outside a query block's window
(or its document, for packed batches) are skipped block by block instead of being masked out of a dense
``[T, L]`` score matrix, so a window of ``W`` costs ``O(T * W)`` rather than ``O(T * L)``.

On CUDA the attention runs through ``torch.compile(flex_attention)`` (one fused Triton kernel, forward and
backward) and the block masks are built compiled and cached per shape; elsewhere FlexAttention's unfused
implementation runs, which is exact but materializes the scores (the tests use it to check the masks against the
dense path).
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

__all__ = ["flex_attend", "window_block_mask", "packed_block_mask"]

# block masks of the dense (unpacked) cases, keyed by shape, offset, window and device; a training run uses one or two
_MASKS: dict[tuple, BlockMask] = {}
_MASKS_MAX = 64


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def window_block_mask(T: int, L: int, window: int | None, device: torch.device) -> BlockMask:
    """The block mask of ``T`` queries at the last ``T`` of ``L`` key positions: query ``i`` sees key ``j`` when
    ``j <= i + (L - T)`` and, with a ``window``, ``j > i + (L - T) - window``.

    Example:
        >>> import torch
        >>> m = window_block_mask(256, 256, 128, torch.device("cpu"))
        >>> m.shape
        (1, 1, 256, 256)
    """
    offset = L - T

    def mask_mod(b, h, q_idx, kv_idx):
        seen = kv_idx <= q_idx + offset
        if window is not None:
            seen = seen & (kv_idx > q_idx + offset - window)
        return seen

    if torch.compiler.is_compiling():
        # inside a compiled model the mask's construction becomes part of the graph (no cache to guard on)
        return create_block_mask(mask_mod, None, None, T, L, device=device)
    key = (T, L, window, device.type, device.index)
    mask = _MASKS.get(key)
    if mask is None:
        mask = create_block_mask(mask_mod, None, None, T, L, device=device, _compile=device.type == "cuda")
        if len(_MASKS) >= _MASKS_MAX:
            _MASKS.clear()
        _MASKS[key] = mask
    return mask


def packed_block_mask(cu_seqlens: torch.Tensor, T: int, window: int | None) -> BlockMask:
    """The block mask of ``T`` packed tokens whose documents start at ``cu_seqlens[:-1]``: token ``i`` sees token
    ``j`` of its own document when ``j <= i`` (and ``j > i - window``). Built per call (the documents change from
    batch to batch) on the device of ``cu_seqlens``, with no host synchronization.

    Example:
        >>> import torch
        >>> m = packed_block_mask(torch.tensor([0, 100, 256]), 256, None)
        >>> m.shape
        (1, 1, 256, 256)
    """
    device = cu_seqlens.device
    index = torch.arange(T, device=device)
    doc = torch.searchsorted(cu_seqlens[1:].to(index.dtype), index, right=True)

    def mask_mod(b, h, q_idx, kv_idx):
        seen = (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)
        if window is not None:
            seen = seen & (kv_idx > q_idx - window)
        return seen

    compiled = device.type == "cuda" and not torch.compiler.is_compiling()
    return create_block_mask(mask_mod, None, None, T, T, device=device, _compile=compiled)


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    """``q`` ``[B, H, T, Dh]``, ``k``, ``v`` ``[B, HKV, L, Dh]`` (``H`` a multiple of ``HKV``) -> ``[B, H, T, Dh]``,
    softmax attention with scale ``Dh ** -0.5`` over the keys ``block_mask`` allows.

    Example:
        >>> import torch
        >>> q, k, v = torch.randn(1, 2, 8, 4), torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4)
        >>> flex_attend(q, k, v, window_block_mask(8, 8, 3, torch.device("cpu"))).shape
        torch.Size([1, 2, 8, 4])
    """
    gqa = q.shape[1] != k.shape[1]
    if not q.is_cuda and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("Attention: backend 'flex' off CUDA runs forward only (FlexAttention has no CPU backward); "
                         "train with backend 'auto' or 'sdpa' there")
    if torch.compiler.is_compiling():
        # a compiled model lowers FlexAttention itself
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    if q.is_cuda:
        return _compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    with warnings.catch_warnings():
        # off CUDA the unfused implementation is the intended one (exact, for checking the masks)
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
