"""Functional GDN-2 ops: validation, device dispatch and the PyTorch reference implementations.

``chunk_gdn2`` trains and prefills (autograd through every input); ``recurrent_gdn2`` steps a few tokens of many
sequences with explicit state (forward only). ``reference`` holds the token-by-token ground truth and the
chunked PyTorch form that is the CPU path.
"""

from gdn2ts.ops.gdn2 import BACKENDS, GDN2Options, chunk_gdn2, l2norm, recurrent_gdn2
from gdn2ts.ops.reference import chunk_reference, recurrent_reference

__all__ = [
    "BACKENDS",
    "GDN2Options",
    "chunk_gdn2",
    "recurrent_gdn2",
    "l2norm",
    "chunk_reference",
    "recurrent_reference",
]
