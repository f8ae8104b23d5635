"""A small, equal-budget comparison on hourly vic_elec through pytorch-forecasting: GDN2Model against
pytorch-forecasting's RecurrentNetwork (LSTM), its Baseline (last value) and the seasonal-naive forecast (the same
hour one day earlier), on every 24-hour window of the held-out last four weeks.

Run: ``python -m gdn2ts.forecasting.pf_compare [--steps N] [--json PATH] [--threads N]``; prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

__all__ = ["compare"]


def _datasets(encoder_length: int, horizon: int, held_out: int, days: int):
    import pandas as pd
    from pytorch_forecasting import TimeSeriesDataSet
    from pytorch_forecasting.data.encoders import NaNLabelEncoder

    from gdn2ts.forecasting.pf_data import CALENDAR, vic_elec_frame

    df = vic_elec_frame().tail(days * 24).reset_index(drop=True)
    df["time_idx"] = df.index
    cutoff = len(df) - held_out
    train = TimeSeriesDataSet(
        df[df.time_idx < cutoff], time_idx="time_idx", target="demand", group_ids=["series"],
        max_encoder_length=encoder_length, max_prediction_length=horizon,
        time_varying_known_categoricals=["hour", "weekday", "holiday"], time_varying_unknown_reals=["demand"],
        add_relative_time_idx=True, add_target_scales=True,
        categorical_encoders={n: NaNLabelEncoder().fit(pd.Series(v)) for n, v in CALENDAR.items()})
    # every forecast origin whose whole horizon lies in the held-out weeks
    test = TimeSeriesDataSet.from_dataset(train, df, min_prediction_idx=cutoff, stop_randomization=True)
    return train, test


@torch.no_grad()
def _predict(model, loader, quantiles: bool) -> torch.Tensor:
    """The model's point forecasts ``[N, horizon]`` (or quantiles ``[N, horizon, Q]``) over the loader, in order."""
    model.eval()
    outputs = []
    for x, _ in iter(loader):
        out = model(x)
        outputs.append(model.to_quantiles(out) if quantiles else model.to_prediction(out))
    return torch.cat(outputs)


def compare(steps: int = 300, batch_size: int = 64, encoder_length: int = 168, horizon: int = 24,
            days: int = 365, held_out_days: int = 28, seed: int = 0) -> dict:
    """Fit each model for ``steps`` batches and score it on the held-out windows; returns the results dict.

    MAE in MW of the point forecast (the median for quantile models) over every (window, step); quantile loss
    (pytorch-forecasting's, 7 levels) where the model has quantiles. Wall times are for this process's fits.
    """
    import lightning.pytorch as pl
    from pytorch_forecasting import Baseline, RecurrentNetwork
    from pytorch_forecasting.metrics import MAE, QuantileLoss

    from gdn2ts.forecasting.pf import GDN2Model

    train, test = _datasets(encoder_length, horizon, held_out_days * 24, days)
    train_dl = train.to_dataloader(train=True, batch_size=batch_size, num_workers=0)
    test_dl = test.to_dataloader(train=False, batch_size=256, num_workers=0)
    quiet = dict(enable_progress_bar=False, logger=False, enable_model_summary=False, enable_checkpointing=False,
                 accelerator="cpu")
    actual = torch.cat([y[0] for _, y in iter(test_dl)])
    results = {"windows": int(actual.shape[0]), "horizon": horizon, "encoder_length": encoder_length,
               "train_windows": len(train), "steps": steps, "batch_size": batch_size, "models": {}}

    def score(name: str, point: torch.Tensor, quantiles: torch.Tensor | None, seconds: float, params: int):
        row = {"mae": float((point - actual).abs().mean()), "fit_seconds": round(seconds, 1), "parameters": params}
        if quantiles is not None:
            row["quantile_loss"] = float(QuantileLoss().loss(quantiles, actual).mean())
        results["models"][name] = row

    encoder_targets = torch.cat([x["encoder_target"] for x, _ in iter(test_dl)])
    score("seasonal naive (same hour, day before)", encoder_targets[:, -24:][:, :horizon], None, 0.0, 0)
    score("Baseline (last value)", _predict(Baseline(), test_dl, False), None, 0.0, 0)

    models = {
        "RecurrentNetwork (LSTM, MAE)": lambda: RecurrentNetwork.from_dataset(
            train, cell_type="LSTM", hidden_size=32, rnn_layers=2, loss=MAE(), learning_rate=3e-3),
        "GDN2Model (MAE)": lambda: GDN2Model.from_dataset(train, loss=MAE(), learning_rate=3e-3),
        "GDN2Model (QuantileLoss)": lambda: GDN2Model.from_dataset(train, learning_rate=3e-3),
    }
    for name, build in models.items():
        pl.seed_everything(seed, verbose=False)
        model = build()
        trainer = pl.Trainer(max_steps=steps, gradient_clip_val=0.1, **quiet)
        start = time.perf_counter()
        trainer.fit(model, train_dl)
        seconds = time.perf_counter() - start
        params = sum(p.numel() for p in model.parameters())
        if isinstance(model.loss, QuantileLoss):
            q = _predict(model, test_dl, True)
            score(name, q[..., q.shape[-1] // 2], q, seconds, params)
        else:
            score(name, _predict(model, test_dl, False), None, seconds, params)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training batches per model")
    parser.add_argument("--json", default="pf_compare.json", help="where the results go")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (one by default: at this size a second only slows down on shared cores)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = compare(steps=args.steps)
    print(f"vic_elec hourly: {results['windows']} held-out windows of {results['horizon']} h, "
          f"{results['steps']} training batches of {results['batch_size']} per model")
    print(f"{'model':42s} {'MAE (MW)':>9s} {'q-loss':>8s} {'fit s':>7s} {'params':>8s}")
    for name, row in results["models"].items():
        ql = f"{row['quantile_loss']:8.1f}" if "quantile_loss" in row else f"{'':8s}"
        print(f"{name:42s} {row['mae']:9.1f} {ql} {row['fit_seconds']:7.1f} {row['parameters']:8d}")
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
