"""GPU benchmark of the GDN-2 kernels against flash-linear-attention (FLA) in the same process.

Protocol (docs/performance.md, BENCHMARKS.md section 1): H = 16, K = V = 128, bf16 inputs, fp32 state. Every
path is first checked against the fp64 token loop on fresh random inputs (outputs poisoned with NaN beforehand);
then ours and FLA's run on the same inputs in alternating order and the medians of ``do_bench`` are reported.

    python -m gdn2ts.bench.kernels --json out.json          (also: gdn2ts bench kernels)
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from gdn2ts.bench.common import environment, peak_memory_gb, write_json
from gdn2ts.ops import chunk_gdn2, recurrent_gdn2, recurrent_reference

H, K, V = 16, 128, 128
CHUNK_SHAPES = ((8, 2048), (4, 4096), (2, 8192), (1, 16384))
VARLEN_LENGTHS = (1000, 3000, 37, 5000, 2047, 4000, 1300, 1000)  # BENCHMARKS.md: 16,384 tokens in 8 ragged sequences
DECODE_N = (1, 64, 1024, 4096)


def _fla():
    try:
        from fla.ops.gdn2 import chunk_gdn2 as fla_chunk
        from fla.ops.gdn2 import fused_recurrent_gdn2 as fla_recurrent
    except ImportError:
        return None
    return fla_chunk, fla_recurrent


def make_inputs(B, T, seed, requires_grad=False, device="cuda"):
    """Inputs as the layer makes them: unit-norm q/k, fp32 channel log-decay, b/w in (0, 1); bf16."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=gen, device=device)

    q = F.normalize(r(B, T, H, K), dim=-1).bfloat16()
    k = F.normalize(r(B, T, H, K), dim=-1).bfloat16()
    v = r(B, T, H, V).bfloat16()
    g = F.logsigmoid(r(B, T, H, K) + 3.0)  # fp32
    b = torch.sigmoid(r(B, T, H, K)).bfloat16()
    w = torch.sigmoid(r(B, T, H, V)).bfloat16()
    xs = [q, k, v, g, b, w]
    return [x.requires_grad_() for x in xs] if requires_grad else xs


def rel(a, e):
    return ((a.double() - e.double()).norm() / e.double().norm()).item()


def _median_alternating(fns: dict, rounds: int = 3) -> dict:
    from triton.testing import do_bench

    out = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            out[name].append(do_bench(fn, warmup=20, rep=80, return_mode="median"))
    return {name: statistics.median(ts) for name, ts in out.items()}


