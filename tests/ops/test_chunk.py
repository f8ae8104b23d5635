"""chunk_gdn2 (the chunked CPU path) against the token-by-token ground truth: forward and every gradient."""

from __future__ import annotations

import pytest
import torch

from gdn2ts.ops import chunk_gdn2, chunk_reference, recurrent_reference

from inputs import GATES, make_inputs
from tolerances import GATE_FACTOR, assert_close

NAMES = ("q", "k", "v", "g", "b", "w", "h0")


def run(fn, x, do=None, ds=None, **kw):
    """Forward, then backward of <o, do> + <state, ds> (seeded cotangents unless given); (o, state, grads)."""
    leaves = {n: x[n].detach().clone().requires_grad_() for n in NAMES if x[n] is not None}
    o, s = fn(leaves["q"], leaves["k"], leaves["v"], leaves["g"], leaves["b"], leaves["w"],
              initial_state=leaves.get("h0"), output_final_state=True, **kw)
    gen = torch.Generator().manual_seed(123)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64) if do is None else do
    ds = torch.randn(s.shape, generator=gen, dtype=torch.float64) if ds is None else ds
    loss = (o.double() * do).sum() + (s.double() * ds).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    grads = {n: torch.zeros_like(t) if gr is None else gr for (n, t), gr in zip(leaves.items(), grads, strict=False)}
    return o, s, grads


def truth(x, do=None, ds=None, **kw):
    x64 = {n: (t.double() if t is not None else None) for n, t in x.items()}
    return run(recurrent_reference, x64, do, ds, **kw)


def cotangents(T, N, HV=2, K=16, V=8, seed=99):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(1, T, HV, V, generator=gen, dtype=torch.float64),
            torch.randn(N, HV, K, V, generator=gen, dtype=torch.float64))


