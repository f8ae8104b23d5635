"""CPU speed of the chunked PyTorch path against the token-by-token loop (forward, and forward + backward).

Correctness is checked first (outputs and gradients of both paths agree on the benchmark inputs); then both are
timed in alternating order and the medians are reported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from gdn2ts.bench.common import environment, median_ms_interleaved, write_json
from gdn2ts.ops import chunk_gdn2


def make_inputs(batch: int, seq_len: int, heads: int, head_dim: int, seed: int = 0) -> list[torch.Tensor]:
    """Inputs as the layer makes them: unit-norm q/k, logsigmoid channel decay, gates in (0, 1); fp32."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, seq_len, heads, head_dim)

    def r():
        return torch.randn(*shape, generator=gen)

    q, k, v = F.normalize(r(), dim=-1), F.normalize(r(), dim=-1), r()
    g = F.logsigmoid(r() + 2.0)
    b, w = torch.sigmoid(r()), torch.sigmoid(r())
    return [t.requires_grad_() for t in (q, k, v, g, b, w)]


def bench_cpu(batch: int = 32, seq_len: int = 512, heads: int = 4, head_dim: int = 32, repeats: int = 5,
              threads: int | None = None, json_path: str | None = None, quiet: bool = False) -> dict:
    """Time ``chunk_gdn2`` on the chunked path and on the token loop; return (and optionally write) the figures.

    Args:
        batch, seq_len, heads, head_dim: the shape (K = V = head_dim), fp32.
        repeats: timed repetitions per variant (medians reported; one warm-up each).
        threads: torch CPU threads (default: torch's choice).
        json_path: where to write the JSON record.
        quiet: print nothing.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    xs = make_inputs(batch, seq_len, heads, head_dim)
    paths = {"chunked": "torch", "token_loop": "naive"}

    # Correctness before speed: both paths agree on these very inputs, forward and gradients.
    results = {}
    for name, backend in paths.items():
        o, _ = chunk_gdn2(*xs, backend=backend)
        results[name] = (o.detach(), torch.autograd.grad(o.square().sum(), xs))
    o_c, g_c = results["chunked"]
    o_n, g_n = results["token_loop"]
    worst = max(((a - e).norm() / e.norm()).item() for a, e in zip((o_c, *g_c), (o_n, *g_n), strict=False))
    if not worst < 1e-4:
        raise RuntimeError(f"chunked and token-loop paths disagree (relative error {worst:.2e}); not timing")

    def forward(backend):
        def fn():
            with torch.no_grad():
                chunk_gdn2(*xs, backend=backend)
        return fn

    def train_step(backend):
        def fn():
            o, _ = chunk_gdn2(*xs, backend=backend)
            torch.autograd.grad(o.sum(), xs)
        return fn

    fwd = median_ms_interleaved({n: forward(b) for n, b in paths.items()}, repeats)
    fb = median_ms_interleaved({n: train_step(b) for n, b in paths.items()}, repeats)
    record = {
        "benchmark": "cpu_chunked_vs_token_loop",
        "shape": {"B": batch, "T": seq_len, "H": heads, "K": head_dim, "V": head_dim, "dtype": "float32"},
        "repeats": repeats,
        "agreement_rel_error": worst,
        "forward_ms": fwd,
        "forward_backward_ms": fb,
        "speedup_forward": fwd["token_loop"] / fwd["chunked"],
        "speedup_forward_backward": fb["token_loop"] / fb["chunked"],
        "environment": environment(),
    }
    write_json(json_path, record)
    if not quiet:
        table = Table(title=f"chunk_gdn2 on CPU, B={batch} T={seq_len} H={heads} K=V={head_dim} fp32 "
                            f"({record['environment']['threads']} threads, median of {repeats})")
        table.add_column("path")
        table.add_column("forward ms", justify="right")
        table.add_column("forward+backward ms", justify="right")
        for name in paths:
            table.add_row(name, f"{fwd[name]:.1f}", f"{fb[name]:.1f}")
        table.add_row("speed-up", f"{record['speedup_forward']:.1f}x", f"{record['speedup_forward_backward']:.1f}x")
        Console().print(table)
    return record
