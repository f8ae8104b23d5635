"""Functional ops, one folder each: ``gdn2`` (the GDN-2 recurrence: ``chunk_gdn2`` trains and prefills with
autograd through every input, ``recurrent_gdn2`` steps a few tokens of many sequences with explicit state, and
their PyTorch references) and ``conv`` (``causal_conv1d``, the layer's short conv); ``validate`` holds the argument
checks they share.
"""

from gdn2ts.ops.conv import causal_conv1d
from gdn2ts.ops.gdn2 import (
    BACKENDS,
    GDN2Options,
    chunk_gdn2,
    chunk_reference,
    l2norm,
    recurrent_gdn2,
    recurrent_reference,
)

__all__ = [
    "BACKENDS",
    "GDN2Options",
    "causal_conv1d",
    "chunk_gdn2",
    "recurrent_gdn2",
    "l2norm",
    "chunk_reference",
    "recurrent_reference",
]
