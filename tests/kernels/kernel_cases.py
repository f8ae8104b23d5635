"""Names shared by the kernel tests (imported by bare name: pytest puts this folder on ``sys.path``)."""

from __future__ import annotations

import torch

# without a GPU the kernels run under the Triton interpreter on CPU tensors (tests/conftest.py)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the op's inputs in call order, and the gates among them
ARGS = ("q", "k", "v", "g", "b", "w")
GATES = ("g", "b", "w")


def on(x: dict) -> dict:
    """The tensors of an input dict on ``DEVICE`` (``None`` entries kept)."""
    return {n: (t.to(DEVICE) if t is not None else None) for n, t in x.items()}
