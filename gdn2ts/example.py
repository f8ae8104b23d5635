"""A short tour on the CPU: the op against its ground truth, then the layer's parallel and streaming paths."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from gdn2ts.layers import GatedDeltaNet2, GDN2Config
from gdn2ts.ops import chunk_gdn2, recurrent_reference


def run_example(seed: int = 0, quiet: bool = False) -> dict:
    """Run the op and the layer on small random inputs; return the measured agreements.

    Args:
        seed: random seed.
        quiet: print nothing.
    """
    torch.manual_seed(seed)
    console = Console(quiet=quiet)
    B, T, H, K, V = 2, 200, 4, 32, 32
    q, k = F.normalize(torch.randn(B, T, H, K), dim=-1), F.normalize(torch.randn(B, T, H, K), dim=-1)
    v, g = torch.randn(B, T, H, V), F.logsigmoid(torch.randn(B, T, H, K) + 2)
    b, w = torch.rand(B, T, H, K), torch.rand(B, T, H, V)

    t0 = time.perf_counter()
    o, state = chunk_gdn2(q, k, v, g, b, w, output_final_state=True)
    t_chunk = time.perf_counter() - t0
    t0 = time.perf_counter()
    o_ref, state_ref = recurrent_reference(*(x.double() for x in (q, k, v, g, b, w)), output_final_state=True)
    t_loop = time.perf_counter() - t0
    op_err = ((o.double() - o_ref).norm() / o_ref.norm()).item()

    cfg = GDN2Config.variant("gdn2", hidden_size=64, num_heads=2, head_k_dim=16, head_v_dim=16)
    layer = GatedDeltaNet2(cfg).double().eval()
    x = torch.randn(1, 50, 64, dtype=torch.float64)
    with torch.no_grad():
        y, _ = layer(x)
        st = layer.init_state(1, dtype=torch.float64)
        steps = []
        for t in range(x.shape[1]):
            y_t, st = layer.step(x[:, t], st)
            steps.append(y_t)
    layer_err = ((torch.stack(steps, 1) - y).norm() / y.norm()).item()

    # short labels, the shapes in the caption: the rows stay whole on an 80-column terminal
    params = sum(p.numel() for p in layer.parameters())
    table = Table(title="gdn2ts on the CPU", caption=f"op: B={B}, T={T}, H={H}, K=V={K}; layer: GatedDeltaNet2, "
                  f"{params:,} parameters")
    table.add_column("check", no_wrap=True)
    table.add_column("result", justify="right")
    table.add_row("chunk_gdn2 vs token loop, rel. error", f"{op_err:.1e}")
    table.add_row("chunk_gdn2 / fp64 token loop time", f"{t_chunk * 1e3:.1f} / {t_loop * 1e3:.1f} ms")
    table.add_row("step-by-step vs parallel, rel. error", f"{layer_err:.1e}")
    console.print(table)
    return {"op_rel_error": op_err, "layer_step_rel_error": layer_err}
