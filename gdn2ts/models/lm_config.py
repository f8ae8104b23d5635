"""Configuration of the causal language model: one frozen dataclass, loadable from a YAML recipe's ``model:``."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from gdn2ts.layers.attention import AttentionConfig
from gdn2ts.layers.config import VARIANTS, GDN2Config
from gdn2ts.layers.mamba3_config import ROPE_FRACTIONS, Mamba3Config

__all__ = ["LMConfig", "MIXERS", "ATTENTION_MIXERS", "MAMBA3_MIXERS", "RECURRENT_MIXERS"]

# The recurrent mixers are GDN2Config's named presets, all on the one GDN-2 op.
RECURRENT_MIXERS: tuple[str, ...] = tuple(VARIANTS)
# "swa" is sliding-window attention (window ``LMConfig.window``); "attention" is full causal attention.
ATTENTION_MIXERS: tuple[str, ...] = ("swa", "attention")
# Mamba-3 has its own recurrence (trapezoidal, rotary, MIMO) and its own layer, gdn2ts.layers.mamba3.
MAMBA3_MIXERS: tuple[str, ...] = ("mamba3_siso", "mamba3_mimo")
MIXERS: tuple[str, ...] = RECURRENT_MIXERS + MAMBA3_MIXERS + ATTENTION_MIXERS


def _fail(field: str, expected: str, got: object) -> None:
    raise ValueError(f"LMConfig: field '{field}' expected {expected}, got {got!r}")


def _positive_int(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(field, "an int >= 1", value)


@dataclass(frozen=True)
class LMConfig:
    """A causal LM: embedding, ``num_cells`` repeats of ``cell`` (each mixer followed by a SwiGLU MLP, both
    pre-norm residual), a final RMSNorm and an untied output head.

    ``cell=("gdn2",)`` with ``num_cells=18`` is the paper's recurrent model; ``cell=("gdn2", "swa")`` with
    ``num_cells=9`` its hybrid ([GDN-2, MLP, SWA, MLP] cells).

    Example:
        >>> cfg = LMConfig(vocab_size=64, hidden_size=32, num_cells=2, cell=["gdn2", "swa"], intermediate_size=64,
        ...                num_heads=2, head_k_dim=8, head_v_dim=8, gate_low_rank=4, attn_num_heads=2,
        ...                attn_head_dim=16, window=8)
        >>> cfg.layout, cfg.state_floats_per_layer
        (('gdn2', 'swa', 'gdn2', 'swa'), 128)
    """

    vocab_size: int = 32000
    """Tokens in the vocabulary (rows of the embedding, outputs of the head)."""
    hidden_size: int = 2304
    """Width ``d_model`` of the residual stream."""
    num_cells: int = 18
    """Repeats of ``cell``; the model has ``num_cells * len(cell)`` mixer layers, each followed by an MLP."""
    cell: tuple[str, ...] = ("gdn2",)
    """Mixer names of one cell, in order: recurrent ``gdn2``, ``kda``, ``gdn``, ``mamba2``, ``erase_only``,
    ``write_only`` (GDN2Config presets), ``mamba3_siso``, ``mamba3_mimo`` (Mamba-3) or ``swa`` (sliding
    window), ``attention`` (full causal). A list is accepted and stored as a tuple."""
    intermediate_size: int = 6208
    """Channels of every SwiGLU MLP (``3 * hidden_size * intermediate_size`` parameters each)."""
    num_heads: int = 16
    """Key heads ``H`` of the recurrent mixers (Mamba-2 and Mamba-3: their B/C groups, each shared by
    ``num_v_heads / num_heads`` SSM heads)."""
    head_k_dim: int = 128
    """Key dimension per head of the recurrent mixers (rows of each head's state; Mamba-2 and Mamba-3:
    ``d_state``)."""
    head_v_dim: int = 128
    """Value dimension per head of the recurrent mixers (columns of each head's state; Mamba-2 and Mamba-3: their
    head dimension)."""
    num_v_heads: int | None = None
    """Value heads of the recurrent mixers (None: ``num_heads``; Mamba-2 and Mamba-3: their SSM heads); the state
    holds ``num_v_heads * head_k_dim * head_v_dim`` floats per layer."""
    conv_size: int = 4
    """Width of the recurrent mixers' short causal conv."""
    gate_low_rank: int = 128
    """Rank of the recurrent mixers' low-rank decay and output-gate projections (GDN-2's and KDA's; GDN's gate and
    Mamba-2's z are full rank)."""
    attn_num_heads: int = 18
    """Query heads of the attention mixers."""
    attn_num_kv_heads: int | None = None
    """Key/value heads of the attention mixers (None: ``attn_num_heads``)."""
    attn_head_dim: int = 128
    """Dimension per head of the attention mixers."""
    mimo_rank: int = 4
    """Rank ``R`` of the ``mamba3_mimo`` mixers: inputs and outputs per head and step (B and C get ``R`` columns
    per group)."""
    rope_fraction: float = 0.5
    """Fraction of each B/C vector that the Mamba-3 mixers' data-dependent rotation turns: 0.5 or 1.0."""
    window: int = 2048
    """Sliding window of the ``swa`` mixers: a token attends to itself and the ``window - 1`` tokens before it."""
    rope_theta: float = 10000.0
    """Base of the attention mixers' rotary position frequencies."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm (pre-norms, the final norm, the mixers' output norms)."""
    init_std: float = 0.02
    """Standard deviation of the normal init of the embedding, the head, the MLPs and the attention projections
    (the residual outputs ``down_proj`` / ``o_proj`` get ``init_std / sqrt(2 * layers)``). The recurrent mixers
    keep their own init (GDN2.md section 2)."""

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_cells", "intermediate_size", "num_heads", "head_k_dim",
                     "head_v_dim", "conv_size", "gate_low_rank", "attn_num_heads", "attn_head_dim", "window",
                     "mimo_rank"):
            _positive_int(name, getattr(self, name))
        cell = self.cell
        if isinstance(cell, list):
            # YAML gives lists; the frozen config stores a tuple so that it stays hashable
            cell = tuple(cell)
            object.__setattr__(self, "cell", cell)
        if not isinstance(cell, tuple) or not cell or any(m not in MIXERS for m in cell):
            _fail("cell", f"a non-empty list of mixer names from {MIXERS}", self.cell)
        for name in ("norm_eps", "init_std", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                _fail(name, "a finite float > 0", value)
        hv = self.num_v_heads
        if hv is not None and (isinstance(hv, bool) or not isinstance(hv, int) or hv < 1 or hv % self.num_heads):
            _fail("num_v_heads", f"None or a positive multiple of num_heads={self.num_heads}", hv)
        kv = self.attn_num_kv_heads
        if kv is not None and (isinstance(kv, bool) or not isinstance(kv, int) or kv < 1
                               or self.attn_num_heads % kv):
            _fail("attn_num_kv_heads", f"None or a divisor of attn_num_heads={self.attn_num_heads}", kv)
        if self.attn_head_dim % 2:
            _fail("attn_head_dim", "an even int (rotary positions rotate channel pairs)", self.attn_head_dim)
        if self.rope_theta <= 1:
            _fail("rope_theta", "a float > 1", self.rope_theta)
        if isinstance(self.rope_fraction, bool) or self.rope_fraction not in ROPE_FRACTIONS:
            _fail("rope_fraction", f"one of {ROPE_FRACTIONS}", self.rope_fraction)
        if any(m in MAMBA3_MIXERS for m in cell) and int(self.head_k_dim * self.rope_fraction) < 2:
            _fail("head_k_dim", f"at least {int(2 / self.rope_fraction)} for the Mamba-3 mixers (one rotated "
                  f"channel pair at rope_fraction={self.rope_fraction})", self.head_k_dim)

    def mixer_config(self, name: str) -> GDN2Config | Mamba3Config | AttentionConfig:
        """The layer config of mixer ``name`` (one of :data:`MIXERS`) at this model's sizes.

        Example:
            >>> LMConfig(hidden_size=64, num_heads=2, head_k_dim=16, head_v_dim=16).mixer_config("kda").erase
            'scalar'
        """
        if name in RECURRENT_MIXERS:
            return GDN2Config.variant(name, self.hidden_size, self.num_heads, head_k_dim=self.head_k_dim,
                                      head_v_dim=self.head_v_dim, num_v_heads=self.num_v_heads,
                                      conv_size=self.conv_size, gate_low_rank=self.gate_low_rank,
                                      norm_eps=self.norm_eps)
        if name in MAMBA3_MIXERS:
            return Mamba3Config(self.hidden_size, self.num_v_heads or self.num_heads, head_dim=self.head_v_dim,
                                state_dim=self.head_k_dim, num_bc_heads=self.num_heads,
                                mode=name.removeprefix("mamba3_"), mimo_rank=self.mimo_rank,
                                rope_fraction=self.rope_fraction, norm_eps=self.norm_eps)
        if name in ATTENTION_MIXERS:
            return AttentionConfig(self.hidden_size, self.attn_num_heads, head_dim=self.attn_head_dim,
                                   num_kv_heads=self.attn_num_kv_heads,
                                   window=self.window if name == "swa" else None, rope_theta=self.rope_theta)
        raise ValueError(f"LMConfig.mixer_config: argument 'name' expected one of {MIXERS}, got {name!r}")

    @property
    def layout(self) -> tuple[str, ...]:
        """The mixer of every layer, first to last: ``cell * num_cells``."""
        return self.cell * self.num_cells

    @property
    def num_layers(self) -> int:
        """Mixer layers (each with its MLP): ``num_cells * len(cell)``."""
        return len(self.layout)

    @property
    def state_floats_per_layer(self) -> int:
        """Floats of one recurrent mixer's state: ``num_v_heads * head_k_dim * head_v_dim``."""
        return (self.num_v_heads or self.num_heads) * self.head_k_dim * self.head_v_dim

    @classmethod
    def from_dict(cls, values: dict) -> LMConfig:
        """Build from a mapping of field names; an unknown key is a ValueError naming it.

        Example:
            >>> LMConfig.from_dict({"hidden_size": 64, "num_heads": 2, "head_k_dim": 16, "head_v_dim": 16}).num_layers
            18
        """
        if not isinstance(values, dict):
            raise ValueError(f"LMConfig.from_dict: argument 'values' expected a mapping of fields, got "
                             f"{type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"LMConfig: unknown field(s) {unknown}; expected some of {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> LMConfig:
        """The ``model:`` section of a YAML recipe (other top-level sections belong to data, training and
        evaluation, and are read by their own loaders)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"LMConfig.from_yaml: argument 'path' expected an existing YAML file, got '{path}'")
        recipe = yaml.safe_load(path.read_text())
        if not isinstance(recipe, dict) or not isinstance(recipe.get("model"), dict):
            raise ValueError(f"LMConfig.from_yaml: '{path}' expected a mapping with a 'model:' section of "
                             f"LMConfig fields, got {type(recipe).__name__}")
        return cls.from_dict(recipe["model"])
