"""The ``gdn2ts`` command.

    gdn2ts example            a short tour of the op and the layer on the CPU
    gdn2ts bench cpu          CPU speed of the chunked path against the token loop
    gdn2ts bench kernels      GPU: the kernels against flash-linear-attention
"""

from __future__ import annotations

from jsonargparse import auto_cli


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


def main(args: list[str] | None = None) -> None:
    auto_cli({"example": example, "bench": {"cpu": bench_cpu, "kernels": bench_kernels}}, args=args,
             as_positional=False)


if __name__ == "__main__":
    main()
