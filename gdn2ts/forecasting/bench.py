"""The long-horizon benchmark on an ETT-layout file (``gdn2ts bench forecast``; ETTh1 by default): the standard
protocol at each lookback and horizon for the GDN-2 forecaster and the baselines, in one harness (same splits,
scaler, windows and metric).

Protocol (``BENCHMARKS.md`` section 2): train rows [0, 8640), val [8640 - L, 11520), test [11520 - L, 14400);
scaler fit on train rows; all seven channels in and out; MSE and MAE on scaled values over every test window and
channel. ``borders`` moves the three ends (e.g. (11520, 14400, 17280) tests on rows the protocol never uses).
Results are labelled with the data file's own name; the published figures are shown beside them only for ETTh1
(known by its checksum or its name) under the protocol's borders.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import fields as dataclass_fields
from dataclasses import replace
from pathlib import Path

import torch

from gdn2ts.forecasting.data import ETTH1_BORDERS, ETTH1_SHA256, DataConfig, DataError, _sha256, ett_borders, load_ett
from gdn2ts.forecasting.ensemble import fit_ensemble
from gdn2ts.forecasting.fit import check_accelerator, fit
from gdn2ts.forecasting.lightning import ForecastDataModule, ModelConfig, TrainConfig, evaluate

__all__ = ["PUBLISHED", "run_bench"]

# BENCHMARKS.md section 2: averages over the four horizons (MSE, MAE)
PUBLISHED = {
    "lookback 96": {"TimeMixer": (0.447, 0.440), "RLinear": (0.446, 0.434), "iTransformer": (0.454, 0.447),
                    "S-Mamba": (0.455, 0.450), "DLinear": (0.456, 0.452), "PatchTST": (0.469, 0.454)},
    "tuned lookback": {"FITS": (0.409, 0.422), "TimeMixer": (0.411, 0.423), "PatchTST/64": (0.413, 0.434),
                       "DLinear": (0.423, 0.437)},
}

# per-model defaults of the harness (small enough for a CPU); DLinear at 1e-4 lands on its published ETTh1 average
# (5e-3 gave 0.48 in this harness)
MODEL_DEFAULTS = {
    "gdn2": (ModelConfig(kind="gdn2"), {"lr": 1e-3}),
    "gdn2_skip_only": (ModelConfig(kind="gdn2", recurrent=False), {"lr": 1e-3}),
    # channel-independent, tokens of 16 steps every 16, head on the last token, the median's correction fading by e
    # every 192 horizon steps; lr 3e-3 on every path, a cosine over 4 epochs: the form chosen on validation windows
    # alone across ETTh1, vic_elec and EPF FR/BE at H = 96 and 336 (docs/forecast-selection.md)
    "gdn2_ci": (ModelConfig(kind="gdn2", channel_independent=True, patch_len=16, patch_stride=16, head="last",
                            dropout=0.2, correction_reach=192.0),
                {"lr": 3e-3, "recurrent_lr_scale": 1.0, "lr_schedule": "cosine", "max_epochs": 4, "patience": 4}),
    # the form before that selection, shaped on ETTh1 (docs/forecasting.md's figures): tokens of 16 every 8, the
    # encoder path at 0.3 times the skip path's rate, a constant rate over the shared budget
    "gdn2_ci_overlap": (ModelConfig(kind="gdn2", channel_independent=True, patch_len=16, patch_stride=8, head="last",
                                    dropout=0.2, correction_reach=192.0), {"lr": 1e-3, "recurrent_lr_scale": 0.3}),
    "dlinear": (ModelConfig(kind="dlinear"), {"lr": 1e-4}),
    "gru": (ModelConfig(kind="gru", hidden_size=64), {"lr": 1e-3}),
}


TRAIN_FIELDS = frozenset(f.name for f in dataclass_fields(TrainConfig))


def dataset_name(data: str | Path) -> str:
    """The name results are labelled with: the data file's own name, without its suffix."""
    return Path(data).stem


