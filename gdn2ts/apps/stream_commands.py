"""The ``gdn2ts stream`` commands beside ``apply``: ``train``, ``forecast``, ``reset`` and ``delete``.

The command line reads these signatures (and the recipe dataclasses they name) to build its parser; the work is
imported when a command runs.
"""

from __future__ import annotations

from gdn2ts.apps.train_recipe import DataRecipe, ModelRecipe, TrainRecipe
from gdn2ts.streaming.train import TrainConfig

__all__ = ["stream_train", "stream_forecast", "stream_reset", "stream_delete", "STREAM_EXIT_REJECTED"]

STREAM_EXIT_REJECTED = 3
"""Exit status of ``gdn2ts stream apply`` when rows were rejected (1: an error; 0: every row applied)."""

_DATA, _MODEL, _TRAIN = DataRecipe(), ModelRecipe(), TrainConfig(context=256, steps=600, max_seconds=300.0)


def _fail(command: str, e: BaseException):
    raise SystemExit(f"gdn2ts stream {command}: {e}") from None


def stream_train(input: str, out: str = "gdn2ts-stream-model", id_column: str = "stream", time_column: str = "time",
                 channels: list[str] | None = None, covariates: list[str] | None = None,
                 time_numbers: str | None = None, time_zone: str | None = None, format: str | None = None,
                 data: DataRecipe = _DATA, model: ModelRecipe = _MODEL, train: TrainConfig = _TRAIN,
                 threads: int = 1, quiet: bool = False) -> None:
    """Train a streaming encoder on your own long-format file; write OUT/model.safetensors, report.json, a plot.

    The file (CSV, Parquet or JSON lines) holds a stream id, a timestamp and channel columns (empty for missing),
    irregular times welcome. Recipes: --config tasks/streaming/train.yaml (sections data, model, train).

    Args:
        input: the file of observations.
        out: output folder (model.safetensors, report.json, validation.png).
        id_column: the stream id column.
        time_column: the timestamp column (date-times, dates, or numbers with --time_numbers).
        channels: channel columns (default: every other numeric column).
        covariates: covariate columns (known in advance, present in every row when streaming too).
        time_numbers: what numeric timestamps count since 1970-01-01 (s, ms, h, d).
        time_zone: zone of naive date-times, and of the forecasts' times (IANA name, e.g. Europe/Warsaw).
        format: csv, parquet or jsonl (default: by the file's suffix).
        data: split, scaling, time unit, calendar covariates and the input bounds stored in the checkpoint.
        model: the encoder's shape.
        train: windows, steps, learning rate, time limit and seed.
        threads: torch CPU threads.
        quiet: print nothing.
    """
    from gdn2ts.apps.train_cli import run_train

    try:
        run_train(input, out, TrainRecipe(data, model, train, threads), id_column, time_column, tuple(channels or ()),
                  tuple(covariates or ()), time_numbers, time_zone, format, quiet)
    except (ValueError, OSError) as e:
        _fail("train", e)


def stream_forecast(checkpoint: str, store: str, streams: list[str] | None = None, out: str | None = None) -> None:
    """Forecasts of streams from their last observations, in the data's units and timestamp type.

    Args:
        checkpoint: encoder checkpoint (.safetensors).
        store: SQLite state store.
        streams: stream ids, as a list: '[a, b]' (default: every stream of the store).
        out: file (.csv, .parquet, .jsonl) for the table (default: printed).
    """
    from gdn2ts.apps.stream_cli import run_forecast
    from gdn2ts.streaming import StoreError

    try:
        table = run_forecast(checkpoint, store, streams, out)
    except (ValueError, StoreError) as e:
        _fail("forecast", e)
    if out is None:
        import polars as pl

        with pl.Config(tbl_rows=-1, tbl_cols=-1):
            print(table)


def _forget(command: str, checkpoint: str, store: str, streams: list[str], quiet: bool) -> None:
    from gdn2ts.apps.stream_cli import run_forget
    from gdn2ts.streaming import StoreError

    try:
        done = run_forget(checkpoint, store, streams, delete=command == "delete")
    except (ValueError, StoreError) as e:
        _fail(command, e)
    if not quiet:
        import sys

        print(f"{command}: {len(done)} streams {done}", file=sys.stderr)


def stream_reset(checkpoint: str, store: str, streams: list[str], quiet: bool = False) -> None:
    """Reset streams: forget their states; each starts afresh at its next row (unknown ids are skipped).

    Args:
        checkpoint: encoder checkpoint (.safetensors).
        store: SQLite state store.
        streams: stream ids, as a list: '[a, b]'.
        quiet: print nothing.
    """
    _forget("reset", checkpoint, store, streams, quiet)


def stream_delete(checkpoint: str, store: str, streams: list[str], quiet: bool = False) -> None:
    """Delete streams and everything kept for them (an unknown id is an error, and nothing is deleted).

    Args:
        checkpoint: encoder checkpoint (.safetensors).
        store: SQLite state store.
        streams: stream ids, as a list: '[a, b]'.
        quiet: print nothing.
    """
    _forget("delete", checkpoint, store, streams, quiet)
