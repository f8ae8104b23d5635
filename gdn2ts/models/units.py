"""What a streaming model's numbers mean in the user's units: the time axis, per-stream scaling and the bounds of
plausible input, as a checkpoint stores them.

* :class:`TimeSpec`: the user's timestamp type (date-times, naive or in a zone; dates; or numbers counted in a
  stated unit since 1970-01-01 UTC) and the model's time unit. Model time is seconds since the epoch divided by
  the unit's seconds, so one regular step of the data is one unit.
* :class:`StreamScales`: per-stream location and scale of each channel, fit on each stream's training rows
  (streams without their own fall back to the checkpoint's global :class:`~gdn2ts.models.checkpoint.Scaler`).
* :class:`Limits`: the bounds past which an observation is rejected rather than applied (values in model units,
  timestamp jumps in time units).

Nothing here touches tensors of the model; the conversions of tables live in :mod:`gdn2ts.streaming.units`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["TimeSpec", "StreamScales", "Limits", "parse_duration", "format_duration", "TIME_KINDS"]

TIME_KINDS = ("datetime", "date", "number")
_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?(?:e[+-]?\d+)?)?\s*(us|ms|s|min|h|d|w)\s*$")


def parse_duration(text: str) -> float:
    """Seconds in a duration written as an optional number and a unit (us, ms, s, min, h, d, w).

    Example:
        >>> parse_duration("15min"), parse_duration("h"), parse_duration("2.5s")
        (900.0, 3600.0, 2.5)
    """
    match = _DURATION.match(text) if isinstance(text, str) else None
    if match is None or (match.group(1) is not None and float(match.group(1)) <= 0):
        raise ValueError(f"a duration expected a positive number and a unit of {sorted(_SECONDS)} (e.g. '1h', "
                         f"'15min', 'd'), got {text!r}")
    return float(match.group(1) or 1.0) * _SECONDS[match.group(2)]


def format_duration(seconds: float) -> str:
    """A duration in the largest unit that divides it exactly (the inverse of :func:`parse_duration`).

    Example:
        >>> format_duration(3600.0), format_duration(900.0), format_duration(2.5), format_duration(172800.0)
        ('1h', '15min', '2500ms', '2d')
    """
    for unit in ("w", "d", "h", "min", "s", "ms", "us"):
        n = seconds / _SECONDS[unit]
        if n >= 1 and abs(n - round(n)) < 1e-9 * n:
            return f"{round(n)}{unit}"
    return f"{seconds:g}s"


@dataclass(frozen=True)
class TimeSpec:
    """The user's timestamps and the model's time unit.

    Example:
        >>> spec = TimeSpec("datetime", unit_seconds=3600.0, time_zone="Europe/Paris")
        >>> spec.describe()
        'date-times in Europe/Paris, time unit 1h'
        >>> TimeSpec.from_json(spec.to_json()) == spec
        True
        >>> TimeSpec("number", 86400.0, number_unit="s").describe()
        'numbers (s since 1970-01-01 UTC), time unit 1d'
    """

    kind: str = "number"
    """``datetime`` (date-times, naive ones read as UTC unless ``time_zone`` is set), ``date``, or ``number``
    (a count of ``number_unit`` since 1970-01-01 UTC)."""
    unit_seconds: float = 1.0
    """Seconds in one model time unit (model time = seconds since the epoch / unit_seconds)."""
    time_zone: str | None = None
    """The zone of the user's date-times (IANA name): forecasts carry it, naive input is read in it, calendar
    covariates use its local time. None: naive date-times, read as UTC."""
    number_unit: str | None = None
    """For ``number``: the unit the numbers count (a duration such as ``s``, ``ms``, ``h``, ``d``)."""

    def __post_init__(self):
        if self.kind not in TIME_KINDS:
            raise ValueError(f"TimeSpec: 'kind' expected one of {TIME_KINDS}, got {self.kind!r}")
        if isinstance(self.unit_seconds, bool) or not isinstance(self.unit_seconds, (int, float)) or \
                not (math.isfinite(self.unit_seconds) and self.unit_seconds > 0):
            raise ValueError(f"TimeSpec: 'unit_seconds' expected a positive number, got {self.unit_seconds!r}")
        object.__setattr__(self, "unit_seconds", float(self.unit_seconds))
        if self.kind == "number":
            if self.number_unit is None:
                raise ValueError("TimeSpec: numeric timestamps need their unit stated ('number_unit', e.g. 's' for "
                                 "seconds since 1970-01-01)")
            parse_duration(self.number_unit)
        elif self.number_unit is not None:
            raise ValueError(f"TimeSpec: 'number_unit' applies to numeric timestamps, not to {self.kind}s")
        if self.time_zone is not None:
            if self.kind == "number" or not isinstance(self.time_zone, str) or not self.time_zone:
                raise ValueError(f"TimeSpec: 'time_zone' expected an IANA zone name for date-times or dates, got "
                                 f"{self.time_zone!r} for {self.kind}s")

    @property
    def number_seconds(self) -> float | None:
        """Seconds in one unit of the user's numbers (None unless ``kind`` is ``number``)."""
        return None if self.number_unit is None else parse_duration(self.number_unit)

    def describe(self) -> str:
        """A short human description."""
        if self.kind == "number":
            what = f"numbers ({self.number_unit} since 1970-01-01 UTC)"
        else:
            what = ("date-times" if self.kind == "datetime" else "dates") + \
                (f" in {self.time_zone}" if self.time_zone else " (naive, read as UTC)" if self.kind == "datetime"
                 else "")
        return f"{what}, time unit {format_duration(self.unit_seconds)}"

    def to_json(self) -> dict:
        return {"kind": self.kind, "unit_seconds": self.unit_seconds, "time_zone": self.time_zone,
                "number_unit": self.number_unit}

    @classmethod
    def from_json(cls, raw: dict) -> TimeSpec:
        return cls(**raw)


