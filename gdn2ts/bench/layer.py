"""GPU: the GatedDeltaNet2 layer at the paper's width against flash-linear-attention's ``GatedDeltaNet2`` layer, in
one process: ``python -m gdn2ts.bench.layer [--json F]``.

Hidden 2304, 16 heads of 128, bf16 parameters and activations, 16K tokens as (B, T) = (8, 2048) and (1, 16384).
Forward and forward+backward medians (the input and every parameter get gradients) and the peak memory of one
forward+backward. Both layers differ in details (their projections and gate parametrisations are each their
own); the comparison is of the whole layer as each library ships it.
"""

from __future__ import annotations

import argparse

import torch

from gdn2ts.bench.common import environment, peak_memory_gb, write_json
from gdn2ts.bench.kernels import _median_alternating
from gdn2ts.layers import GatedDeltaNet2, GDN2Config

HIDDEN, HEADS, HEAD_DIM = 2304, 16, 128
SHAPES = ((8, 2048), (1, 16384))


def _fla_layer():
    try:
        from fla.layers.gdn2 import GatedDeltaNet2 as FLALayer
    except Exception:  # FLA (with its layers) is optional
        return None
    return FLALayer(hidden_size=HIDDEN, head_dim=HEAD_DIM, num_heads=HEADS, mode="chunk")


def bench_layer(json_path: str | None = None) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("bench layer needs a CUDA device")
    torch.manual_seed(0)
    layers = {"ours": GatedDeltaNet2(GDN2Config(HIDDEN, HEADS, head_k_dim=HEAD_DIM, head_v_dim=HEAD_DIM))}
    fla = _fla_layer()
    if fla is not None:
        layers["fla"] = fla
    layers = {n: m.to("cuda", torch.bfloat16) for n, m in layers.items()}
    record = {"benchmark": "layer", "environment": environment(),
              "params": {n: sum(p.numel() for p in m.parameters()) for n, m in layers.items()}, "rows": []}
    print("parameters:", record["params"], flush=True)

    def forward(name, x):
        out = layers[name](x)
        return out[0] if isinstance(out, tuple) else out

    for B, T in SHAPES:
        x = torch.randn(B, T, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn_like(x)
        for name in layers:
            y = forward(name, x)
            if not torch.isfinite(y.float()).all():
                raise RuntimeError(f"layer {name}: non-finite output")

        def fwd(name, x=x):
            def run():
                with torch.no_grad():
                    forward(name, x)
            return run

        def fwd_bwd(name, x=x, dy=dy):
            params = [x, *layers[name].parameters()]

            def run():
                torch.autograd.grad(forward(name, x), params, dy)
            return run

        row = {"B": B, "T": T,
               "fwd_ms": _median_alternating({n: fwd(n) for n in layers}, rounds=2),
               "fwd_bwd_ms": _median_alternating({n: fwd_bwd(n) for n in layers}, rounds=2),
               "peak_GB": {n: peak_memory_gb(fwd_bwd(n)) for n in layers}}
        print(f"layer {T}x{B}: fwd {row['fwd_ms']}, fwd+bwd {row['fwd_bwd_ms']}, peak {row['peak_GB']}", flush=True)
        record["rows"].append(row)
    write_json(json_path, record)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    bench_layer(parser.parse_args(argv).json)


if __name__ == "__main__":
    main()
