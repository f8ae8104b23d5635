"""Configuration of the Mamba-3 mixer (SISO and MIMO): one frozen dataclass, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["MAMBA3_MODES", "ROPE_FRACTIONS", "Mamba3Config"]

MAMBA3_MODES = ("siso", "mimo")
# The fraction of each B/C head's channels that the data-dependent rotation turns (Mamba-3 uses half or all).
ROPE_FRACTIONS = (0.5, 1.0)


def _fail(field: str, expected: str, got: object) -> None:
    raise ValueError(f"Mamba3Config: field '{field}' expected {expected}, got {got!r}")


def _positive_int(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(field, "an int >= 1", value)


@dataclass(frozen=True)
class Mamba3Config:
    """Shape of one :class:`~gdn2ts.layers.mamba3.Mamba3` mixer.

    The state of one sequence is ``num_heads x state_dim x head_dim`` floats (``state_floats``); decoding also
    carries the previous token's rotated B (``rank x num_heads x state_dim``), its ``x`` (``num_heads x
    head_dim``) and the cumulative rotary angles (``num_heads x num_angles``), which the trapezoidal rule and the
    rotation need.

    Example:
        >>> cfg = Mamba3Config(hidden_size=64, num_heads=4, head_dim=16, state_dim=32, mode="mimo", mimo_rank=2)
        >>> cfg.rank, cfg.num_angles, cfg.inner_dim, cfg.state_floats, cfg.in_proj_dim
        (2, 8, 64, 2048, 276)
    """

    hidden_size: int
    """Width of the residual stream: the layer maps ``[B, T, hidden_size]`` to ``[B, T, hidden_size]``."""
    num_heads: int
    """SSM heads ``H``: x, the gate z, the step size dt, the decay A, the trapezoid weight lambda and the skip D
    are per head; every head has its own ``state_dim x head_dim`` state."""
    head_dim: int = 64
    """Channels ``P`` of x (and z) per head: columns of each head's state."""
    state_dim: int = 128
    """State size ``N`` per head (Mamba's ``d_state``): the width of B and C, rows of each head's state."""
    num_bc_heads: int = 1
    """B/C groups ``G``: each group's B and C serve ``num_heads / num_bc_heads`` heads (1: shared by all, as in
    Mamba-2/3's ``ngroups=1``); the learned B/C biases are per head all the same."""
    mode: str = "siso"
    """``siso`` (one input and one output per head and step) or ``mimo`` (``mimo_rank`` of each)."""
    mimo_rank: int = 4
    """MIMO rank ``R``: B and C get ``R`` columns per group, x is scaled into ``R`` inputs and the ``R`` outputs are
    mixed back per channel; only read when ``mode == "mimo"``."""
    rope_fraction: float = 0.5
    """Fraction of each B/C channel vector turned by the data-dependent rotation (0.5 or 1.0): channel pairs
    ``(2i, 2i + 1)`` for ``i < num_angles`` rotate, the rest do not."""
    a_floor: float = 1e-4
    """Smallest decay rate: ``A = -max(softplus(.), a_floor)``, so every head forgets a little."""
    norm_eps: float = 1e-5
    """Epsilon of the RMSNorms on B and C."""
    chunk_size: int = 64
    """Tokens per chunk of the parallel scan (MIMO uses ``max(1, chunk_size // mimo_rank)``: its in-chunk products
    are ``R^2`` times larger)."""

    def __post_init__(self):
        for name in ("hidden_size", "num_heads", "head_dim", "state_dim", "num_bc_heads", "mimo_rank",
                     "chunk_size"):
            _positive_int(name, getattr(self, name))
        if self.num_heads % self.num_bc_heads:
            _fail("num_bc_heads", f"a divisor of num_heads={self.num_heads}", self.num_bc_heads)
        if self.mode not in MAMBA3_MODES:
            _fail("mode", f"one of {MAMBA3_MODES}", self.mode)
        if isinstance(self.rope_fraction, bool) or self.rope_fraction not in ROPE_FRACTIONS:
            _fail("rope_fraction", f"one of {ROPE_FRACTIONS}", self.rope_fraction)
        if self.num_angles < 1:
            _fail("state_dim", f"at least {int(2 / self.rope_fraction)} (one rotated channel pair at "
                  f"rope_fraction={self.rope_fraction})", self.state_dim)
        for name in ("a_floor", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                _fail(name, "a finite float > 0", value)

    @property
    def rank(self) -> int:
        """Inputs/outputs per head and step: 1 for SISO, ``mimo_rank`` for MIMO."""
        return self.mimo_rank if self.mode == "mimo" else 1

    @property
    def num_angles(self) -> int:
        """Rotated channel pairs per B/C vector: ``floor(state_dim * rope_fraction)`` rounded down to even, halved."""
        rotated = int(self.state_dim * self.rope_fraction)
        return (rotated - rotated % 2) // 2

    @property
    def inner_dim(self) -> int:
        """``H * P``: width of x, z and the input of the output projection."""
        return self.num_heads * self.head_dim

    @property
    def state_floats(self) -> int:
        """Floats of one sequence's SSM state: ``H * N * P``."""
        return self.num_heads * self.state_dim * self.head_dim

    @property
    def in_proj_dim(self) -> int:
        """Outputs of the input projection: z, x (``H * P`` each), B, C (``R * G * N`` each), dt, A, lambda
        (``H`` each) and the rotation angles (``num_angles``, shared by the heads)."""
        bc = self.rank * self.num_bc_heads * self.state_dim
        return 2 * self.inner_dim + 2 * bc + 3 * self.num_heads + self.num_angles