def _graphed(fn):
    """Capture ``fn`` in a CUDA graph; return a callable that replays it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def check_decode(fla) -> dict:
    """Step kernel vs the fp64 token loop (and FLA) on fresh inputs, with NaN-poisoned outputs."""
    from gdn2ts.kernels.recurrent import recurrent_fwd

    N, T = 5, 3
    xs = make_inputs(N, T, seed=1234)
    h0 = torch.randn(N, H, K, V, device="cuda")
    out = torch.full_like(xs[2], float("nan"))
    out_state = torch.full_like(h0, float("nan"))
    o, s = recurrent_fwd(*xs, K**-0.5, h0, None, None, out=out, out_state=out_state)
    o_ref, s_ref = recurrent_reference(*(x.double().cpu() for x in xs), initial_state=h0.double().cpu(),
                                       output_final_state=True)
    result = {"o_rel_err": rel(o.cpu(), o_ref), "state_rel_err": rel(s.cpu(), s_ref),
              "all_written": bool(torch.isfinite(o).all() and torch.isfinite(s).all())}
    if fla is not None:
        o_f, s_f = fla[1](*xs, initial_state=h0.clone(), output_final_state=True)
        result["fla_o_rel_err"] = rel(o_f.float().cpu(), o_ref)
        result["ours_vs_fla_o"] = rel(o.float(), o_f.float())
    if not (result["all_written"] and result["o_rel_err"] < 5e-3 and result["state_rel_err"] < 5e-3):
        raise RuntimeError(f"step kernel check failed: {result}")
    return result


def bench_decode(fla, ns=DECODE_N) -> list[dict]:
    return [_decode_row(fla, N) for N in ns]


def _decode_row(fla, N: int) -> dict:
    xs = [x.contiguous() for x in make_inputs(N, 1, seed=N)]
    h0 = torch.randn(N, H, K, V, device="cuda")
    pool = h0.clone()
    pool_bf16 = h0.bfloat16()
    slots = torch.randperm(N, device="cuda")
    state_bytes = 2 * N * H * K * V * 4  # read + write, fp32

    def ours_pool():
        recurrent_gdn2(*xs, initial_state=pool, state_indices=slots)

    def ours_pool_bf16():
        recurrent_gdn2(*xs, initial_state=pool_bf16, state_indices=slots)

    def ours_state():
        recurrent_gdn2(*xs, initial_state=h0)

    fns = {"ours_pool": ours_pool, "ours_pool_bf16": ours_pool_bf16, "ours_state": ours_state}
    if fla is not None:
        def fla_state():
            fla[1](*xs, initial_state=h0, output_final_state=True)
        fns["fla"] = fla_state
    eager = _median_alternating(fns)
    graphed = _median_alternating({name: _graphed(fn) for name, fn in fns.items()})
    row = {"N": N, "eager_ms": eager, "graph_ms": graphed,
           "state_TBps_eager": {n: (state_bytes / (2 if "bf16" in n else 1)) / (t * 1e-3) / 1e12
                                for n, t in eager.items()},
           "state_TBps_graph": {n: (state_bytes / (2 if "bf16" in n else 1)) / (t * 1e-3) / 1e12
                                for n, t in graphed.items()}}
    # error of the bf16 pool: one step from the same state, against the fp32 pool
    p32, p16 = h0.clone(), h0.bfloat16()
    o32, _ = recurrent_gdn2(*xs, initial_state=p32, state_indices=slots)
    o16, _ = recurrent_gdn2(*xs, initial_state=p16, state_indices=slots)
    row["bf16_pool_rel_err"] = {"o": rel(o16.float(), o32.float()), "state": rel(p16.float(), p32)}
    print(f"decode N={N}: " + ", ".join(f"{n} {t * 1e3:.1f} us" for n, t in eager.items())
          + " | graph: " + ", ".join(f"{n} {t * 1e3:.1f} us" for n, t in graphed.items()), flush=True)
    return row


def check_chunk_fwd(fla) -> dict:
    """Triton chunked forward vs the fp64 token loop (on the GPU) and FLA, NaN-poisoned output, fresh inputs."""
    from gdn2ts.kernels.chunk_fwd import chunk_fwd

    xs = make_inputs(2, 1500, seed=4321)
    h0 = torch.randn(2, H, K, V, device="cuda")
    out = torch.full_like(xs[2], float("nan"))
    o, s = chunk_fwd(*xs, K**-0.5, h0, True, out=out)
    o_ref, s_ref = recurrent_reference(*(x.double() for x in xs), initial_state=h0.double(), output_final_state=True)
    result = {"o_rel_err": rel(o, o_ref), "state_rel_err": rel(s, s_ref), "all_written": bool(torch.isfinite(o).all())}
    if fla is not None:
        o_f, s_f = fla[0](*xs, initial_state=h0, output_final_state=True)
        result["fla_o_rel_err"] = rel(o_f, o_ref)
        result["fla_state_rel_err"] = rel(s_f, s_ref)
    if not (result["all_written"] and result["o_rel_err"] < 5e-3 and result["state_rel_err"] < 5e-3):
        raise RuntimeError(f"chunked forward check failed: {result}")
    return result


def check_chunk_bwd(fla) -> dict:
    """Every gradient of the Triton chunked path (forward + backward) against the fp64 chunked PyTorch path (itself
    tested against the token loop), on fresh inputs, with the final state's gradient included."""
    from gdn2ts.ops import chunk_reference

    xs = make_inputs(2, 1500, seed=8765)
    h0 = torch.randn(2, H, K, V, device="cuda")
    do, dht = torch.randn_like(xs[2]), torch.randn_like(h0)

    def grads(fn, inputs, h, **kw):
        leaves = [x.detach().clone().requires_grad_() for x in (*inputs, h)]
        o, s = fn(*leaves[:6], initial_state=leaves[6], output_final_state=True, **kw)
        ((o.double() * do.double()).sum() + (s.double() * dht.double()).sum()).backward()
        return [t.grad for t in leaves]

    got = grads(chunk_gdn2, xs, h0, backend="triton")
    want = grads(chunk_reference, [x.double() for x in xs], h0.double())
    names = ("dq", "dk", "dv", "dg", "db", "dw", "dh0")
    result = {n: rel(a, e) for n, a, e in zip(names, got, want, strict=True)}
    if fla is not None:
        fla_got = grads(fla[0], xs, h0)
        result.update({f"fla_{n}": rel(a, e) for n, a, e in zip(names, fla_got, want, strict=True)})
    bounds = {"dq": 1e-2, "dk": 1e-2, "dv": 1e-2, "dh0": 1e-2, "dg": 2e-2, "db": 2e-2, "dw": 2e-2}
    if not all(result[n] < bound for n, bound in bounds.items()):
        raise RuntimeError(f"chunked backward check failed: {result}")
    return result


