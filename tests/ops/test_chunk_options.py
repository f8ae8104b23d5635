"""chunk_gdn2's bounded gate (``lower_bound``: forward and every gradient, A_log and dt_bias included) and its
intermediate states (the state entering each 64-token chunk) against the fp64 token loop, on the PyTorch paths
and on the Triton kernels (under the interpreter on the CPU)."""

from __future__ import annotations

import pytest
import torch

from gdn2ts.ops import chunk_gdn2, recurrent_reference
from gdn2ts.ops.gdn2.options import gate

from inputs import make_inputs
from tolerances import GATE_FACTOR, assert_close

ARGS = ("q", "k", "v", "g", "b", "w")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
H, K, V = 2, 16, 8


def inputs(B, T, dtype, seed, raw_gate=False):
    x = make_inputs(B=B, T=T, H=H, K=K, V=V, dtype=dtype, seed=seed)
    if raw_gate:
        x["g"] = torch.randn(B, T, H, K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    return [x[n].to(DEVICE) for n in ARGS], x["h0"].to(DEVICE)


@pytest.mark.parametrize("backend,dtype,T,with_A_log", [
    ("torch", torch.float64, 70, True), ("torch", torch.float64, 70, False), ("naive", torch.float64, 9, False),
    ("torch", torch.float32, 70, True), ("triton", torch.float32, 20, True)])
def test_bounded_gate_forward_and_gradients(backend, dtype, T, with_A_log):
    args, h0 = inputs(2, T, dtype, seed=1, raw_gate=True)
    gen = torch.Generator().manual_seed(1)
    A_log = torch.rand(H, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE) if with_A_log else None
    dt_bias = torch.randn(H * K, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    leaves = [*args, h0, dt_bias] + ([A_log] if with_A_log else [])
    for t in leaves:
        t.requires_grad_(True)
    o, ht = chunk_gdn2(*args, initial_state=h0, output_final_state=True, use_gate_in_kernel=True, A_log=A_log,
                       dt_bias=dt_bias, lower_bound=-4.0, backend=backend)
    gen = torch.Generator().manual_seed(2)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    dht = torch.randn(ht.shape, generator=gen, dtype=torch.float64)
    ((o.double().cpu() * do).sum() + (ht.double().cpu() * dht).sum()).backward()
    got = [t.grad.cpu() for t in leaves]

    ref = [t.detach().double().cpu().requires_grad_(True) for t in leaves]
    q, k, v, g, b, w, s0, bias = ref[:8]
    a = ref[8] if with_A_log else None
    o_ref, ht_ref = recurrent_reference(q, k, v, gate(g, a, bias, -4.0, torch.float64), b, w, None, s0, True)
    ((o_ref * do).sum() + (ht_ref * dht).sum()).backward()
    assert_close("o", o.detach().cpu(), o_ref.detach(), dtype)
    assert_close("ht", ht.detach().cpu(), ht_ref.detach(), dtype)
    names = ["dq", "dk", "dv", "dg", "db", "dw", "dh0", "ddt_bias", "dA_log"]
    for name, x, r in zip(names, got, ref, strict=False):
        gated = name in ("dg", "db", "dw", "ddt_bias", "dA_log")
        assert_close(name, x, r.grad, dtype, GATE_FACTOR if gated else 1.0)


def chunk_state_truth(args, h0, lengths=None):
    """fp64 states entering each 64-token chunk, from prefixes run token by token (packed when ``lengths``)."""
    a64 = [a.double().cpu() for a in args]
    if lengths is None:
        B, T = a64[0].shape[:2]
        return torch.stack([torch.stack([
            recurrent_reference(*(a[n:n + 1, :c] for a in a64), None, h0[n:n + 1].double().cpu(), True)[1][0]
            for c in range(0, T, 64)]) for n in range(B)])
    states, s0 = [], 0
    for n, L in enumerate(lengths):
        for c in range(0, L, 64):
            prefix = [a[:, s0:s0 + c] for a in a64]
            states.append(recurrent_reference(*prefix, None, h0[n:n + 1].double().cpu(), True)[1][0])
        s0 += L
    return torch.stack(states)[None]


@pytest.mark.parametrize("backend,dtype,T", [("torch", torch.float64, 130), ("naive", torch.float64, 65),
                                             ("torch", torch.float32, 129), ("triton", torch.float32, 70)])
def test_intermediate_states(backend, dtype, T):
    args, h0 = inputs(2, T, dtype, seed=3)
    with torch.inference_mode():
        o, ht, h = chunk_gdn2(*args, initial_state=h0, output_final_state=True, return_intermediate_states=True,
                              backend=backend)
        o1, ht1 = chunk_gdn2(*args, initial_state=h0, output_final_state=True, backend=backend)
        if backend != "triton":  # (the interpreter is slow; the final state is dropped after either path)
            _, none, _ = chunk_gdn2(*args, initial_state=h0, return_intermediate_states=True, backend=backend)
            assert none is None
    assert h.shape == (2, -(-T // 64), H, K, V) and h.dtype == (torch.float64 if dtype == torch.float64 else
                                                                   torch.float32)
    assert_close("h", h.cpu(), chunk_state_truth(args, h0), dtype)
    assert_close("o", o.cpu(), o1.double().cpu(), dtype)
    assert_close("ht", ht.cpu(), ht1.double().cpu(), dtype)


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("triton", torch.float32)])
def test_intermediate_states_packed(backend, dtype):
    lengths = [65, 0, 3]
    cu = torch.tensor([0, 65, 65, 68], device=DEVICE)
    args, _ = inputs(1, sum(lengths), dtype, seed=4)
    h0 = torch.randn(3, H, K, V, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=DEVICE)
    with torch.no_grad():
        o, ht, h = chunk_gdn2(*args, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                              return_intermediate_states=True, backend=backend)
        o1, ht1 = chunk_gdn2(*args, initial_state=h0, output_final_state=True, cu_seqlens=cu, backend=backend)
    assert h.shape == (1, 2 + 0 + 1, H, K, V)
    assert_close("h", h.cpu(), chunk_state_truth(args, h0, lengths), dtype)
    assert_close("o", o.cpu(), o1.double().cpu(), dtype)
    assert_close("ht", ht.cpu(), ht1.double().cpu(), dtype)


def test_intermediate_states_refuse_gradients():
    args, _ = inputs(1, 5, torch.float32, seed=5)
    args[0].requires_grad_(True)
    with pytest.raises(RuntimeError, match="return_intermediate_states is for inference"):
        chunk_gdn2(*args, return_intermediate_states=True)