def compare(got, want, dtype):
    o, s, grads = got
    o_ref, s_ref, grads_ref = want
    assert_close("o", o, o_ref, dtype)
    assert_close("final_state", s, s_ref, dtype)
    for name, ref in grads_ref.items():
        assert_close(f"d{name}", grads[name], ref, dtype, GATE_FACTOR if name in "gbw" else 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gates", GATES)
@pytest.mark.parametrize("T", [1, 63, 65, 130])
def test_chunk_matches_token_loop(T, gates, dtype):
    x = make_inputs(T=T, gates=gates, dtype=dtype, seed=T)
    compare(run(chunk_gdn2, x, backend="torch"), truth(x), dtype)


@pytest.mark.parametrize("gates", ["normal", "decay_near_0", "strong_mixed"])
def test_blocked_decay_form_matches(gates):
    """Chunks whose decay spreads too far use the blocked products; force them everywhere and compare."""
    x = make_inputs(T=130, gates=gates, dtype=torch.float64, seed=5)
    compare(run(chunk_reference, x, force_blocked=True), truth(x), torch.float64)
    x32 = make_inputs(T=130, gates=gates, dtype=torch.float32, seed=5)
    compare(run(chunk_reference, x32, force_blocked=True), truth(x32), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hand_written_backward_equals_autograd(dtype):
    x = make_inputs(T=130, dtype=dtype, gates="strong_mixed", seed=3)
    compare(run(chunk_reference, x), run(chunk_reference, {n: t.double() if t is not None else None
                                                          for n, t in x.items()}, autograd=True), dtype)


@pytest.mark.parametrize("HV,g_heads", [(4, 2), (4, 4)])
def test_grouped_value_heads(HV, g_heads):
    x = make_inputs(T=70, H=2, HV=HV, g_heads=g_heads, dtype=torch.float32, seed=11)
    compare(run(chunk_gdn2, x), truth(x), torch.float32)


def test_without_initial_state():
    x = make_inputs(T=70, initial_state=False, dtype=torch.float32, seed=2)
    compare(run(chunk_gdn2, x), truth(x), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_varlen_equals_separate_sequences(dtype):
    lengths = [1, 63, 0, 65, 130, 7]
    parts = [make_inputs(B=1, T=n, dtype=dtype, seed=20 + i) for i, n in enumerate(lengths)]
    packed = {n: torch.cat([p[n] for p in parts], dim=1) for n in NAMES if n != "h0"}
    packed["h0"] = torch.cat([p["h0"] for p in parts], dim=0)
    cu = torch.tensor([0] + lengths).cumsum(0)
    do, ds = cotangents(sum(lengths), len(lengths))
    o, s, grads = run(chunk_gdn2, packed, do, ds, cu_seqlens=cu)
    compare((o, s, grads), truth(packed, do, ds, cu_seqlens=cu), dtype)
    for i, p in enumerate(parts):
        o_i, s_i, g_i = run(chunk_gdn2, p, do[:, cu[i]:cu[i + 1]], ds[i:i + 1])
        assert_close(f"o[{i}]", o[:, cu[i]:cu[i + 1]], o_i, dtype)
        assert_close(f"state[{i}]", s[i:i + 1], s_i, dtype)
        for name in ("q", "k", "v", "g", "b", "w"):
            assert_close(f"d{name}[{i}]", grads[name][:, cu[i]:cu[i + 1]], g_i[name], dtype,
                         GATE_FACTOR if name in "gbw" else 1.0)
        assert_close(f"dh0[{i}]", grads["h0"][i:i + 1], g_i["h0"], dtype)


@pytest.mark.parametrize("split", [1, 64, 100])
def test_two_passes_carrying_state_equal_one(split):
    x = make_inputs(T=130, dtype=torch.float64, seed=7)
    leaves = {n: x[n].clone().requires_grad_() for n in NAMES}
    args = [leaves[n] for n in ("q", "k", "v", "g", "b", "w")]
    o, s = chunk_gdn2(*args, initial_state=leaves["h0"], output_final_state=True)
    first = [a[:, :split] for a in args]
    second = [a[:, split:] for a in args]
    o1, s1 = chunk_gdn2(*first, initial_state=leaves["h0"], output_final_state=True)
    o2, s2 = chunk_gdn2(*second, initial_state=s1, output_final_state=True)
    assert_close("o", torch.cat([o1, o2], dim=1), o, torch.float64)
    assert_close("final_state", s2, s, torch.float64)
    loss = lambda o_, s_: (o_ * torch.cos(o_)).sum() + s_.pow(2).sum()  # noqa: E731
    g_one = torch.autograd.grad(loss(o, s), list(leaves.values()))
    g_two = torch.autograd.grad(loss(torch.cat([o1, o2], dim=1), s2), list(leaves.values()))
    for name, a, e in zip(NAMES, g_two, g_one, strict=False):
        assert_close(f"d{name}", a, e, torch.float64)


def test_empty_sequence_returns_initial_state():
    x = make_inputs(T=0, dtype=torch.float32)
    o, s = chunk_gdn2(x["q"], x["k"], x["v"], x["g"], x["b"], x["w"], initial_state=x["h0"],
                      output_final_state=True)
    assert o.shape == (2, 0, 2, 8)
    assert torch.equal(s, x["h0"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_accumulate_in_fp32(dtype):
    x = make_inputs(T=100, dtype=dtype, seed=9)
    o, s, _ = run(chunk_gdn2, x)
    o_ref, s_ref, _ = truth(x)
    assert o.dtype == dtype and s.dtype == torch.float32
    assert_close("o", o, o_ref, dtype)
    assert_close("final_state", s, s_ref, dtype)


def test_gradcheck_multi_chunk_fp64():
    """gradcheck on tiny shapes, several chunks (chunk size 4), both decay forms, with initial state."""
    x = make_inputs(B=1, T=9, H=1, K=4, V=3, HV=2, dtype=torch.float64, gates="strong_mixed", seed=4)
    args = tuple(x[n].clone().requires_grad_() for n in NAMES)
    for blocked in (False, True):
        def f(q, k, v, g, b, w, h0, blocked=blocked):
            return chunk_reference(q, k, v, g, b, w, initial_state=h0, output_final_state=True, chunk_size=4,
                                   force_blocked=blocked)
        assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_public_op_with_in_op_activations():
    gen = torch.Generator().manual_seed(0)
    B, T, H, K, V = 1, 5, 2, 3, 2
    shapes = [(B, T, H, K), (B, T, H, K), (B, T, H, V), (B, T, H, K), (B, T, H, K), (B, T, H, V), (H,), (H * K,),
              (B, H, K, V)]
    args = tuple(torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes)

    def f(q, k, v, g, b, w, A_log, dt_bias, h0):
        return chunk_gdn2(q, k, v, g, b, w, initial_state=h0, output_final_state=True,
                          use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias,
                          use_bw_sigmoid_in_kernel=True, erase_max=2.0)
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_in_op_activations_equal_manual_activation():
    gen = torch.Generator().manual_seed(1)
    B, T, H, K, V = 2, 70, 2, 8, 4
    raw = {n: torch.randn(*s, generator=gen, dtype=torch.float64) for n, s in
           dict(q=(B, T, H, K), k=(B, T, H, K), v=(B, T, H, V), g=(B, T, H, K), b=(B, T, H, K),
                w=(B, T, H, V)).items()}
    A_log = torch.rand(H, generator=gen, dtype=torch.float64).mul(2).requires_grad_()
    dt_bias = torch.randn(H * K, generator=gen, dtype=torch.float64).requires_grad_()
    leaves = {n: t.clone().requires_grad_() for n, t in raw.items()}
    o, _ = chunk_gdn2(*leaves.values(), use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=A_log,
                      dt_bias=dt_bias, use_bw_sigmoid_in_kernel=True, erase_max=2.0)
    grads = torch.autograd.grad(o.pow(2).sum(), [*leaves.values(), A_log, dt_bias])

    m = {n: t.clone().requires_grad_() for n, t in raw.items()}
    A2, dt2 = A_log.detach().clone().requires_grad_(), dt_bias.detach().clone().requires_grad_()
    q = m["q"] / (m["q"].pow(2).sum(-1, keepdim=True) + 1e-6).sqrt()
    k = m["k"] / (m["k"].pow(2).sum(-1, keepdim=True) + 1e-6).sqrt()
    g = -A2.exp()[:, None] * torch.nn.functional.softplus(m["g"] + dt2.view(H, K))
    b, w = 2 * torch.sigmoid(m["b"]), torch.sigmoid(m["w"])
    o_ref, _ = recurrent_reference(q, k, m["v"], g, b, w)
    grads_ref = torch.autograd.grad(o_ref.pow(2).sum(), [*m.values(), A2, dt2])
    assert_close("o", o, o_ref, torch.float64)
    for name, a, e in zip([*raw, "A_log", "dt_bias"], grads, grads_ref, strict=False):
        assert_close(f"d{name}", a, e, torch.float64)


def test_naive_backend_is_the_token_loop():
    x = make_inputs(T=20, dtype=torch.float64)
    o, s = chunk_gdn2(x["q"], x["k"], x["v"], x["g"], x["b"], x["w"], initial_state=x["h0"],
                      output_final_state=True, backend="naive")
    o_ref, s_ref = recurrent_reference(x["q"], x["k"], x["v"], x["g"], x["b"], x["w"], initial_state=x["h0"],
                                       output_final_state=True)
    assert torch.equal(o, o_ref) and torch.equal(s, s_ref)


def test_autocast_does_not_lower_the_op_precision():
    x = make_inputs(T=70, dtype=torch.float32, seed=12)
    args = [x[n] for n in ("q", "k", "v", "g", "b", "w")]
    o_ref, s_ref = chunk_gdn2(*args, initial_state=x["h0"], output_final_state=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, s = chunk_gdn2(*args, initial_state=x["h0"], output_final_state=True)
    assert o.dtype == torch.float32 and torch.equal(o, o_ref) and torch.equal(s, s_ref)


def test_no_token_returns_a_copy_of_the_initial_state():
    x = make_inputs(B=1, T=0, dtype=torch.float32)
    _, s = chunk_gdn2(*(x[n] for n in ("q", "k", "v", "g", "b", "w")), initial_state=x["h0"],
                      output_final_state=True)
    assert torch.equal(s, x["h0"]) and s.data_ptr() != x["h0"].data_ptr()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backward_inside_an_autocast_region_equals_backward_outside(backend):
    """The op sets its own precision in both directions: calling backward inside a bf16 autocast region gives the
    same gradients as without autocast."""
    x = make_inputs(B=1, T=70, H=2, K=16, V=16, dtype=torch.float32, seed=4, initial_state=False)
    grads = []
    for enabled in (False, True):
        leaves = [x[n].clone().requires_grad_() for n in ("q", "k", "v", "g", "b", "w")]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            o, _ = chunk_gdn2(*leaves, backend=backend)
            (o.float() ** 2).sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)