@dataclass(frozen=True)
class StreamScales:
    """Per-stream affine scaling: stream ``streams[i]``'s channel ``j`` is seen as ``(x - loc[i][j]) /
    scale[i][j]``.

    Example:
        >>> s = StreamScales(("a", "b"), ((1.0, 10.0), (2.0, 20.0)), ((1.0, 2.0), (3.0, 4.0)))
        >>> s.of("b")
        ((2.0, 20.0), (3.0, 4.0))
    """

    streams: tuple[str, ...]
    """Stream ids with their own scaling."""
    loc: tuple[tuple[float, ...], ...]
    """``[streams][channels]`` locations."""
    scale: tuple[tuple[float, ...], ...]
    """``[streams][channels]`` positive scales."""

    def __post_init__(self):
        object.__setattr__(self, "streams", tuple(self.streams))
        object.__setattr__(self, "loc", tuple(tuple(float(v) for v in row) for row in self.loc))
        object.__setattr__(self, "scale", tuple(tuple(float(v) for v in row) for row in self.scale))
        n = len(self.streams)
        if len(set(self.streams)) != n or not all(isinstance(s, str) for s in self.streams):
            raise ValueError("StreamScales: 'streams' expected distinct string ids")
        widths = {len(row) for row in (*self.loc, *self.scale)}
        if len(self.loc) != n or len(self.scale) != n or len(widths) > 1:
            raise ValueError(f"StreamScales: 'loc' and 'scale' expected {n} rows of equal width")
        if not all(math.isfinite(v) for row in self.loc for v in row) or \
                not all(math.isfinite(v) and v > 0 for row in self.scale for v in row):
            raise ValueError("StreamScales: 'loc' expected finite values and 'scale' positive finite values")

    def of(self, stream: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """``(loc, scale)`` of one stream, or None when it has no scaling of its own."""
        try:
            i = self.streams.index(stream)
        except ValueError:
            return None
        return self.loc[i], self.scale[i]


@dataclass(frozen=True)
class Limits:
    """Bounds past which an observation is rejected (reported in the observe result) instead of applied.

    Example:
        >>> Limits(max_abs=50.0, max_gap=1000.0).max_gap
        1000.0
    """

    max_abs: float | None = 100.0
    """Largest magnitude of a channel value in model units (with a scaler: standard deviations from the training
    mean). The encoder saturates far below float limits (its outputs stop changing beyond about 100), so larger
    values would be applied as if they were 100. None: no bound."""
    max_gap: float | None = None
    """Largest forward jump, in model time units, from a stream's last observation (or, for a new stream, from
    ``time_range``) to its next one; a larger jump is usually a timestamp in the wrong unit and would make every
    later real row look stale. The jump's row and the stream's later rows of the same call are rejected. None: no
    bound."""
    time_range: tuple[float, float] | None = None
    """The training data's first and last timestamp (model time units): where new streams are expected."""

    def __post_init__(self):
        for name in ("max_abs", "max_gap"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or
                                  math.isnan(v)):
                raise ValueError(f"Limits: '{name}' expected a positive number or None, got {v!r}")
            if v is not None:
                object.__setattr__(self, name, float(v))
        if self.time_range is not None:
            lo, hi = (float(v) for v in self.time_range)
            if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
                raise ValueError(f"Limits: 'time_range' expected finite (first, last), got {self.time_range!r}")
            object.__setattr__(self, "time_range", (lo, hi))

    def to_json(self) -> dict:
        return {"max_abs": self.max_abs, "max_gap": self.max_gap,
                "time_range": None if self.time_range is None else list(self.time_range)}

    @classmethod
    def from_json(cls, raw: dict) -> Limits:
        raw = dict(raw)
        if raw.get("time_range") is not None:
            raw["time_range"] = tuple(raw["time_range"])
        return cls(**raw)
