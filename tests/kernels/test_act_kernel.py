"""The op's activation pre-pass and its backward (``gdn2ts.kernels.act``) against fp64 PyTorch, and the op with every
in-kernel option on the Triton path against the fp64 token loop, forward and every gradient (the raw inputs,
``A_log``, ``dt_bias``). Under the interpreter on tiny shapes (CPU, fp32/fp16) and on the GPU (bf16, marked
``gpu``). Every buffer the launches allocate starts as NaN (conftest)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gdn2ts.kernels.act import act_bwd, act_fwd
from gdn2ts.ops import chunk_gdn2

from kernel_cases import DEVICE, GATES
from tolerances import assert_close


def truth(q, k, g, b, w, A_log, dt_bias, erase_max):
    """The activations in fp64 (as the op's PyTorch path forms them)."""
    q, k, g, b, w = (t.double() for t in (q, k, g, b, w))
    HG, K = g.shape[2], g.shape[3]
    qn = q * torch.rsqrt(q.pow(2).sum(-1, keepdim=True) + 1e-6)
    kn = k * torch.rsqrt(k.pow(2).sum(-1, keepdim=True) + 1e-6)
    x = g + (0 if dt_bias is None else dt_bias.double().reshape(HG, K))
    ga = -A_log.double().exp()[:, None] * F.softplus(x)
    return qn, kn, ga, erase_max * torch.sigmoid(b), torch.sigmoid(w)


def raw_inputs(B, T, H, K, V, HG, HB, HV, dtype, seed, strided=False):
    gen = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=gen, dtype=torch.float64) * scale).to(dtype)

    if strided:
        # views into one wide row, as the layer's fused projection hands them over
        C = 2 * H * K + HG * K + HB * K + HV * V
        wide = r(B, T, C + 5)
        parts, o = [], 0
        for heads, D in ((H, K), (H, K), (HG, K), (HB, K), (HV, V)):
            parts.append(wide[..., o:o + heads * D].unflatten(-1, (heads, D)))
            o += heads * D
        q, k, g, b, w = parts
        g = g * 3 - 4  # decay pre-activations around softplus's bend
    else:
        q, k, w = r(B, T, H, K), r(B, T, H, K), r(B, T, HV, V, scale=3.0)
        g, b = r(B, T, HG, K, scale=3.0) - 4, r(B, T, HB, K, scale=3.0)
    A_log = torch.rand(HG, generator=gen, dtype=torch.float64).mul(2.7).to(dtype)
    dt_bias = r(HG * K)
    return [t.to(DEVICE) for t in (q, k, g, b, w, A_log, dt_bias)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,T,H,K,V,HG,HB,HV,strided", [
    (2, 70, 2, 16, 8, 2, 2, 2, False),     # two token blocks, the second partial
    (1, 33, 1, 12, 20, 2, 2, 2, True),     # grouped value heads, K and V not powers of two, strided views
    (1, 5, 2, 8, 8, 2, 4, 4, False),       # b per value head
])
def test_activations_and_gradients_match_fp64(dtype, B, T, H, K, V, HG, HB, HV, strided):
    q, k, g, b, w, A_log, dt_bias = raw_inputs(B, T, H, K, V, HG, HB, HV, dtype, seed=T + K, strided=strided)
    em = 2.0
    qn, kn, rq, rk, ga, ba, wa = act_fwd(q, k, g, b, w, A_log, dt_bias, True, True, True, em)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, g, b, w, A_log, dt_bias)]
    want = truth(*leaves, em)
    for name, a, e in zip(("q", "k", "g", "b", "w"), (qn, kn, ga, ba, wa), want, strict=True):
        assert a.is_contiguous()
        assert_close(name, a, e, dtype)
    assert_close("rstd_q", rq, leaves[0].pow(2).sum(-1).add(1e-6).rsqrt(), dtype)
    gen = torch.Generator().manual_seed(1)
    douts = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in want]
    torch.autograd.backward(want, douts)
    d = [t.to(DEVICE) for t in douts]
    grads = act_bwd(qn, kn, rq, rk, d[0].to(dtype), d[1].to(dtype), g, d[2].float(), A_log, dt_bias, b,
                    d[3].to(dtype), w, d[4].to(dtype), em)
    order = (0, 1, 2, 5, 6, 3, 4)  # act_bwd's: q, k, g, A_log, dt_bias, b, w
    inputs = (q, k, g, b, w, A_log, dt_bias)
    for name, a, i in zip(("q", "k", "g", "A_log", "dt_bias", "b", "w"), grads, order, strict=True):
        leaf = leaves[i]
        assert a.shape == leaf.shape and a.dtype == inputs[i].dtype, name
        assert_close(f"d{name}", a, leaf.grad, dtype, 2.0 if name in ("g", "b", "w", "A_log", "dt_bias") else 1.0)


