"""The recall probes' curriculum: training starts on short recall distances and widens them to the scored range.

With every delay of the lookup drawn from 4 to 128 steps from the first step, no model of the probes' size leaves
chance: the long delays drown the gradient of the short ones before any key is stored. The curriculum scales the
task's distances by a *reach* that grows linearly from ``start`` to 1 over the first ``ramp`` of the training
steps and then stays at 1, so the last ``1 - ramp`` of training and every score use the task as configured:

* needle: the longest delay is ``ceil(reach * max_delay)`` (never below ``min_delay``; the streams are shorter
  with it, and the number of queries is capped by the distinct steps available);
* regimes: the gaps between episodes are ``[ceil(reach * min_gap), ceil(reach * max_gap)]``, so early streams hold
  more episodes and each regime recurs sooner.

A pure function of (configuration, step, steps), like the generators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from gdn2ts.apps.probes_data import NeedleConfig, RegimeConfig

__all__ = ["CurriculumConfig", "reach", "task_at"]


@dataclass(frozen=True)
class CurriculumConfig:
    """How the recall distances grow over training."""

    start: float = 1.0
    """Reach at the first step, a fraction of the configured distances in (0, 1]; 1.0: no curriculum."""
    ramp: float = 0.5
    """Fraction of the training steps over which the reach grows linearly from ``start`` to 1, in [0, 1]."""

    def __post_init__(self):
        for name, ok in (("start", 0.0 < self.start <= 1.0), ("ramp", 0.0 <= self.ramp <= 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok:
                interval = "(0, 1]" if name == "start" else "[0, 1]"
                raise ValueError(f"CurriculumConfig: '{name}' expected a number in {interval}, got {value!r}")


def reach(curriculum: CurriculumConfig, step: int, steps: int) -> float:
    """The reach at ``step`` of ``steps`` (0-based): ``start`` at step 0, 1 from step ``ramp * steps`` on.

    Example:
        >>> c = CurriculumConfig(start=0.25, ramp=0.5)
        >>> [reach(c, s, 8) for s in range(8)]
        [0.25, 0.4375, 0.625, 0.8125, 1.0, 1.0, 1.0, 1.0]
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1 or not 0 <= step < steps:
        raise ValueError(f"reach: expected 0 <= step < steps with steps >= 1, got step={step!r}, steps={steps!r}")
    span = curriculum.ramp * steps
    if curriculum.start >= 1.0 or step >= span:
        return 1.0
    return curriculum.start + (1.0 - curriculum.start) * step / span


def task_at(config: RegimeConfig | NeedleConfig, at: float) -> RegimeConfig | NeedleConfig:
    """``config`` with its recall distances scaled by the reach ``at`` (see the module docstring).

    Example:
        >>> c = task_at(NeedleConfig(min_delay=4, max_delay=128, n_queries=8), 0.1)
        >>> c.max_delay, c.n_queries, task_at(RegimeConfig(min_gap=8, max_gap=48), 0.25).max_gap
        (13, 8, 12)
    """
    if not 0.0 < at <= 1.0:
        raise ValueError(f"task_at: 'at' expected a reach in (0, 1], got {at!r}")
    if at == 1.0:
        return config
    if isinstance(config, NeedleConfig):
        longest = max(config.min_delay, math.ceil(at * config.max_delay))
        return replace(config, max_delay=longest,
                       n_queries=min(config.n_queries, longest - config.min_delay + 1))
    if isinstance(config, RegimeConfig):
        return replace(config, min_gap=math.ceil(at * config.min_gap), max_gap=math.ceil(at * config.max_gap))
    raise ValueError(f"task_at: 'config' expected a RegimeConfig or a NeedleConfig, got {type(config).__name__}")
