"""Typed recipes of ``gdn2ts stream train`` (``tasks/streaming/*.yaml``): what the data become, the encoder's shape
and the optimisation, as nested frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gdn2ts.models.typed_yaml import load_typed
from gdn2ts.models.units import Limits
from gdn2ts.streaming.train import TrainConfig

__all__ = ["DataRecipe", "ModelRecipe", "TrainRecipe", "load_recipe"]


@dataclass(frozen=True)
class DataRecipe:
    """How the rows become training data."""

    holdout: float = 0.1
    """Fraction of each stream's time span held out at its end (validation)."""
    scaling: str = "per_stream"
    """``per_stream`` (each stream's channels scaled by their own training mean and deviation; streams unseen in
    training use the global ones) or ``global``."""
    time_unit: str | None = None
    """The model's time unit (``1h``, ``15min``, ``1d``); None: the data's typical spacing."""
    calendar: bool = True
    """Derive hour-of-day (sub-daily units) and day-of-week covariates from the timestamp."""
    max_abs: float | None = 100.0
    """Input bound stored in the checkpoint: values beyond this many standard deviations are rejected."""
    max_gap: float | None = None
    """Input bound stored in the checkpoint: timestamp jumps beyond this many time units are rejected. None: the
    training data's time span (a jump longer than all the history seen is most likely a unit error)."""
    season: int | None = None
    """Grid rows per season of the seasonal-naive baseline; None: a day for sub-daily units, a week for days."""

    def __post_init__(self):
        if not 0 < self.holdout < 0.9:
            raise ValueError(f"data: 'holdout' expected a fraction in (0, 0.9), got {self.holdout!r}")
        if self.scaling not in ("per_stream", "global"):
            raise ValueError(f"data: 'scaling' expected 'per_stream' or 'global', got {self.scaling!r}")
        if self.season is not None and (isinstance(self.season, bool) or self.season < 1):
            raise ValueError(f"data: 'season' expected a positive int, got {self.season!r}")
        Limits(self.max_abs, self.max_gap)


@dataclass(frozen=True)
class ModelRecipe:
    """The encoder's shape (see :class:`~gdn2ts.models.EncoderConfig`)."""

    hidden_size: int = 32
    """Width of the residual stream."""
    n_layers: int = 2
    """GDN-2 blocks."""
    num_heads: int = 2
    """Heads per mixer."""
    head_dim: int = 16
    """Key and value size per head."""
    horizon: int = 24
    """Time units forecast ahead."""
    quantiles: tuple[float, ...] = (0.1, 0.5, 0.9)
    """Forecast quantile levels."""
    variant: str = "gdn2"
    """Mixer preset (gdn2, kda, gdn, mamba2, erase_only, write_only)."""


@dataclass(frozen=True)
class TrainRecipe:
    """A ``gdn2ts stream train`` recipe."""

    data: DataRecipe = field(default_factory=DataRecipe)
    """Split, scaling, time unit, covariates, input bounds."""
    model: ModelRecipe = field(default_factory=ModelRecipe)
    """The encoder."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimisation (windows, steps, learning rate, time limit, seed)."""
    threads: int = 1
    """Torch CPU threads while training."""


def load_recipe(path: str | Path) -> TrainRecipe:
    """A :class:`TrainRecipe` from YAML, typed and validated (unknown keys and wrong types are errors).

    Example:
        >>> load_recipe("tasks/streaming/tiny.yaml").train.steps > 0
        True
    """
    return load_typed(TrainRecipe, path)
