"""Tiling variants of the Triton chunked forward on the GPU: ``python -m gdn2ts.bench.profile_chunk``."""

from __future__ import annotations

import torch
from triton.testing import do_bench

from gdn2ts.bench.kernels import K, make_inputs, rel
from gdn2ts.kernels.chunk_fwd import chunk_fwd
from gdn2ts.kernels.tiling import BwdTiling, FwdTiling

_BF, _FP = torch.bfloat16, torch.float16
# the sequential pass on 16-bit key-side operands (``lowp``), U in 16 bits too
_LOWP = dict(decayed_qk=True, lowp=True, key_dtype=_BF, u_dtype=_BF)
# the first row is the default: lowp for these bf16 inputs, the corrections formed in the state pass (no WY launch)
# with a bf16 L^-1, the state tiling by the number of (sequence, head) pairs
VARIANTS = [dict(), dict(fused_wy=False), dict(lowp=False), dict(_LOWP, fused_wy=False, u_dtype=torch.float32),
            *(dict(block_v=bv, num_stages=st) for bv, st in ((64, 1), (64, 2), (32, 3), (16, 3))),
            dict(gram_warps=4), dict(linv_dtype=torch.float32, block_v=64, num_stages=1), dict(linv_dtype=_FP),
            dict(akk_dtype=torch.float16), dict(gram_stages=1), dict(gram_stages=3), dict(gram_warps=4, gram_stages=1)]
# "decayed_qk" is a forward option: the backward then reads the decayed q and k the forward kept
BWD_VARIANTS = [dict(), dict(decayed_qk=True), dict(decayed_qk=True, num_stages=3), dict(num_warps=8),
                dict(intra_warps=8), dict(dk_block_v=64), dict(gram_warps=4), dict(lowp=True)]


def profile(B: int, T: int, which: list[int] | None = None) -> list[dict]:
    """Every forward variant (or those whose ``VARIANTS`` index is in ``which``): median ms, and the relative RMS
    error of the output and final state against the fp64 token loop on the same inputs (and of the output against
    the default's)."""
    from gdn2ts.ops import recurrent_reference

    xs = make_inputs(B, T, seed=1)
    h0 = torch.randn(B, xs[2].shape[2], K, xs[2].shape[3], device="cuda")
    o64, s64 = recurrent_reference(*(x.double() for x in xs), initial_state=h0.double(), output_final_state=True)
    ref, _ = chunk_fwd(*xs, K**-0.5, h0, True)
    rows = []
    for n, opts in enumerate(VARIANTS):
        if which is not None and n not in which:
            continue

        def run(opts=opts):
            return chunk_fwd(*xs, K**-0.5, h0, True, tiling=FwdTiling(**opts))
        try:
            o, s = run()
            err, err_o, err_s = rel(o.float(), ref.float()), rel(o.float(), o64), rel(s, s64)
        except Exception as e:  # a tiling that does not fit this GPU
            print(f"{T}x{B} {opts}: {str(e)[:100]}", flush=True)
            continue
        t = do_bench(run, warmup=20, rep=100, return_mode="median")
        row = {"B": B, "T": T, **{k_: str(v_) for k_, v_ in opts.items()}, "ms": t, "rel_to_default": err,
               "err_o": err_o, "err_state": err_s}
        rows.append(row)
        print(f"{T}x{B} {opts or 'default'}: {t:.3f} ms (o {err_o:.1e}, state {err_s:.1e} vs fp64; "
              f"{err:.1e} vs default)", flush=True)
    return rows


def profile_isolated(B: int, T: int, which: list[int] | None = None) -> list[dict]:
    """``profile``, one variant per process: a variant that faults the device loses only its own row."""
    import json
    import subprocess
    import sys
    import tempfile

    rows = []
    for n in range(len(VARIANTS)) if which is None else which:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            r = subprocess.run([sys.executable, "-m", "gdn2ts.bench.profile_chunk", "--fwd-only", "--shape",
                                f"{B}x{T}", "--variant", str(n), "--json", f.name], capture_output=True, text=True)
            print(r.stdout, end="", flush=True)
            if r.returncode:
                print(f"{T}x{B} variant {n} {VARIANTS[n]}: exit {r.returncode}: {r.stderr.strip()[-300:]}",
                      flush=True)
                continue
            rows += json.load(open(f.name))
    return rows