def tune_chunk_fwd(shapes=((8, 2048), (1, 16384))) -> list[dict]:
    """Sweep the state kernel's tiling for the Triton chunked forward (each variant checked against the default)."""
    from gdn2ts.kernels.chunk_fwd import chunk_fwd
    from gdn2ts.kernels.tiling import FwdTiling

    rows = []
    for B, T in shapes:
        xs = make_inputs(B, T, seed=11)
        ref, _ = chunk_fwd(*xs, K**-0.5, None, False)
        for bv, warps, stages in ((32, 4, 2), (32, 4, 1), (64, 4, 2), (64, 8, 2), (32, 8, 2), (16, 4, 2)):
            def run(bv=bv, warps=warps, stages=stages, xs=xs):
                tiling = FwdTiling(block_v=bv, num_warps=warps, num_stages=stages)
                return chunk_fwd(*xs, K**-0.5, None, False, tiling=tiling)[0]
            try:
                err = rel(run().float(), ref.float())
            except Exception as e:  # a tiling that does not fit this GPU
                rows.append({"B": B, "T": T, "BV": bv, "warps": warps, "stages": stages, "error": str(e)[:200]})
                continue
            t = _median_alternating({"v": run}, rounds=2)["v"]
            rows.append({"B": B, "T": T, "BV": bv, "warps": warps, "stages": stages, "ms": t, "rel_err": err})
            print(f"tune chunk fwd {T}x{B} BV={bv} warps={warps} stages={stages}: {t:.3f} ms (err {err:.1e})",
                  flush=True)
    return rows


def bench_chunk(fla, shapes=CHUNK_SHAPES) -> list[dict]:
    """Forward (no grad) and forward+backward of chunk_gdn2 (Triton kernels) and FLA's, with the peak memory of
    forward+backward."""
    return [_chunk_row(fla, B, T) for B, T in shapes]


def _time_paths(paths: dict, xs: list, do: torch.Tensor) -> dict:
    """Median ms of the forward (no grad) and of forward+backward of each path on the same inputs (alternating),
    and each forward+backward's peak memory."""

    def fwd(fn):
        def run():
            with torch.no_grad():
                fn(*xs)
        return run

    def fwd_bwd(fn):
        def run():
            o, _ = fn(*xs)
            torch.autograd.grad(o, xs, do)
        return run

    return {"fwd_ms": _median_alternating({n: fwd(fn) for n, fn in paths.items()}, rounds=2),
            "fwd_bwd_ms": _median_alternating({n: fwd_bwd(fn) for n, fn in paths.items()}, rounds=2),
            "peak_GB": {name: peak_memory_gb(fwd_bwd(fn)) for name, fn in paths.items()}}


def _chunk_row(fla, B: int, T: int) -> dict:
    xs = make_inputs(B, T, seed=B * T, requires_grad=True)
    do = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
    paths = {"ours": lambda *a: chunk_gdn2(*a)}
    if fla is not None:
        paths["fla"] = lambda *a: fla[0](*a)
    o_ref = {name: fn(*xs)[0].float() for name, fn in paths.items()}
    row = {"B": B, "T": T}
    if fla is not None:
        row["ours_vs_fla_o"] = rel(o_ref["ours"], o_ref["fla"])
    row.update(_time_paths(paths, xs, do))
    print(f"chunk {T}x{B}: fwd {row['fwd_ms']}, fwd+bwd {row['fwd_bwd_ms']}, peak {row['peak_GB']}", flush=True)
    return row


