"""The GDN-2 op in one folder: public functions, autograd, the Triton launches' wrappers and the PyTorch reference.

========================  =========================================================================================
``chunk.py``              ``chunk_gdn2`` (training, prefill): validation, dispatch, the in-op options
``recurrent.py``          ``recurrent_gdn2`` (decode, streaming): explicit state or a state pool, forward only
``options.py``            ``GDN2Options``, the backends, the activations in PyTorch (``activate``), ``l2norm``
``act_triton.py``         the activations' Triton pre-pass and post-pass as custom ops (``gdn2ts::act_fwd``/``bwd``)
``chunk_triton.py``       the chunked kernels as custom ops (``gdn2ts::chunk_fwd_train``, ``chunk_fwd``, ``chunk_bwd``)
                          with their autograd, and the chunk-aligned layout of packed batches
``reference.py``          the token-by-token ground truth and the chunked PyTorch form (the CPU path)
``decayed.py``            the decayed in-chunk products of the chunked PyTorch form
========================  =========================================================================================

A training call on CUDA runs: ``act_fwd`` (when an option is on) -> the chunked forward (``gdn2ts.kernels.
chunk_fwd``: cumsum, Gram, inverse, WY, state pass) ... backward: the chunked backward (``chunk_bwd``) ->
``act_bwd``. Argument checks shared with the other ops live in ``gdn2ts.ops.validate``.
"""

from gdn2ts.ops.gdn2.chunk import chunk_gdn2
from gdn2ts.ops.gdn2.options import BACKENDS, GDN2Options, l2norm
from gdn2ts.ops.gdn2.recurrent import recurrent_gdn2
from gdn2ts.ops.gdn2.reference import chunk_reference, recurrent_reference

__all__ = ["BACKENDS", "GDN2Options", "chunk_gdn2", "recurrent_gdn2", "l2norm", "chunk_reference",
           "recurrent_reference"]
