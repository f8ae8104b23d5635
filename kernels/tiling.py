"""The chunked kernels' tuning knobs, one frozen dataclass per direction, with the defaults measured on an H100
(``docs/performance.md``; ``python -m gdn2ts.bench.profile_chunk`` passes other tilings). A field left at None is
chosen by the launcher from the inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["FwdTiling", "BwdTiling"]


@dataclass(frozen=True)
class FwdTiling:
    """Launch shapes and storage forms of the chunked forward (``gdn2ts.kernels.chunk_fwd.chunk_fwd``)."""

    block_v: int | None = None
    """The state pass's value block (None: by the number of (sequence, value head) pairs)."""
    num_warps: int = 4
    """Warps of the state pass."""
    num_stages: int | None = None
    """Load pipelining of the state pass (None: with ``block_v``)."""
    gram_warps: int = 2
    """Warps of the Gram launch (its 16 x 16 reductions stay inside a warp)."""
    gram_stages: int = 2
    """Load pipelining of the Gram launch."""
    inverse_warps: int = 1
    """Warps of the inverse launch."""
    inverse_rows_from_memory: bool = False
    """The inverse's substitution reads each row of the erase Gram from memory (instead of from registers)."""
    wy_warps: int = 2
    """Warps of the WY launch."""
    decayed_qk: bool | None = None
    """The Gram launch also writes the decayed queries and tail keys for the sequential passes (None: with
    ``lowp``)."""
    lowp: bool | None = None
    """The state pass runs its products on 16-bit operands (None: for 16-bit inputs without ``save``)."""
    key_dtype: torch.dtype | None = None
    """Storage of the key-side intermediates (None: the input dtype with ``lowp``, else fp32)."""
    u_dtype: torch.dtype | None = None
    """Storage of ``U`` (None: as ``key_dtype``'s rule)."""
    fused_wy: bool | None = None
    """No WY launch: the state pass forms ``R = L^-1 (w v - E S)`` (None: with ``lowp``; never with ``save``)."""
    linv_dtype: torch.dtype | None = None
    """Storage of ``L^-1`` (None: ``key_dtype`` with ``fused_wy`` and ``lowp``, else fp32)."""
    akk_dtype: torch.dtype | None = None
    """Storage of the erase Gram between the Gram and inverse launches (None: fp32)."""
    saved_state_dtype: torch.dtype = torch.float32
    """Storage of the chunk entry states kept for the backward (``save``)."""


@dataclass(frozen=True)
class BwdTiling:
    """Launch shapes of the chunked backward (``gdn2ts.kernels.chunk_bwd.chunk_bwd``). Measured at K = V = 128 on
    an H100: 4 warps for the state and value-axis kernels (8 spill fewer registers but ran 2-4 % slower), the state
    kernel's loads 2 stages deep (3, or value blocks of 64, need more shared memory than an H100 has); 8 warps for
    the whole-chunk Gram kernel (4 ran 20 % slower)."""

    block_v: int = 32
    """Value block of the state-gradient pass (at least 32: with 16, triton 3.6 on Hopper computed wrong
    gradients)."""
    num_warps: int = 4
    """Warps of the state-gradient pass."""
    num_stages: int = 2
    """Load pipelining of the state-gradient pass and the key-axis kernel."""
    intra_warps: int = 4
    """Warps of the value-axis and key-axis kernels."""
    dk_block_v: int = 32
    """Value block of the key-axis kernel."""
    gram_warps: int = 8
    """Warps of the whole-chunk Gram-gradient kernel."""