def profile_bwd(B: int, T: int) -> list[dict]:
    """Tiling variants of the Triton backward (each checked against the default tiling's gradients)."""
    import torch

    from gdn2ts.kernels.chunk_bwd import chunk_bwd

    xs = make_inputs(B, T, seed=3)
    h0 = torch.randn(B, xs[2].shape[2], K, xs[2].shape[3], device="cuda")
    o, ht, saved = chunk_fwd(*xs, K**-0.5, h0, True, save=True)
    saved_decayed = chunk_fwd(*xs, K**-0.5, h0, True, save=True, tiling=FwdTiling(decayed_qk=True))[2]
    # the training forward's sequential pass on bf16 operands (its time is in the "train fwd" row); the gradients
    # of the backward that reads its kept intermediates are compared with the default's like every variant here
    lowp_fwd = dict(decayed_qk=True, lowp=True, key_dtype=torch.bfloat16, u_dtype=torch.bfloat16,
                    saved_state_dtype=torch.bfloat16)
    saved_lowp = chunk_fwd(*xs, K**-0.5, h0, True, save=True, tiling=FwdTiling(**lowp_fwd))[2]
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    ref = chunk_bwd(*xs, K**-0.5, saved, do, dht, True)
    rows = []
    for name, fwd_opts in (("train fwd", dict(decayed_qk=True, saved_state_dtype=torch.bfloat16)),
                           ("train fwd lowp", lowp_fwd)):
        t = do_bench(lambda o=fwd_opts: chunk_fwd(*xs, K**-0.5, h0, True, save=True, tiling=FwdTiling(**o)),
                     warmup=10, rep=60, return_mode="median")
        rows.append({"B": B, "T": T, "pass": name, "ms": t})
        print(f"{name} {T}x{B}: {t:.3f} ms", flush=True)
    for opts in BWD_VARIANTS:
        def run(opts=opts):
            kept = saved_lowp if opts.get("lowp") else saved_decayed if opts.get("decayed_qk") else saved
            tiling = {k_: v_ for k_, v_ in opts.items() if k_ not in ("decayed_qk", "lowp")}
            return chunk_bwd(*xs, K**-0.5, kept, do, dht, True, tiling=BwdTiling(**tiling))
        try:
            err = max(rel(a.float(), r.float()) for a, r in zip(run(), ref, strict=True))
        except Exception as e:  # a tiling that does not fit this GPU
            print(f"bwd {T}x{B} {opts}: {str(e)[:100]}", flush=True)
            continue
        t = do_bench(run, warmup=10, rep=60, return_mode="median")
        rows.append({"B": B, "T": T, **opts, "ms": t, "rel_err": err})
        print(f"bwd {T}x{B} {opts or 'default'}: {t:.3f} ms (max grad rel diff {err:.1e})", flush=True)
    return rows


def layer_times(B: int, T: int) -> None:
    """Per-kernel GPU time of the GatedDeltaNet2 layer's forward + backward at the paper's width (bf16)."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from gdn2ts.layers import GatedDeltaNet2, GDN2Config

    layer = GatedDeltaNet2(GDN2Config(2304, 16, head_k_dim=128, head_v_dim=128)).to("cuda", torch.bfloat16)
    x = torch.randn(B, T, 2304, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for _ in range(3):
        layer(x)[0].sum().backward()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            layer(x)[0].sum().backward()
        torch.cuda.synchronize()
    print(f"layer {T}x{B} (5 calls, forward + backward)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))


def kernel_times(B: int, T: int, backward: bool = False, fla: bool = False, opts: dict | None = None) -> None:
    """Per-launch GPU time of one chunked forward (or forward + backward), from the PyTorch profiler; ``fla=True``
    profiles FLA's ``chunk_gdn2`` on the same inputs instead."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from gdn2ts.ops import chunk_gdn2

    xs = make_inputs(B, T, seed=2, requires_grad=backward)
    do = torch.randn_like(xs[2])

    if fla:
        from gdn2ts.bench.kernels import _fla

        fla_chunk = _fla()[0]

    def call():
        if fla:
            o = fla_chunk(*xs)[0]
            if backward:
                torch.autograd.grad(o, xs, do)
        elif backward:
            torch.autograd.grad(chunk_gdn2(*xs)[0], xs, do)
        else:
            chunk_fwd(*xs, K**-0.5, None, False, tiling=FwdTiling(**(opts or {})))

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            call()
        torch.cuda.synchronize()
    print(f"{'FLA ' if fla else ''}{T}x{B} (10 calls{', forward + backward' if backward else ''}) {opts or ''}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=16))


def main(argv: list[str] | None = None) -> None:
    """Times every forward and backward tiling variant at two benchmark shapes; ``--json PATH`` keeps the rows,
    ``--profile`` adds the per-launch profiler tables."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", default=None, help="write the timed rows here")
    parser.add_argument("--profile", action="store_true", help="print per-launch profiler tables too")
    parser.add_argument("--fwd-only", action="store_true", help="time the forward variants only")
    parser.add_argument("--only-profile", action="store_true", help="only the profiler tables, ours and FLA's")
    parser.add_argument("--shape", default=None, help="one BxT shape (for example 8x2048) instead of all")
    parser.add_argument("--variant", default=None, help="only these forward variants, e.g. 0,12-15")
    parser.add_argument("--isolate", action="store_true", help="each forward variant in its own process")
    args = parser.parse_args(argv)
    rows = []
    if args.only_profile:
        for B, T in ((8, 2048), (1, 16384)):
            for fla in (False, True):
                kernel_times(B, T, fla=fla)
                kernel_times(B, T, backward=True, fla=fla)
        return
    shapes = ((8, 2048), (4, 4096), (2, 8192), (1, 16384)) if args.fwd_only else ((8, 2048), (1, 16384))
    if args.shape:
        shapes = (tuple(int(n) for n in args.shape.split("x")),)
    for B, T in shapes:
        which = None
        if args.variant is not None:
            which = []
            for part in args.variant.split(","):
                lo, _, hi = part.partition("-")
                which += range(int(lo), int(hi or lo) + 1)
        rows += profile_isolated(B, T, which) if args.isolate else profile(B, T, which)
        if not args.fwd_only:
            rows += [{"pass": "bwd", **r} for r in profile_bwd(B, T)]
        if args.profile:
            kernel_times(B, T)
            kernel_times(B, T, opts=dict(lowp=False))
            kernel_times(B, T, fla=True)
            kernel_times(B, T, backward=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
