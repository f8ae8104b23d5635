"""Token masks of the mixers: which tokens of a ``[B, T]`` batch a layer reads (True) and which it skips (False)."""

from __future__ import annotations

import torch

from gdn2ts.ops.validate import check_values, fail

__all__ = ["check_token_mask"]


def check_token_mask(op: str, name: str, mask, shape: tuple[int, ...], device) -> torch.Tensor:
    """Validate a bool or 0/1 mask of ``shape`` on ``device``; return it as a bool tensor.

    Example:
        >>> import torch
        >>> check_token_mask("f", "attention_mask", torch.tensor([[0, 1, 1]]), (1, 3), torch.device("cpu")).tolist()
        [[False, True, True]]
        >>> check_token_mask("f", "attention_mask", torch.ones(2, 3), (1, 3), torch.device("cpu"))
        Traceback (most recent call last):
        ...
        ValueError: f: argument 'attention_mask' expected shape [1, 3], got shape (2, 3)
    """
    text = "[" + ", ".join(str(n) for n in shape) + "]"
    if not isinstance(mask, torch.Tensor):
        fail(op, name, f"a bool or 0/1 tensor {text}", type(mask).__name__)
    if tuple(mask.shape) != tuple(shape):
        fail(op, name, f"shape {text}", f"shape {tuple(mask.shape)}")
    if mask.device != device:
        fail(op, name, f"a tensor on {device} (the device of the input)", mask.device)
    if mask.dtype == torch.bool:
        return mask
    # values are read back only where check_values allows (reading them synchronizes a CUDA device); unchecked, any
    # non-zero entry counts as True
    if mask.is_complex() or (check_values(mask) and not bool(((mask == 0) | (mask == 1)).all())):
        fail(op, name, "bool or 0/1 values", f"dtype {mask.dtype} with other values")
    return mask != 0
