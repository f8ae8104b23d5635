"""GDN-2 layers (``nn.Module``\\ s) built on :mod:`gdn2ts.ops`: the mixer, its config and its parts.

``GatedDeltaNet2`` covers GDN-2 and, by configuration, KDA, Gated DeltaNet and Mamba-2 (``GDN2Config.variant``);
``Mamba3`` is the Mamba-3 mixer (SISO and MIMO, plain PyTorch).
"""

from gdn2ts.layers.config import VARIANTS, GDN2Config
from gdn2ts.layers.conv import ShortConv, causal_conv1d
from gdn2ts.layers.gdn2 import GatedDeltaNet2, GDN2State
from gdn2ts.layers.mamba3 import Mamba3, Mamba3State
from gdn2ts.layers.mamba3_config import Mamba3Config
from gdn2ts.layers.norm import GatedRMSNorm, RMSNorm, rms_norm

__all__ = [
    "VARIANTS",
    "GDN2Config",
    "GDN2State",
    "GatedDeltaNet2",
    "GatedRMSNorm",
    "Mamba3",
    "Mamba3Config",
    "Mamba3State",
    "RMSNorm",
    "ShortConv",
    "causal_conv1d",
    "rms_norm",
]
