"""GPU: where the GatedDeltaNet2 layer's time goes, at the paper's width (``gdn2ts.bench.layer``'s shapes).

``python -m gdn2ts.bench.profile_layer [--B 8 --T 2048] [--compile] [--fla] [--json F]``: the forward and
forward+backward medians of the eager layer, of ``torch.compile(layer)`` (``--compile``) and of FLA's
``GatedDeltaNet2`` layer (``--fla``, when it is importable; its first calls autotune for minutes on a cold
machine), timed in alternating order in this process; then one forward+backward of our layer under
``torch.profiler``, the CUDA kernels ranked by their total time (the top rows are what to fuse next).
"""

from __future__ import annotations

import argparse

import torch

from gdn2ts.bench.common import environment, write_json
from gdn2ts.bench.kernels import _median_alternating
from gdn2ts.bench.layer import HEAD_DIM, HEADS, HIDDEN, _fla_layer
from gdn2ts.layers import GatedDeltaNet2, GDN2Config


def _kernel_table(fn, rows: int = 30) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total",
                                                                                      0) > 0]
    total = sum(e.self_device_time_total for e in events) or 1.0
    events.sort(key=lambda e: -e.self_device_time_total)
    table = [{"kernel": e.key[:110], "calls": e.count, "ms": e.self_device_time_total / 1e3,
              "share": e.self_device_time_total / total} for e in events[:rows]]
    print(f"CUDA time of one forward+backward: {total / 1e3:.2f} ms over {len(events)} kernels")
    for r in table:
        print(f"{r['ms']:8.3f} ms {100 * r['share']:5.1f} % x{r['calls']:<4d} {r['kernel']}")
    return table


def profile_layer(B: int = 8, T: int = 2048, compile: bool = False, fla: bool = False,
                  json_path: str | None = None) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("profile_layer needs a CUDA device")
    torch.manual_seed(0)
    layers = {"ours": GatedDeltaNet2(GDN2Config(HIDDEN, HEADS, head_k_dim=HEAD_DIM, head_v_dim=HEAD_DIM))}
    layers = {n: m.to("cuda", torch.bfloat16) for n, m in layers.items()}
    if compile:
        layers["ours_compiled"] = torch.compile(layers["ours"])
    fla_layer = _fla_layer() if fla else None
    if fla_layer is not None:
        layers["fla"] = fla_layer.to("cuda", torch.bfloat16)
    x = torch.randn(B, T, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    def fwd_bwd(name):
        def run():
            first(layers[name](x)).backward(dy)
        return run

    def fwd(name):
        def run():
            with torch.no_grad():
                first(layers[name](x))
        return run

    record = {"benchmark": "profile_layer", "environment": environment(), "shape": [B, T], "tables": {}}
    for name in layers:  # compile (and autotune) before timing
        for _ in range(3):
            fwd_bwd(name)()
            fwd(name)()
    record["fwd_ms"] = _median_alternating({n: fwd(n) for n in layers})
    record["fwd_bwd_ms"] = _median_alternating({n: fwd_bwd(n) for n in layers})
    print("fwd ms:", {n: round(v, 3) for n, v in record["fwd_ms"].items()}, flush=True)
    print("fwd+bwd ms:", {n: round(v, 3) for n, v in record["fwd_bwd_ms"].items()}, flush=True)
    for name in [n for n in layers if n != "fla"]:  # (FLA's own kernels are profiled by FLA)
        print(f"--- {name}")
        record["tables"][name] = _kernel_table(fwd_bwd(name))
    if json_path:
        write_json(json_path, record)
    return record


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--fla", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    profile_layer(a.B, a.T, a.compile, a.fla, a.json)


if __name__ == "__main__":
    main()
