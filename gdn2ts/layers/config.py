"""Configuration of the GDN-2 mixer: one frozen dataclass covers GDN-2 and its special cases (KDA, GDN, Mamba-2)."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["GDN2Config", "VARIANTS"]

ERASE = ("channel", "scalar", "none")
WRITE = ("channel", "scalar", "dt")
DECAY = ("channel", "scalar")
QK_NORM = ("l2", "none")
OUTPUT_GATE = ("silu", "sigmoid")
GATE_PROJ = ("low_rank", "full")
OUTPUT_NORM = ("head", "group")
DECAY_HEADS = ("key", "value")

# Named presets: each is a set of field values; GDN2Config.variant applies one and then the caller's overrides.
VARIANTS: dict[str, dict[str, object]] = {
    # the paper's layer: channel-wise erase (key axis), write (value axis) and decay
    "gdn2": dict(erase="channel", write="channel", decay="channel", qk_norm="l2", tie_erase_write=False),
    # Kimi Delta Attention (Kimi Linear, FLA's KimiDeltaAttention): one scalar beta erases and writes, channel-wise
    # decay per value head, low-rank output gate with a bias through a sigmoid
    "kda": dict(erase="scalar", write="scalar", decay="channel", qk_norm="l2", tie_erase_write=True,
                decay_heads="value", output_gate="sigmoid"),
    # Gated DeltaNet (its paper, FLA's GatedDeltaNet): one scalar beta, scalar decay per value head, a full-rank
    # bias-free output gate through SiLU
    "gdn": dict(erase="scalar", write="scalar", decay="scalar", qk_norm="l2", tie_erase_write=True,
                decay_heads="value", gate_proj="full"),
    # Mamba-2 (SSD, its paper and FLA's Mamba2): q = C, k = B (num_heads B/C groups), v = x; no erase, the write
    # gate is the step size dt, scalar decay -exp(A_log) * dt per SSM (value) head, read-out scale 1, D skip, a
    # conv with bias over x, B and C, and RMSNorm(y * silu(z)) over each group with a full-rank bias-free z
    "mamba2": dict(erase="none", write="dt", decay="scalar", qk_norm="none", tie_erase_write=False, use_d_skip=True,
                   decay_heads="value", scale=1.0, gate_proj="full", output_norm="group", conv_bias=True),
    # the paper's ablations: only one of the two gates is channel-wise
    "erase_only": dict(erase="channel", write="scalar", decay="channel", qk_norm="l2", tie_erase_write=False),
    "write_only": dict(erase="scalar", write="channel", decay="channel", qk_norm="l2", tie_erase_write=False),
}


def _fail(field: str, expected: str, got: object) -> None:
    raise ValueError(f"GDN2Config: field '{field}' expected {expected}, got {got!r}")


@dataclass(frozen=True)
class GDN2Config:
    """Shape and gating of one :class:`~gdn2ts.layers.GatedDeltaNet2` mixer.

    Example:
        >>> from gdn2ts.layers import GDN2Config
        >>> cfg = GDN2Config.variant("kda", hidden_size=64, num_heads=2, head_k_dim=16, head_v_dim=16)
        >>> cfg.erase, cfg.write, cfg.tie_erase_write, cfg.num_v_heads, cfg.conv_channels
        ('scalar', 'scalar', True, 2, 96)
    """

    hidden_size: int
    """Width of the residual stream: the layer maps ``[B, T, hidden_size]`` to ``[B, T, hidden_size]``."""
    num_heads: int
    """Key heads ``H``: q, k, the decay g and the erase gate b have ``H`` heads of ``head_k_dim``."""
    head_k_dim: int = 128
    """Key dimension per head ``K`` (rows of the ``K x V`` state)."""
    head_v_dim: int = 128
    """Value dimension per head ``V`` (columns of the state)."""
    num_v_heads: int | None = None
    """Value heads ``HV = G * H`` (None: ``num_heads``). Each key head serves a group of ``G`` value heads."""
    conv_size: int = 4
    """Width of the causal depthwise conv over the projected q|k|v (1: a per-channel scale, no mixing in time)."""
    gate_low_rank: int = 128
    """Rank of the low-rank decay projection ``W_f`` and of the output gate projection when ``gate_proj`` is
    ``low_rank``."""
    norm_eps: float = 1e-5
    """Epsilon of the per-head output RMSNorm."""
    erase: str = "channel"
    """Erase gate b on the key axis: ``channel`` (``[H, K]``), ``scalar`` (one per head) or ``none`` (b = 0)."""
    write: str = "channel"
    """Write gate w on the value axis: ``channel`` (``[HV, V]``), ``scalar`` or ``dt`` (Mamba-2: w = step size)."""
    decay: str = "channel"
    """Log-decay g on the key axis: ``channel`` (low-rank ``W_f``, ``[heads, K]``) or ``scalar`` (one per head)."""
    decay_heads: str = "key"
    """Heads of the decay (``A_log``, ``dt_bias`` and its projection): ``key`` (``H``, each shared by its ``G``
    value heads: GDN-2) or ``value`` (``HV``: KDA and GDN as in FLA, Mamba-2's one step size per SSM head)."""
    qk_norm: str = "l2"
    """``l2``: q and k are L2-normalized per head; ``none``: used as they come out of the conv (Mamba-2's B, C)."""
    tie_erase_write: bool = False
    """One scalar beta per value head serves as both erase and write gate (KDA, GDN); needs scalar erase and write."""
    erase_max: float = 1.0
    """Upper end of the erase gate's range: ``b = erase_max * sigmoid(.)``; 2.0 is the negative-eigenvalue variant.
    With ``tie_erase_write`` the shared beta is scaled (FLA's ``allow_neg_eigval``)."""
    output_gate: str = "silu"
    """Activation of the output gate: ``silu`` (the GDN-2 paper, GDN, Mamba-2) or ``sigmoid`` (KDA; FLA's GDN-2
    port)."""
    gate_proj: str = "low_rank"
    """Output gate projection: ``low_rank`` (hidden -> ``gate_low_rank`` -> ``HV * V``, with a bias: GDN-2, KDA)
    or ``full`` (hidden -> ``HV * V``, no bias: GDN's gate, Mamba-2's z)."""
    output_norm: str = "head"
    """``head``: ``RMSNorm(o) * act(gate)`` per value head, one ``V`` scale shared by the heads (GDN-2, KDA, GDN);
    ``group``: ``RMSNorm(o * act(gate))`` over the ``G * V`` channels of each key head's value heads, one scale
    per channel (Mamba-2's gated norm, one group per B/C group)."""
    scale: float | None = None
    """Read-out scale: ``o = S^T (scale * q)``; None is ``head_k_dim ** -0.5``; Mamba-2 reads ``C^T h`` (1.0)."""
    conv_bias: bool = False
    """A bias in the short conv, added before its SiLU (Mamba-2's conv has one)."""
    use_d_skip: bool = False
    """Add Mamba-2's skip ``D[h] * v`` (post-conv v, ``D`` per value head, init 1) to the op's output, before
    the norm."""

    def __post_init__(self):
        for name in ("hidden_size", "num_heads", "head_k_dim", "head_v_dim", "conv_size", "gate_low_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                _fail(name, "an int >= 1", value)
        if self.num_v_heads is None:
            # frozen: the resolved default is written once, here
            object.__setattr__(self, "num_v_heads", self.num_heads)
        hv = self.num_v_heads
        if isinstance(hv, bool) or not isinstance(hv, int) or hv < 1 or hv % self.num_heads:
            _fail("num_v_heads", f"None or a positive multiple of num_heads={self.num_heads}", hv)
        eps = self.norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            _fail("norm_eps", "a finite float > 0", eps)
        for name, choices in (("erase", ERASE), ("write", WRITE), ("decay", DECAY), ("qk_norm", QK_NORM),
                              ("output_gate", OUTPUT_GATE), ("gate_proj", GATE_PROJ), ("output_norm", OUTPUT_NORM),
                              ("decay_heads", DECAY_HEADS)):
            if getattr(self, name) not in choices:
                _fail(name, f"one of {choices}", getattr(self, name))
        sc = self.scale
        if sc is not None and (isinstance(sc, bool) or not isinstance(sc, (int, float)) or not math.isfinite(sc)
                               or sc <= 0):
            _fail("scale", "None (head_k_dim ** -0.5) or a finite float > 0", sc)
        for name in ("tie_erase_write", "use_d_skip", "conv_bias"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, "a bool", getattr(self, name))
        em = self.erase_max
        if isinstance(em, bool) or not isinstance(em, (int, float)) or not (0.0 < em <= 2.0):
            _fail("erase_max", "a float in (0, 2] (1.0, or 2.0 for negative eigenvalues)", em)
        self._check_combinations()

    def _check_combinations(self) -> None:
        if self.write == "dt" and (self.decay != "scalar" or self.erase != "none"):
            _fail("write", "'dt' only with decay='scalar' and erase='none' (Mamba-2)",
                  f"write='dt' with decay={self.decay!r}, erase={self.erase!r}")
        if self.tie_erase_write and (self.erase != "scalar" or self.write != "scalar"):
            _fail("tie_erase_write", "True only with erase='scalar' and write='scalar'",
                  f"True with erase={self.erase!r}, write={self.write!r}")
        if self.erase == "none" and self.erase_max != 1.0:
            # the range of a gate that does not exist would be silently ignored
            _fail("erase_max", "1.0 when erase='none'", self.erase_max)

    @classmethod
    def variant(cls, name: str, hidden_size: int, num_heads: int, **overrides) -> GDN2Config:
        """A named preset (``gdn2``, ``kda``, ``gdn``, ``mamba2``, ``erase_only``, ``write_only``); ``overrides``
        replace any field, and the result is validated as a whole.

        Example:
            >>> from gdn2ts.layers import GDN2Config
            >>> cfg = GDN2Config.variant("mamba2", 256, 4, head_k_dim=32, head_v_dim=32)
            >>> cfg.erase, cfg.write, cfg.decay, cfg.qk_norm, cfg.use_d_skip
            ('none', 'dt', 'scalar', 'none', True)
        """
        if name not in VARIANTS:
            raise ValueError(f"GDN2Config.variant: argument 'name' expected one of {tuple(VARIANTS)}, got {name!r}")
        return cls(hidden_size=hidden_size, num_heads=num_heads, **{**VARIANTS[name], **overrides})

    @property
    def key_dim(self) -> int:
        """``H * K``: width of the q and k projections."""
        return self.num_heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        """``HV * V``: width of the v projection and of the op's output."""
        return self.num_v_heads * self.head_v_dim

    @property
    def num_decay_heads(self) -> int:
        """Heads of the decay: ``H`` (``decay_heads == "key"``) or ``HV``."""
        return self.num_heads if self.decay_heads == "key" else self.num_v_heads

    @property
    def conv_channels(self) -> int:
        """Channels of the short conv (q|k|v concatenated): ``2 * H * K + HV * V``."""
        return 2 * self.key_dim + self.value_dim