def test_each_option_alone_and_broadcast_scalar_gates():
    """One option at a time leaves the other outputs out; a scalar decay and a scalar erase expanded over the head's
    channels (stride 0), and a [H, K] dt_bias, are read as such."""
    B, T, H, K, V = 1, 40, 2, 8, 8
    q, k, g, b, w, A_log, dt_bias = raw_inputs(B, T, H, K, V, H, H, H, torch.float32, seed=5)
    g1, b1 = g[..., :1].expand(B, T, H, K), b[..., :1].expand(B, T, H, K)
    dt2 = dt_bias.view(H, K)
    for l2, gate, bw in ((True, False, False), (False, True, False), (False, False, True)):
        out = act_fwd(q, k, g1, b1, w, A_log, dt2, l2, gate, bw, 1.0)
        want = truth(q, k, g1, b1, w, A_log, dt2, 1.0)
        assert [t is not None for t in out] == [l2] * 4 + [gate] + [bw] * 2
        if gate:
            assert_close("g", out[4], want[2], torch.float32)
        if bw:
            assert_close("b", out[5], want[3], torch.float32)


def op_case(B, T, H, K, V, dtype, seed, cu=None):
    gen = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return torch.randn(*s, generator=gen, dtype=torch.float64) * scale

    raw = dict(q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, H, V), g=r(B, T, H, K, scale=2) - 3,
               b=r(B, T, H, K, scale=2), w=r(B, T, H, V, scale=2))
    N = B if cu is None else len(cu) - 1
    extra = dict(A_log=torch.rand(H, generator=gen, dtype=torch.float64) * 2, dt_bias=r(H * K), h0=r(N, H, K, V))
    do, dht = r(B, T, H, V), r(N, H, K, V)
    cast = {n: t.to(dtype) for n, t in raw.items()}
    return cast, raw, extra, do, dht


def run_op(x, extra, do, dht, cu, backend, dtype_extra):
    leaves = {n: t.detach().to(DEVICE).requires_grad_() for n, t in x.items()}
    ex = {n: t.detach().to(DEVICE, dtype_extra).requires_grad_() for n, t in extra.items()}
    o, s = chunk_gdn2(*leaves.values(), initial_state=ex["h0"], output_final_state=True,
                      cu_seqlens=None if cu is None else torch.tensor(cu, device=DEVICE),
                      use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=ex["A_log"],
                      dt_bias=ex["dt_bias"], use_bw_sigmoid_in_kernel=True, erase_max=2.0, backend=backend)
    loss = (o.double() * do.to(DEVICE)).sum() + (s.double() * dht.to(DEVICE)).sum()
    loss.backward()
    grads = {n: t.grad for n, t in leaves.items()} | {n: t.grad for n, t in ex.items()}
    return o, s, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cu", [None, [0, 1, 66, 70]])
def test_op_with_raw_inputs_matches_the_token_loop(dtype, cu):
    """chunk_gdn2 with every in-kernel option on the Triton path against the fp64 token loop: output, final state
    and the gradients of q, k, v, g, b, w (raw), A_log, dt_bias and the initial state."""
    B = 1 if cu else 2
    x, raw, extra, do, dht = op_case(B, 70, 2, 16, 16, dtype, seed=11, cu=cu)
    o, s, got = run_op(x, extra, do, dht, cu, "triton", torch.float32)
    o_ref, s_ref, want = run_op({n: t.to(dtype).double() for n, t in raw.items()}, extra, do, dht, cu, "naive",
                                torch.float64)
    assert_close("o", o, o_ref, dtype)
    assert_close("final state", s, s_ref, dtype)
    for n, ref in want.items():
        assert_close(f"d{n}", got[n], ref, dtype, 2.0 if n in (*GATES, "A_log", "dt_bias") else 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,cu", [(2, 1000, None), (1, 3000, [0, 1000, 1037, 3000])])
def test_gpu_op_with_raw_inputs_bf16(B, T, cu):
    """bf16 raw inputs at the benchmark width (16 heads of 128) against fp64 (the chunked PyTorch path, itself
    checked against the token loop), every gradient."""
    x, raw, extra, do, dht = op_case(B, T, 16, 128, 128, torch.bfloat16, seed=T, cu=cu)
    o, s, got = run_op(x, extra, do, dht, cu, "triton", torch.float32)
    o_ref, s_ref, want = run_op({n: t.to(torch.bfloat16).double() for n, t in raw.items()}, extra, do, dht, cu,
                                "torch", torch.float64)
    assert_close("o", o.float(), o_ref, torch.bfloat16)
    assert_close("final state", s, s_ref, torch.bfloat16)
    for n, ref in want.items():
        assert_close(f"d{n}", got[n].float(), ref, torch.bfloat16, 2.0 if n in (*GATES, "A_log", "dt_bias") else 1.0)



def test_opcheck_activation_op():
    """The pre-pass as a torch.library custom op: schema, fake outputs, autograd registration."""
    from gdn2ts.ops.gdn2 import act_triton

    q, k, g, b, w, A_log, dt_bias = raw_inputs(1, 9, 2, 8, 8, 2, 2, 2, torch.float32, seed=2)
    args = [t.requires_grad_() for t in (q, k, g, b, w, A_log, dt_bias)]
    torch.library.opcheck(act_triton._fwd, (*args, True, True, True, 2.0))