def make_raw_inputs(B, T, seed, device="cuda"):
    """Raw inputs as the layer hands them to the op with its in-kernel options: q, k before the L2 norm, the decay
    pre-activation, erase and write logits (bf16), ``A_log`` and ``dt_bias`` (fp32, the layer's initialization)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=gen, device=device)

    xs = [r(B, T, H, K).bfloat16(), r(B, T, H, K).bfloat16(), r(B, T, H, V).bfloat16(), r(B, T, H, K).bfloat16(),
          r(B, T, H, K).bfloat16(), r(B, T, H, V).bfloat16()]
    A_log = torch.empty(H, device=device).uniform_(1, 16, generator=gen).log()
    dt = torch.empty(H * K, device=device).uniform_(-6.9, -2.3, generator=gen).exp()
    return xs, A_log, dt + torch.log(-torch.expm1(-dt))


def bench_raw(fla, shapes=((8, 2048), (1, 16384))) -> list[dict]:
    """The op from raw inputs: ours with every in-kernel option (q/k L2 norm, decay from A_log and dt_bias, erase
    and write sigmoids) against FLA's chunk_gdn2 with its in-kernel L2 norm and gate and the two sigmoids in
    PyTorch (FLA's op has no sigmoid option; its layer applies them so), checked against the fp64 chunked path."""
    return [_raw_row(fla, B, T) for B, T in shapes]


def _raw_row(fla, B: int, T: int) -> dict:
    from gdn2ts.ops import chunk_reference

    xs, A_log, dt_bias = make_raw_inputs(B, T, seed=B + T)
    xs = [x.requires_grad_() for x in xs]
    do = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
    opts = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias)
    paths = {"ours": lambda *a: chunk_gdn2(*a, use_bw_sigmoid_in_kernel=True, **opts)}
    if fla is not None:
        paths["fla"] = lambda q, k, v, g, b, w: fla[0](q, k, v, g, b.sigmoid(), w.sigmoid(), **opts)
    row = {"B": B, "T": T}
    with torch.no_grad():
        q, k, v, g, b, w = (x.double() for x in xs)
        q, k = (t * torch.rsqrt(t.pow(2).sum(-1, keepdim=True) + 1e-6) for t in (q, k))
        ga = -A_log.double().exp()[:, None] * F.softplus(g + dt_bias.double().view(H, K))
        o_ref, _ = chunk_reference(q, k, v, ga, b.sigmoid(), w.sigmoid(), K**-0.5)
        for name, fn in paths.items():
            row[f"{name}_o_rel_err"] = rel(fn(*xs)[0], o_ref)
    if row["ours_o_rel_err"] > 5e-3:
        raise RuntimeError(f"raw-input op check failed: {row}")
    row.update(_time_paths(paths, xs, do))
    print(f"raw-input op {T}x{B}: {row}", flush=True)
    return row


def bench_varlen(fla, lengths=VARLEN_LENGTHS) -> dict:
    """The packed ragged batch: check against the fp64 chunked path, then forward and forward+backward against
    FLA's varlen ``chunk_gdn2`` (same inputs, alternating), with the peak memory."""
    from gdn2ts.ops import chunk_reference

    total = sum(lengths)
    xs = make_inputs(1, total, seed=total, requires_grad=True)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")
    do = torch.randn(1, total, H, V, device="cuda", dtype=torch.bfloat16)
    paths = {"ours": lambda *a: chunk_gdn2(*a, cu_seqlens=cu, output_final_state=True)}
    if fla is not None:
        paths["fla"] = lambda *a: fla[0](*a, cu_seqlens=cu, output_final_state=True)
    with torch.no_grad():
        o_ref, s_ref = chunk_reference(*(x.double() for x in xs), K**-0.5, None, True, cu)
        row = {"lengths": list(lengths)}
        for name, fn in paths.items():
            o, s = fn(*xs)
            row[f"{name}_o_rel_err"], row[f"{name}_state_rel_err"] = rel(o, o_ref), rel(s, s_ref)
    row.update(_time_paths(paths, xs, do))
    print(f"varlen {total} tokens in {len(lengths)}: {row}", flush=True)
    return row