def is_etth1(data: str | Path) -> bool:
    """Whether ``data`` is ETTh1, whose published figures the harness knows: by its SHA-256, or by its name."""
    return dataset_name(data).lower() == "etth1" or _sha256(Path(data)) == ETTH1_SHA256


def _environment(device: str, threads: int) -> dict:
    env = {"device": device, "torch": torch.__version__, "threads": threads, "platform": platform.platform(),
           "processor": platform.processor() or platform.machine()}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def _check_borders(borders) -> tuple[int, int, int]:
    try:
        b = tuple(borders)
    except TypeError:
        b = None
    if b is None or len(b) != 3 or any(isinstance(x, bool) or not isinstance(x, int) for x in b) or \
            not 0 < b[0] < b[1] < b[2]:
        raise DataError(f"bench forecast: 'borders' expected three increasing positive row numbers (end rows of "
                        f"train, val and test), got {borders!r}")
    return b


def run_bench(data: str, lookbacks=(96,), horizons=(96, 192, 336, 720), models=("gdn2", "dlinear", "gru"),
              train: TrainConfig | None = None, model_overrides: dict | None = None, threads: int | None = 1,
              json_path: str | None = None, quiet: bool = False, progress: bool = False,
              borders: tuple[int, int, int] = ETTH1_BORDERS) -> dict:
    """Fit and test every (model, lookback, horizon); returns (and writes) the record.

    Args:
        data: path of an ETT-layout CSV (ETTh1.csv for the protocol's published figures).
        lookbacks: lookbacks L.
        horizons: horizons H.
        models: names from ``MODEL_DEFAULTS`` (gdn2, gdn2_ci, gdn2_ci_overlap, gdn2_skip_only, dlinear, gru).
        train: the training budget shared by all models (its lr is replaced by each model's default unless
            ``model_overrides`` sets one).
        model_overrides: name -> dict of ModelConfig fields, TrainConfig fields (``lr``,
            ``recurrent_lr_scale``, ...) and ``ensemble`` (fits with seeds ``seed, seed + 1, ...`` whose forecasts
            are averaged; 1 by default) replacing the model's defaults.
        threads: torch CPU threads (None: torch's choice).
        json_path: where the record goes (rewritten after each fit, so a stopped run keeps what finished).
        quiet: print nothing.
        progress: show Lightning's progress bar.
        borders: end rows of train, val and test: train [0, b0), val [b0 - L, b1), test [b1 - L, b2) (the
            ETTh1 protocol's (8640, 11520, 14400) by default); checked against the file before any fit.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    check_accelerator((train or TrainConfig()).accelerator)
    unknown = [m for m in models if m not in MODEL_DEFAULTS]
    if unknown:
        raise ValueError(f"bench forecast: unknown models {unknown}; expected some of {sorted(MODEL_DEFAULTS)}")
    for name, fields in (model_overrides or {}).items():
        members = fields.get("ensemble", 1)
        if isinstance(members, bool) or not isinstance(members, int) or members < 1:
            raise ValueError(f"bench forecast: 'ensemble' of {name} expected a positive int, got {members!r}")
    borders = _check_borders(borders)
    n_rows = load_ett(data).height
    for lookback in lookbacks:
        ett_borders(lookback, n_rows, borders)
    train = train or TrainConfig()
    device = "cuda" if train.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu"
    name = dataset_name(data)
    published = PUBLISHED if is_etth1(data) and borders == ETTH1_BORDERS else {}
    protocol = ("ETTh1, BENCHMARKS.md section 2" if published else
                f"{name}: ETT layout, train rows [0, {borders[0]}), val [{borders[0]} - L, {borders[1]}), test "
                f"[{borders[1]} - L, {borders[2]})")
    record = {"data": str(data), "dataset": name, "protocol": protocol, "borders": list(borders),
              "train": train.__dict__,
              "environment": _environment(device, torch.get_num_threads()), "published": published, "results": []}
    overrides = model_overrides or {}
    start = time.perf_counter()
    for lookback in lookbacks:
        for horizon in horizons:
            dm = ForecastDataModule(DataConfig(path=str(data), layout="ett", lookback=lookback, horizon=horizon,
                                               borders=borders))
            dm.setup()
            for name in models:
                model, extra = MODEL_DEFAULTS[name]
                fields = {**extra, **overrides.get(name, {})}
                # TrainConfig fields (lr, recurrent_lr_scale, ...) set the fit; the others set the model
                fit_fields = {k: fields.pop(k) for k in list(fields) if k in TRAIN_FIELDS}
                members = fields.pop("ensemble", 1)
                lr = fit_fields["lr"]
                model = replace(model, **fields)
                if members == 1:
                    module, info = fit(model, dm, replace(train, **fit_fields), quiet=not progress)
                    net = module.net
                else:
                    net, info = fit_ensemble(model, dm, replace(train, **fit_fields), members, quiet=not progress)
                metrics = {split: evaluate(net, getattr(dm, f"{split}_dataloader")(), 0, 0)
                           for split in ("val", "test")}
                row = {"model": name, "lookback": lookback, "horizon": horizon, "mse": metrics["test"]["mse"],
                       "mae": metrics["test"]["mae"], "test_windows": metrics["test"]["windows"],
                       "val_mse": metrics["val"]["mse"], "val_mae": metrics["val"]["mae"], "ensemble": members,
                       "params": sum(p.numel() for p in net.parameters()), "model_config": model.__dict__,
                       "lr": lr, "train_overrides": fit_fields,
                       **{k: v for k, v in info.items() if k != "checkpoint"}}
                record["results"].append(row)
                if not quiet:
                    print(f"{name:>15} L={lookback:<4} H={horizon:<4} MSE {row['mse']:.4f} MAE {row['mae']:.4f} "
                          f"val MSE {row['val_mse']:.4f} ({row['epochs']} epochs, {row['seconds']:.0f} s)", flush=True)
                record["averages"] = _averages(record["results"])
                record["wall_seconds"] = time.perf_counter() - start
                if json_path:
                    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
                    Path(json_path).write_text(json.dumps(record, indent=1) + "\n")
    if not quiet:
        print_table(record)
    return record


def _averages(results: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["model"], r["lookback"]), []).append(r)
    return [{"model": m, "lookback": lb, "horizons": [r["horizon"] for r in rs],
             "mse": sum(r["mse"] for r in rs) / len(rs), "mae": sum(r["mae"] for r in rs) / len(rs)}
            for (m, lb), rs in groups.items()]


def print_table(record: dict) -> None:
    """The results as a table: MSE/MAE per horizon and averaged, with the published averages when the record has
    them (ETTh1 under the protocol's borders)."""
    from rich.console import Console
    from rich.table import Table

    horizons = sorted({r["horizon"] for r in record["results"]})
    name = record.get("dataset", dataset_name(record["data"]))
    table = Table(title=f"{name} ({record['environment']['device']}, {record['wall_seconds']:.0f} s)")
    for col in ("model", "L", *[f"H={h}" for h in horizons], "average"):
        table.add_column(col)
    for avg in record["averages"]:
        cells = {r["horizon"]: f"{r['mse']:.3f}/{r['mae']:.3f}" for r in record["results"]
                 if r["model"] == avg["model"] and r["lookback"] == avg["lookback"]}
        table.add_row(avg["model"], str(avg["lookback"]), *[cells.get(h, "-") for h in horizons],
                      f"{avg['mse']:.3f}/{avg['mae']:.3f}")
    for setting, rows in record.get("published", {}).items():
        for name, (mse, mae) in rows.items():
            table.add_row(f"{name} (published)", setting, *["" for _ in horizons], f"{mse:.3f}/{mae:.3f}")
    Console(width=160).print(table)
