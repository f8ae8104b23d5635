"""The one learning-rate schedule of every trainer in the package: linear warmup, then a cosine decay to a floor.

The causal LM (:func:`gdn2ts.lm.optim.build_scheduler`), the MQAR runs, the stream encoder's :func:`fit
<gdn2ts.streaming.train.fit>` and the probes all take their learning rates from :class:`WarmupCosine`; they differ
only in its numbers (the warmup, the floor and the step at which the cosine reaches it). The stream encoder's
trainers share theirs, :func:`encoder_schedule`.
"""

from __future__ import annotations

import math

__all__ = ["WarmupCosine", "encoder_schedule"]


def _int_at_least(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"WarmupCosine: argument '{name}' expected an int >= {low}, got {value!r}")


class WarmupCosine:
    """The learning rate (or, with ``peak=1``, the factor of it) at optimizer step ``step`` (0-based) of
    ``total_steps``: ``peak * (step + 1) / warmup_steps`` during the warmup, then a cosine from ``peak`` down to
    ``min_ratio * peak`` at step ``floor_step`` (by default the last, ``total_steps - 1``); it stays at the floor
    after that. A run with no step between the warmup and ``floor_step`` stays at the peak.

    A callable object rather than a closure so that ``LambdaLR.state_dict()`` records its numbers and a checkpoint
    stays plain data.

    Example:
        >>> f = WarmupCosine(warmup_steps=2, total_steps=6, min_ratio=0.1)
        >>> [round(f(s), 4) for s in range(6)]
        [0.5, 1.0, 1.0, 0.775, 0.325, 0.1]
        >>> g = WarmupCosine(warmup_steps=1, total_steps=3, min_ratio=0.1, peak=2.0, floor_step=3)
        >>> [round(g(s), 4) for s in range(3)]
        [2.0, 2.0, 1.1]
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float, *, peak: float = 1.0,
                 floor_step: int | None = None):
        _int_at_least("warmup_steps", warmup_steps, 0)
        _int_at_least("total_steps", total_steps, 1)
        if floor_step is not None:
            _int_at_least("floor_step", floor_step, 0)
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_ratio = min_ratio
        self.peak = peak
        self.floor_step = floor_step

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        floor_step = self.total_steps - 1 if self.floor_step is None else self.floor_step
        span = floor_step - self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / span) if span > 0 else 0.0
        return self.peak * (self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def encoder_schedule(steps: int, peak: float = 1.0) -> WarmupCosine:
    """The stream encoder's schedule over ``steps`` optimizer steps (:func:`~gdn2ts.streaming.train.fit` and the
    probes): warmup over the first 5 % of the steps (at least one), then a cosine toward ``0.1 * peak``, which it
    would reach one step after the last.

    Example:
        >>> f = encoder_schedule(40, peak=2.0)
        >>> f.warmup_steps, [round(f(s), 4) for s in (0, 1, 2, 39)]
        (2, [1.0, 2.0, 2.0, 0.2031])
    """
    return WarmupCosine(max(1, steps // 20), steps, 0.1, peak=peak, floor_step=steps)