def tune_decode(N: int = 4096) -> list[dict]:
    """Sweep the step kernel's value block and warps at N streams (CUDA graph replays), checking each variant."""
    from gdn2ts.kernels.recurrent import recurrent_fwd

    xs = [x.contiguous() for x in make_inputs(N, 1, seed=7)]
    h0 = torch.randn(N, H, K, V, device="cuda")
    ref_o, ref_s = recurrent_fwd(*xs, K**-0.5, h0, None, None)
    state_bytes = 2 * N * H * K * V * 4
    rows = []
    for bv, warps, evict in ((32, 4, ""), (64, 2, ""), (64, 4, ""), (128, 4, ""), (128, 4, "evict_first"),
                             (64, 2, "evict_first"), (None, 4, "")):
        out = torch.full_like(xs[2], float("nan"))
        out_state = torch.full_like(h0, float("nan"))

        def run(bv=bv, warps=warps, evict=evict, out=out, out_state=out_state):
            recurrent_fwd(*xs, K**-0.5, h0, None, None, block_v=bv, num_warps=warps, evict=evict, out=out,
                          out_state=out_state)

        run()
        # the same fp32 arithmetic in another reduction order; o is rounded to bf16
        err = max(rel(out.float(), ref_o.float()) / 100, rel(out_state, ref_s))
        if not err < 1e-5:
            rows.append({"BV": bv, "warps": warps, "evict": evict, "error": err})
            continue
        t = _median_alternating({"v": _graphed(run)})["v"]
        rows.append({"BV": bv or "default", "warps": warps, "evict": evict, "ms": t,
                     "TBps": state_bytes / (t * 1e-3) / 1e12})
        print(f"tune N={N} BV={bv or 'default'} warps={warps} {evict or 'no hint'}: {t * 1e3:.1f} us, "
              f"{rows[-1]['TBps']:.2f} TB/s", flush=True)
    return rows


def bench_kernels(json_path: str | None = None, decode: bool = True, chunk: bool = True) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("bench kernels needs a CUDA device")
    fla = _fla()
    record = {"benchmark": "kernels", "environment": environment(), "fla": fla is not None}
    if fla is not None:
        import fla as fla_pkg

        record["fla_version"] = getattr(fla_pkg, "__version__", "unknown")
    record["decode_check"] = check_decode(fla)
    print("decode check:", record["decode_check"], flush=True)
    if decode:
        record["decode"] = bench_decode(fla)
        write_json(json_path, record)
    if chunk:
        record["chunk_check"] = check_chunk_fwd(fla)
        print("chunk forward check:", record["chunk_check"], flush=True)
        record["chunk_bwd_check"] = check_chunk_bwd(fla)
        print("chunk backward check:", record["chunk_bwd_check"], flush=True)
        record["raw"] = bench_raw(fla)
        write_json(json_path, record)
        record["chunk"] = bench_chunk(fla)
        write_json(json_path, record)
        record["varlen"] = bench_varlen(fla)
    write_json(json_path, record)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-decode", action="store_true")
    parser.add_argument("--no-chunk", action="store_true")
    parser.add_argument("--varlen-only", action="store_true", help="only the packed ragged batch")
    parser.add_argument("--raw-only", action="store_true", help="only the op from raw inputs (in-kernel activations)")
    parser.add_argument("--tune", action="store_true", help="sweep the step kernel's tiling at N = 4096 first")
    args = parser.parse_args(argv)
    if args.tune:
        tuned = {"decode": tune_decode() if not args.no_decode else None,
                 "chunk_fwd": tune_chunk_fwd() if not args.no_chunk else None}
        write_json(None if args.json is None else args.json.replace(".json", "_tune.json"), tuned)
    if args.raw_only:
        write_json(args.json, {"benchmark": "kernels", "environment": environment(), "raw": bench_raw(_fla())})
        return
    if args.varlen_only:
        write_json(args.json, {"benchmark": "kernels", "environment": environment(), "varlen": bench_varlen(_fla())})
        return
    bench_kernels(args.json, decode=not args.no_decode, chunk=not args.no_chunk)


if __name__ == "__main__":
    main()
