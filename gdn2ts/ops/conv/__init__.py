"""The short-conv op in one folder: ``causal_conv1d`` (``causal.py``: validation, dispatch, the autograd Function
over the Triton kernels of ``gdn2ts.kernels.conv``, and the PyTorch path)."""

from gdn2ts.ops.conv.causal import ACTIVATIONS, CONV_BACKENDS, causal_conv1d

__all__ = ["ACTIVATIONS", "CONV_BACKENDS", "causal_conv1d"]
