"""``gdn2ts stream --workers N``: the same file through one shard in this process and through 2 shards on Ray
gives the same forecasts file and stored states, bit for bit; a later run with 3 workers rebalances first and
still agrees."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from gdn2ts.cli import main
from gdn2ts.distributed import Manifest
from gdn2ts.models import EncoderConfig, StreamEncoder
from gdn2ts.models.checkpoint import Scaler, save_checkpoint
from gdn2ts.streaming.features import CALENDAR

from fleet_data import states


def observations(n_streams: int, start: int, hours: int, seed: int) -> pl.DataFrame:
    """Hourly rows of ``n_streams`` meters with dropped hours and missing values, from hour ``start``."""
    rng = np.random.default_rng(seed)
    rows = []
    for h in range(start, start + hours):
        for s in range(n_streams):
            if rng.random() < 0.15:
                continue
            rows.append({"meter": f"m{s:02d}", "time": f"2024-03-{1 + h // 24:02d} {h % 24:02d}:00",
                         "load": None if rng.random() < 0.1 else float(500 + 50 * rng.normal()),
                         "temp": float(10 + 5 * rng.normal())})
    return pl.DataFrame(rows)


def test_workers_give_the_same_results_bit_for_bit(tmp_path, ray_cluster):
    torch.manual_seed(0)
    enc = StreamEncoder(EncoderConfig(n_channels=2, n_covariates=4, hidden_size=16, num_heads=2, head_dim=8,
                                      horizon=3))
    ckpt = save_checkpoint(tmp_path / "model.safetensors", enc, Scaler(("load", "temp"), (500.0, 10.0), (50.0, 5.0)),
                           CALENDAR, time_unit_seconds=3600.0)
    first, later = tmp_path / "first.csv", tmp_path / "later.csv"
    observations(20, 0, 30, seed=0).write_csv(first)
    observations(20, 30, 10, seed=1).write_csv(later)

    def stream(store, source, out, *flags):
        main(["stream", "--checkpoint", str(ckpt), "--store", str(store), "--input", str(source), "--id_column",
              "meter", "--forecast_out", str(out), "--batch_rows", "200", "--partitions", "4", "--quiet", "true",
              *flags])
        return out.read_bytes()

    one = stream(tmp_path / "one", first, tmp_path / "one.csv", "--workers", "1", "--local", "true")
    two = stream(tmp_path / "two", first, tmp_path / "two.csv", "--workers", "2")
    assert one == two and len(pl.read_csv(tmp_path / "one.csv")) == 20 * 3 * 2
    assert states(tmp_path / "one") == states(tmp_path / "two")
    one = stream(tmp_path / "one", later, tmp_path / "one.csv", "--workers", "1", "--local", "true")
    three = stream(tmp_path / "two", later, tmp_path / "three.csv", "--workers", "3")
    assert Manifest.load(tmp_path / "two").owners == [0, 1, 0, 2]
    assert one == three
    assert states(tmp_path / "one") == states(tmp_path / "two")
