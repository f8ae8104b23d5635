"""gdn2ts.compat.fla: FLA 0.6.0's GDN-2 signatures (names, order, defaults) and every option against the fp64 token
loop, with the activations written out here (L2 norm, the softplus gate, the bounded gate) rather than taken from
the op. On the CPU the op runs its PyTorch paths; the Triton paths of the same options are tested in tests/ops."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F

from gdn2ts.compat import fla
from gdn2ts.compat.fla import chunk_gdn2, fused_recurrent_gdn2, fused_recurrent_gdn2_fwd
from gdn2ts.ops import recurrent_reference

from tolerances import GATE_FACTOR, assert_close

F64 = torch.float64
B, T, H, K, V = 2, 70, 2, 8, 4
# FLA 0.6.0's parameters in order, with their defaults (inspect.Parameter.empty: none)
E = inspect.Parameter.empty
FLA_SIGNATURES = {
    "chunk_gdn2": [("q", E), ("k", E), ("v", E), ("g", E), ("b", E), ("w", E), ("scale", None),
                   ("initial_state", None), ("output_final_state", False), ("use_qk_l2norm_in_kernel", False),
                   ("use_gate_in_kernel", False), ("cu_seqlens", None), ("cu_seqlens_cpu", None),
                   ("safe_gate", False), ("lower_bound", None), ("disable_recompute", False),
                   ("return_intermediate_states", False), ("state_v_first", False), ("cp_context", None),
                   ("kwargs", E)],
    "fused_recurrent_gdn2": [("q", E), ("k", E), ("v", E), ("g", E), ("b", E), ("w", E), ("A_log", None),
                             ("dt_bias", None), ("scale", None), ("initial_state", None),
                             ("output_final_state", False), ("use_qk_l2norm_in_kernel", False),
                             ("use_gate_in_kernel", False), ("lower_bound", None), ("state_v_first", False),
                             ("cu_seqlens", None), ("kwargs", E)],
    "fused_recurrent_gdn2_fwd": [("q", E), ("k", E), ("v", E), ("g", E), ("b", E), ("w", E), ("A_log", None),
                                 ("dt_bias", None), ("initial_state", None), ("scale", None),
                                 ("output_final_state", False), ("inplace_final_state", False),
                                 ("state_v_first", False), ("cu_seqlens", None), ("ssm_state_indices", None),
                                 ("num_accepted_tokens", None), ("use_qk_l2norm_in_kernel", False),
                                 ("use_gate_in_kernel", False), ("lower_bound", None), ("out", None),
                                 ("kwargs", E)],
}


@pytest.mark.parametrize("name", sorted(FLA_SIGNATURES))
def test_signatures_are_fla_060s(name):
    params = inspect.signature(getattr(fla, name)).parameters.values()
    assert [(p.name, p.default) for p in params] == FLA_SIGNATURES[name]
    assert list(params)[-1].kind is inspect.Parameter.VAR_KEYWORD


def rand(*shape, seed, kind="normal", dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=F64) if kind == "normal" else torch.rand(*shape, generator=gen,
                                                                                          dtype=F64)
    return x.to(dtype)


def inputs(Bn=B, Tn=T, Hn=H, HV=H, dtype=F64, seed=0, raw_gate=False):
    q, k = rand(Bn, Tn, Hn, K, seed=seed, dtype=dtype), rand(Bn, Tn, Hn, K, seed=seed + 1, dtype=dtype)
    v = rand(Bn, Tn, HV, V, seed=seed + 2, dtype=dtype)
    g = rand(Bn, Tn, HV, K, seed=seed + 3, dtype=dtype) if raw_gate else \
        F.logsigmoid(rand(Bn, Tn, HV, K, seed=seed + 3) + 1).to(dtype)
    b = rand(Bn, Tn, HV, K, seed=seed + 4, kind="uniform", dtype=dtype)
    w = rand(Bn, Tn, HV, V, seed=seed + 5, kind="uniform", dtype=dtype)
    return [q, k, v, g, b, w]


def l2(x):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def softplus_gate(g, A_log, dt_bias):
    return -A_log.exp()[:, None] * F.softplus(g + dt_bias.view(g.shape[-2:]))


def bounded_gate(g, A_log, dt_bias, lower_bound):
    x = g + dt_bias.view(g.shape[-2:])
    return lower_bound * torch.sigmoid(x if A_log is None else A_log.exp()[:, None] * x)


def truth(q, k, v, g, b, w, scale=None, h0=None, cu=None, norm=True):
    q, k, v, g, b, w = (t.double() for t in (q, k, v, g, b, w))
    if norm:
        q, k = l2(q), l2(k)
    return recurrent_reference(q, k, v, g, b, w, scale, None if h0 is None else h0.double(), True, cu)


def leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def grads_of(outs, seed=9):
    """Backward of a fixed random projection of ``outs``; the same projection for the op and the truth."""
    total = 0
    for i, o in enumerate(outs):
        total = total + (o.double() * rand(*o.shape, seed=seed + i)).sum()
    total.backward()


# ----------------------------------------------------------------------------------------------------------------
# chunk_gdn2
# ----------------------------------------------------------------------------------------------------------------
def test_chunk_positional_order_and_every_gradient():
    x = inputs(seed=10)
    h0 = rand(B, H, K, V, seed=11)
    ours, ref = leaves(*x, h0), leaves(*x, h0)
    o, ht = chunk_gdn2(*ours[:6], 0.7, ours[6], True, True)  # scale, initial_state, output_final_state, l2 norm
    o_ref, ht_ref = truth(*ref[:6], 0.7, ref[6])
    assert_close("o", o.detach(), o_ref.detach(), F64)
    assert_close("ht", ht.detach(), ht_ref.detach(), F64)
    grads_of([o, ht])
    grads_of([o_ref, ht_ref])
    for name, a, r in zip(["dq", "dk", "dv", "dg", "db", "dw", "dh0"], ours, ref, strict=True):
        assert_close(name, a.grad, r.grad, F64)


def test_chunk_defaults_return_no_final_state():
    x = inputs(seed=12)
    o, ht = chunk_gdn2(*x)
    assert ht is None and o.dtype == x[0].dtype
    assert_close("o", o, truth(*x, norm=False)[0], F64)


@pytest.mark.parametrize("safe_gate,lower_bound,with_A_log", [(False, None, True), (True, -5.0, True),
                                                              (True, -2.5, False), (False, -3.0, True)])
def test_chunk_gate_in_kernel_with_gradients(safe_gate, lower_bound, with_A_log):
    x = inputs(seed=13, raw_gate=True)
    A_log, dt_bias = torch.log(rand(H, seed=14, kind="uniform") * 15 + 1), rand(H * K, seed=15)
    ours = leaves(*x, A_log, dt_bias)
    ref = leaves(*x, A_log, dt_bias)
    o, ht = chunk_gdn2(*ours[:6], output_final_state=True, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                       safe_gate=safe_gate, lower_bound=lower_bound, A_log=ours[6] if with_A_log else None,
                       dt_bias=ours[7])
    a = ref[6] if with_A_log else None
    g = softplus_gate(ref[3], a, ref[7]) if lower_bound is None else bounded_gate(ref[3], a, ref[7], lower_bound)
    o_ref, ht_ref = truth(ref[0], ref[1], ref[2], g, ref[4], ref[5])
    assert_close("o", o.detach(), o_ref.detach(), F64)
    assert_close("ht", ht.detach(), ht_ref.detach(), F64)
    grads_of([o, ht])
    grads_of([o_ref, ht_ref])
    names = ["dq", "dk", "dv", "dg", "db", "dw"] + (["dA_log"] if with_A_log else []) + ["ddt_bias"]
    pairs = [(a, r) for i, (a, r) in enumerate(zip(ours, ref, strict=True)) if i != 6 or with_A_log]
    for name, (a, r) in zip(names, pairs, strict=True):
        assert_close(name, a.grad, r.grad, F64, GATE_FACTOR)


def test_chunk_lower_bound_and_gate_params_are_ignored_without_gate_in_kernel():
    x = inputs(seed=16)
    o, _ = chunk_gdn2(*x, lower_bound=-5.0, safe_gate=True, A_log=torch.zeros(H), dt_bias=torch.zeros(H * K))
    assert_close("o", o, truth(*x, norm=False)[0], F64)


def test_chunk_state_v_first_and_its_old_name():
    x = inputs(seed=17)
    h0 = rand(B, H, K, V, seed=18)
    ours, ref = leaves(*x, h0.transpose(-1, -2).contiguous()), leaves(*x, h0)
    o, ht = chunk_gdn2(*ours[:6], initial_state=ours[6], output_final_state=True, state_v_first=True)
    o_ref, ht_ref = truth(*ref[:6], h0=ref[6], norm=False)
    assert ht.shape == (B, H, V, K)
    assert_close("o", o.detach(), o_ref.detach(), F64)
    assert_close("ht", ht.detach().transpose(-1, -2), ht_ref.detach(), F64)
    grads_of([o, ht.transpose(-1, -2)])
    grads_of([o_ref, ht_ref])
    assert_close("dh0", ours[6].grad.transpose(-1, -2), ref[6].grad, F64)
    with pytest.warns(DeprecationWarning, match="transpose_state_layout"):
        o2, ht2 = chunk_gdn2(*x, initial_state=ours[6].detach(), output_final_state=True,
                             transpose_state_layout=True)
    assert torch.equal(ht2, ht.detach())
    with pytest.raises(ValueError, match="not both"):
        chunk_gdn2(*x, state_v_first=True, transpose_state_layout=True)
    with pytest.raises(ValueError, match=r"'initial_state' expected shape \[N=2, HV=2, V=4, K=8\]"):
        chunk_gdn2(*x, initial_state=h0, state_v_first=True)


def test_chunk_varlen_with_cu_seqlens_cpu():
    cu = torch.tensor([0, 15, 15, 100])
    x = inputs(Bn=1, Tn=100, seed=19)
    h0 = rand(3, H, K, V, seed=20)
    o, ht = chunk_gdn2(*x, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=cu,
                       cu_seqlens_cpu=cu.clone())
    o_ref, ht_ref = truth(*x, h0=h0, cu=cu)
    assert_close("o", o, o_ref, F64)
    assert_close("ht", ht, ht_ref, F64)
    for bad, pattern in [(torch.tensor([0, 15, 16, 100]), r"'cu_seqlens_cpu' expected the values of cu_seqlens"),
                         (torch.tensor([0, 100]), r"'cu_seqlens_cpu' expected 4 offsets"),
                         (torch.tensor([0, 50, 40, 100]), r"'cu_seqlens_cpu' expected non-decreasing offsets"),
                         (cu.float(), r"'cu_seqlens_cpu' expected a 1-D int32/int64 CPU tensor")]:
        with pytest.raises(ValueError, match=pattern):
            chunk_gdn2(*x, cu_seqlens=cu, cu_seqlens_cpu=bad)
    with pytest.raises(ValueError, match=r"'cu_seqlens_cpu' expected None when cu_seqlens is None"):
        chunk_gdn2(*inputs(seed=21), cu_seqlens_cpu=cu)


@pytest.mark.parametrize("dtype,v_first,packed", [(F64, False, False), (torch.float32, True, False),
                                                  (torch.bfloat16, False, True)])
def test_chunk_intermediate_states(dtype, v_first, packed):
    cu = torch.tensor([0, 70, 70, 135]) if packed else None
    x = inputs(Bn=1 if packed else B, Tn=135 if packed else 130, dtype=dtype, seed=22)
    sdt = F64 if dtype == F64 else torch.float32
    N = 3 if packed else B
    h0 = rand(N, H, K, V, seed=23, dtype=sdt)
    with torch.inference_mode():
        o, ht, h = chunk_gdn2(*x, initial_state=h0.transpose(-1, -2).contiguous() if v_first else h0,
                              output_final_state=True, cu_seqlens=cu, return_intermediate_states=True,
                              state_v_first=v_first)
    assert h.dtype == dtype and h.shape == ((1, 2 + 0 + 2) if packed else (B, 3)) + ((H, V, K) if v_first else
                                                                                    (H, K, V))
    h = h.transpose(-1, -2) if v_first else h
    want = []
    for n in range(N):
        start, end = (int(cu[n]), int(cu[n + 1])) if packed else (0, 130)
        for c in range(start, end, 64):
            sl = [t[:, start:c] if packed else t[n:n + 1, :c] for t in x]
            want.append(truth(*sl, h0=h0[n:n + 1], norm=False)[1][0])
    want = torch.stack(want)
    assert_close("h", h.reshape(want.shape).double(), want, dtype)
    o_ref, ht_ref = truth(*x, h0=h0, cu=cu, norm=False)
    assert_close("o", o, o_ref, dtype)
    assert_close("ht", ht.transpose(-1, -2) if v_first else ht, ht_ref, dtype)


@pytest.mark.parametrize("kw,error,pattern", [
    (dict(chunk_size=16), ValueError, r"`chunk_size` must be 64 for GDN-2"),
    (dict(chunk_size=32), ValueError, r"`chunk_size` must be 64 for GDN-2"),
    (dict(cp_context=object()), ValueError, r"'cp_context' expected None \(context parallelism"),
    (dict(head_first=False), TypeError, r"unexpected keyword arguments \['head_first'\]"),
    (dict(use_gate_in_kernel=True, safe_gate=True, A_log=torch.zeros(H)), ValueError,
     r"'lower_bound' expected a value in \[-5, 0\) with safe_gate=True"),
    (dict(use_gate_in_kernel=True, safe_gate=True, lower_bound=-6.0, A_log=torch.zeros(H)), ValueError,
     r"'lower_bound' expected a value in the safe range \[-5, 0\)"),
    (dict(lower_bound=1.0), ValueError, r"'lower_bound' expected a finite negative number"),
    (dict(use_gate_in_kernel=True), ValueError, r"'A_log' expected a tensor \[2\] when use_gate_in_kernel=True"),
    (dict(return_intermediate_states=True), ValueError,
     r"'return_intermediate_states' expected True only inside torch.inference_mode\(\)"),
    (dict(initial_state=torch.zeros(B, H, K, V, dtype=torch.float32)), ValueError,
     r"'initial_state' expected dtype torch.float64"),
])
def test_chunk_bad_arguments(kw, error, pattern):
    with pytest.raises(error, match=pattern):
        chunk_gdn2(*inputs(seed=24), **kw)


def test_chunk_disable_recompute():
    x = inputs(seed=25)
    assert torch.equal(chunk_gdn2(*x, disable_recompute=True)[0], chunk_gdn2(*x)[0])
    with torch.inference_mode(), pytest.raises(ValueError, match=r"'disable_recompute' expected False"):
        chunk_gdn2(*x, disable_recompute=True, return_intermediate_states=True)


# ----------------------------------------------------------------------------------------------------------------
# fused_recurrent_gdn2 and fused_recurrent_gdn2_fwd
# ----------------------------------------------------------------------------------------------------------------
def test_recurrent_positional_order_and_defaults():
    x = inputs(Tn=5, seed=30, raw_gate=True)
    A_log, dt_bias = rand(H, seed=31), rand(H * K, seed=32)
    h0 = rand(B, H, K, V, seed=33)
    # q, k, v, g, b, w, A_log, dt_bias, scale, initial_state, output_final_state, l2 norm, gate in kernel
    o, ht = fused_recurrent_gdn2(*x, A_log, dt_bias, 0.5, h0, True, True, True)
    o_ref, ht_ref = truth(*x[:3], softplus_gate(x[3], A_log, dt_bias), *x[4:], 0.5, h0)
    assert_close("o", o, o_ref, F64)
    assert_close("ht", ht, ht_ref, F64)
    o2, none = fused_recurrent_gdn2(*x)
    assert none is None
    assert_close("o", o2, truth(*x, norm=False)[0], F64)


@pytest.mark.parametrize("with_A_log", [True, False])
def test_recurrent_bounded_gate_and_grouped_values(with_A_log):
    x = inputs(Tn=4, HV=2 * H, seed=34, raw_gate=True)
    A_log = rand(2 * H, seed=35) if with_A_log else None
    dt_bias = rand(2 * H * K, seed=36)
    o, ht = fused_recurrent_gdn2(*x, A_log=A_log, dt_bias=dt_bias, use_gate_in_kernel=True, lower_bound=-5.0,
                                 use_qk_l2norm_in_kernel=True, output_final_state=True)
    o_ref, ht_ref = truth(*x[:3], bounded_gate(x[3], A_log, dt_bias, -5.0), *x[4:])
    assert_close("o", o, o_ref, F64)
    assert_close("ht", ht, ht_ref, F64)


def test_recurrent_varlen_v_first_and_no_gradient():
    cu = torch.tensor([0, 3, 3, 7])
    x = inputs(Bn=1, Tn=7, seed=37)
    h0 = rand(3, H, K, V, seed=38)
    tracked = leaves(*x)
    o, ht = fused_recurrent_gdn2(*tracked, initial_state=h0.transpose(-1, -2).contiguous(), output_final_state=True,
                                 state_v_first=True, cu_seqlens=cu)
    assert not o.requires_grad and not ht.requires_grad  # forward only, as FLA's
    o_ref, ht_ref = truth(*x, h0=h0, cu=cu, norm=False)
    assert_close("o", o, o_ref, F64)
    assert_close("ht", ht.transpose(-1, -2), ht_ref, F64)


def test_recurrent_serving_keywords_and_the_fwd_entry():
    x = inputs(Bn=3, Tn=1, seed=39)
    pool = rand(6, H, K, V, seed=40)
    before = pool.clone()
    idx = torch.tensor([5, 0, 2])
    out = torch.empty_like(x[2])
    o, ret = fused_recurrent_gdn2(*x, initial_state=pool, ssm_state_indices=idx, inplace_final_state=True,
                                  out=out)
    assert ret is pool and o is out
    o_ref, s_ref = truth(*x, h0=before[idx], norm=False)
    assert_close("o", o, o_ref, F64)
    assert_close("slots", pool[idx], s_ref, F64)
    assert torch.equal(pool[[1, 3, 4]], before[[1, 3, 4]])
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['ssm_state_indice'\]"):
        fused_recurrent_gdn2(*x, ssm_state_indice=idx)
    # the fwd entry: initial_state before scale; inplace without indices overwrites the initial state row by row
    h0 = rand(3, H, K, V, seed=41)
    h0_before = h0.clone()
    o2, ret2 = fused_recurrent_gdn2_fwd(*x, None, None, h0, 0.5, False, True)
    o2_ref, s2_ref = truth(*x, 0.5, h0_before, norm=False)
    assert ret2 is h0
    assert_close("o", o2, o2_ref, F64)
    assert_close("h0 in place", h0, s2_ref, F64)
    # indices without inplace: the pool is only read, the new states come back
    pool2 = before.clone()
    _, s3 = fused_recurrent_gdn2_fwd(*x, initial_state=pool2, ssm_state_indices=idx, output_final_state=True)
    assert torch.equal(pool2, before)
    assert_close("new states", s3, s_ref, F64)
    with pytest.raises(ValueError, match=r"'initial_state' expected a state \(pool\) when inplace_final_state"):
        fused_recurrent_gdn2_fwd(*x, inplace_final_state=True)
    with pytest.raises(ValueError, match=r"'initial_state' expected 3 rows"):
        fused_recurrent_gdn2_fwd(*x, initial_state=pool, inplace_final_state=True)
    with pytest.raises(ValueError, match=r"'A_log' expected a tensor \[2\] when use_gate_in_kernel=True"):
        fused_recurrent_gdn2(*x, use_gate_in_kernel=True)


@pytest.mark.parametrize("v_first", [False, True])
def test_speculative_decoding(v_first):
    """Draft tokens of varying length per sequence: each starts from the state after its accepted prefix and every
    draft token's state lands in its slot, so the next step can resume from any accepted count."""
    cu = torch.tensor([0, 3, 5, 9])
    x = inputs(Bn=1, Tn=9, seed=42)
    pool = rand(16, H, K, V, seed=43)
    table = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]])
    accepted = torch.tensor([2, 1, 4])
    h0 = pool[[1, 4, 11]].clone()
    before = pool.clone()
    stored = pool.transpose(-1, -2).contiguous() if v_first else pool
    o, ret = fused_recurrent_gdn2_fwd(*x, initial_state=stored, inplace_final_state=True, cu_seqlens=cu,
                                      ssm_state_indices=table, num_accepted_tokens=accepted, state_v_first=v_first)
    assert ret is stored
    after = stored.transpose(-1, -2) if v_first else stored
    for n, (s, e) in enumerate([(0, 3), (3, 5), (5, 9)]):
        for j in range(e - s):
            o_ref, s_ref = truth(*(t[:, s:s + j + 1] for t in x), h0=h0[n:n + 1], norm=False)
            assert_close(f"seq {n} token {j}", after[table[n, j]], s_ref[0], F64)
        assert_close(f"seq {n} o", o[:, s:e], o_ref, F64)
    assert torch.equal(after[[7]], before[[7]])  # the second sequence's fourth slot: no fourth token
    # not in place: every token's state in token order
    _, every = fused_recurrent_gdn2_fwd(*x, initial_state=before.clone(), output_final_state=True, cu_seqlens=cu,
                                        ssm_state_indices=table, num_accepted_tokens=accepted)
    assert every.shape == (9, H, K, V)
    assert_close("every", every, torch.stack([after[table[n, j]] for n, L in enumerate([3, 2, 4])
                                              for j in range(L)]), F64)


def test_chunk_and_recurrent_agree_in_fp32():
    x = inputs(Tn=67, dtype=torch.float32, seed=44)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        o_c, ht_c = chunk_gdn2(*x, use_qk_l2norm_in_kernel=True, output_final_state=True)
        o_r, ht_r = fused_recurrent_gdn2(*x, use_qk_l2norm_in_kernel=True, output_final_state=True)
    o_ref, ht_ref = truth(*x)
    for name, a in [("chunk o", o_c), ("recurrent o", o_r)]:
        assert_close(name, a, o_ref, torch.float32)
    for name, a in [("chunk ht", ht_c), ("recurrent ht", ht_r)]:
        assert_close(name, a, ht_ref, torch.float32)
