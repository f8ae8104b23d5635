"""Every Triton kernel the layer launches compiles for an H100 (sm_90), checked on the CPU.

The interpreter, which runs the kernels in CI, does not type-check a kernel as the CUDA compiler does (a name bound
with two types in the branches of a runtime ``if`` runs under the interpreter and fails to compile for a GPU). This
test records the launches of the layer's forward, backward, packed forward and steps under the interpreter (each
kernel's argument types and compile-time constants), then compiles each distinct launch ahead of time for
``GPUTarget("cuda", 90, 32)`` with Triton's own compiler and the ``ptxas`` it ships: no GPU is needed.
"""

from __future__ import annotations

import inspect
import os
import pickle
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("records launches under the interpreter (a CUDA machine compiles its kernels as it runs them)",
                allow_module_level=True)

import triton.language as tl  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402

from gdn2ts.layers import GatedDeltaNet2, GDN2Config  # noqa: E402

_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
          torch.int32: "i32", torch.int64: "i64", torch.bool: "i1", torch.uint8: "u8", torch.int8: "i8"}
_OPTIONS = ("num_warps", "num_stages")


def _signature(fn, args, kwargs) -> tuple[dict, dict, dict]:
    """Triton's signature (argument name -> type), compile-time constants and launch options of one call."""
    params = list(inspect.signature(fn).parameters.values())
    bound = dict(zip([p.name for p in params], args, strict=False))
    bound.update({k: v for k, v in kwargs.items() if k not in (*_OPTIONS, "num_ctas", "maxnreg")})
    sig, consts = {}, {}
    for i, p in enumerate(params):
        value = bound.get(p.name, p.default)
        if "constexpr" in str(p.annotation) or p.annotation is tl.constexpr or value is None:
            sig[p.name], consts[(i,)] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            sig[p.name] = "*" + _TYPES[value.dtype]
        elif isinstance(value, bool):
            sig[p.name] = "i1"
        elif isinstance(value, int):
            sig[p.name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
        elif isinstance(value, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {p.name} of type {type(value).__name__}")
    return sig, consts, {k: v for k, v in kwargs.items() if k in _OPTIONS}


@pytest.fixture(scope="module")
def launches():
    seen: dict = {}
    run = interpreter.InterpretedFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        sig, consts, opts = _signature(self.fn, args, kwargs)
        key = (self.fn.__module__, self.fn.__name__, tuple(sig.items()),
               tuple(sorted((k, repr(v)) for k, v in consts.items())), tuple(sorted(opts.items())))
        seen.setdefault(key, (self.fn, sig, consts, opts))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = recording
    try:
        torch.manual_seed(0)
        base = dict(num_heads=2, head_k_dim=32, head_v_dim=32, gate_low_rank=8)
        # each mixer once, both compute dtypes, grouped value heads: the kernels' distinct type signatures
        for name, dtype, extra in (("gdn2", torch.bfloat16, {}), ("gdn2", torch.float32, {"num_v_heads": 4}),
                                   ("kda", torch.float32, {}), ("gdn", torch.bfloat16, {}),
                                   ("mamba2", torch.bfloat16, {"num_heads": 1, "num_v_heads": 4})):
            layer = GatedDeltaNet2(GDN2Config.variant(name, 64, **{**base, **extra}), backend="triton").to(dtype)
            x = torch.randn(1, 66, 64, dtype=dtype, requires_grad=True)  # two chunks, the second a tail
            y, state = layer(x)
            (y.float().square().sum() + state.recurrent.sum()).backward()
            with torch.no_grad():
                layer(x.detach(), cu_seqlens=torch.tensor([0, 5, 66]))
                layer.step(x[:, 0].detach(), layer.init_state(1))
    finally:
        interpreter.InterpretedFunction.run = run
    return list(seen.values())


# run in a fresh process without the interpreter, where the kernels (and the helpers they call) are JIT functions
_COMPILE = """
import importlib, pickle, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

failures = []
launches = pickle.load(open(sys.argv[1], "rb"))
for module, name, sig, consts, opts in launches:
    fn = getattr(importlib.import_module(module), name)
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    try:
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options=opts)
    except Exception as e:
        failures.append(f"{module}.{name} {sig}: {str(e).strip().splitlines()[-1][:300]}")
pickle.dump(failures, open(sys.argv[2], "wb"))
"""


def test_every_layer_launch_compiles_for_sm90(launches, tmp_path):
    assert len(launches) >= 20, f"only {len(launches)} launches recorded: the layer ran no Triton kernels?"
    names = {fn.__name__ for fn, *_ in launches}
    # the stages of the chunked op, the conv, the activations, the norm and the decode step all launched
    assert len(names) >= 8, sorted(names)
    records = [(fn.__module__, fn.__name__, sig, consts, opts) for fn, sig, consts, opts in launches]
    (tmp_path / "launches.pkl").write_bytes(pickle.dumps(records))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE, str(tmp_path / "launches.pkl"), str(tmp_path / "out.pkl")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    failures = pickle.loads((tmp_path / "out.pkl").read_bytes())
    assert not failures, f"{len(failures)} of {len(launches)} launches fail to compile for sm_90:\n" + "\n".join(
        failures)
