"""The one tolerance table and the one comparison helper of the test suite.

A comparison measures the relative RMS error ``||a - e|| / ||e||`` and the largest elementwise error relative to
the largest reference magnitude; both must be within the table's bound for the dtype the fast path computed in.
The reference is always computed in fp64.
"""

from __future__ import annotations

import torch

# dtype the compared path computed in -> (relative RMS error, max error relative to max |expected|)
TOLERANCE = {
    torch.float64: (1e-10, 1e-9),
    # fp32 chunked forms build decay factors from in-chunk cumulative sums G, so a factor carries a relative error
    # of about eps * |G| (measured: ~3e-7 with ordinary gates, up to 6e-5 for gate gradients with decay near 0);
    # the token loop itself stays near 1e-7.
    torch.float32: (1e-4, 1e-3),
    # FLA's GPU tolerances (relative RMS error) for bf16/fp16 inputs with fp32 accumulation
    torch.bfloat16: (5e-3, 5e-2),
    torch.float16: (5e-3, 5e-2),
}
# gradients of gates (g, b, w) get twice the bound, as in FLA's table
GATE_FACTOR = 2.0


def errors(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    a, e = actual.detach().double(), expected.detach().double()
    scale = e.norm().item()
    peak = e.abs().max().item() if e.numel() else 0.0
    diff = a - e
    rms = diff.norm().item() / scale if scale > 0 else diff.norm().item()
    worst = diff.abs().max().item() / peak if peak > 0 else (diff.abs().max().item() if diff.numel() else 0.0)
    return rms, worst


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                 factor: float = 1.0) -> None:
    """Fail unless ``actual`` matches the fp64 ``expected`` within TOLERANCE[dtype] * factor."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    rms_tol, max_tol = (t * factor for t in TOLERANCE[dtype])
    rms, worst = errors(actual, expected)
    assert rms <= rms_tol and worst <= max_tol, (
        f"{name}: relative RMS error {rms:.3e} (bound {rms_tol:.1e}), max error {worst:.3e} (bound {max_tol:.1e})"
    )
