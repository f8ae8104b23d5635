"""Output buffers of the kernels' host launchers: ``empty`` is ``torch.empty``, or a NaN-filled buffer while the
tests set ``POISON`` (so an element no program wrote shows up in a comparison instead of passing on stale memory)."""

from __future__ import annotations

import torch

__all__ = ["POISON", "empty"]

POISON = False


def empty(*shape, device, dtype) -> torch.Tensor:
    if POISON:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(*shape, device=device, dtype=dtype)
