"""The Triton chunked backward against autograd through the fp64 token loop: every gradient (q, k, v, g, b, w and
the initial state), under the interpreter on tiny shapes (CPU, in CI) and on the GPU at the benchmark shapes
(marked ``gpu``). Every buffer the backward allocates is poisoned with NaN, so an unwritten element fails."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gdn2ts.ops import chunk_gdn2, chunk_reference, recurrent_reference

from inputs import make_inputs
from kernel_cases import ARGS, DEVICE, GATES
from tolerances import assert_close


def grads_of(fn, x, h0, do, dht, **kw):
    """Gradients of ``<o, do> + <final, dht>`` with respect to q, k, v, g, b, w and h0 (when given)."""
    leaves = {n: x[n].detach().clone().requires_grad_() for n in ARGS}
    if h0 is not None:
        leaves["h0"] = h0.detach().clone().requires_grad_()
    o, s = fn(*(leaves[n] for n in ARGS), initial_state=leaves.get("h0"), output_final_state=dht is not None, **kw)
    loss = (o.double() * do.double()).sum()
    if dht is not None:
        loss = loss + (s.double() * dht.double()).sum()
    loss.backward()
    return o, s, {n: t.grad for n, t in leaves.items()}


def check(x, h0, with_final=True, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(x["v"].shape, generator=gen, dtype=torch.float64)
    dht = torch.randn(x["v"].shape[0], x["v"].shape[2], x["q"].shape[3], x["v"].shape[3], generator=gen,
                      dtype=torch.float64) if with_final else None
    on = {n: t.to(DEVICE) for n, t in x.items() if t is not None}
    o, s, got = grads_of(chunk_gdn2, on, None if h0 is None else h0.to(DEVICE), do.to(DEVICE, dtype),
                         None if dht is None else dht.to(DEVICE), backend="triton")
    cpu64 = {n: t.detach().cpu().double() for n, t in on.items()}
    o_ref, s_ref, want = grads_of(recurrent_reference, cpu64, None if h0 is None else h0.double(), do, dht)
    assert_close("o", o.detach().cpu(), o_ref.detach(), dtype)
    if with_final:
        assert_close("final state", s.detach().cpu(), s_ref.detach(), dtype)
    for n, ref in want.items():
        assert_close(f"d{n}", got[n].cpu(), ref, dtype, factor=2.0 if n in GATES else 1.0)


@pytest.mark.parametrize("T,gates", [(1, "normal"), (65, "normal"), (130, "normal"), (130, "decay_near_0"),
                                     (130, "binary"), (130, "strong_mixed"), (100, "zero_decay")])
def test_every_gradient_matches_the_token_loop(T, gates):
    x = make_inputs(B=1, T=T, H=1, K=16, V=16, dtype=torch.float32, gates=gates, seed=T)
    check(x, x["h0"], seed=T)


@pytest.mark.parametrize("HV,g_heads", [(2, 1), (2, 2)])
def test_grouped_value_heads_without_initial_state_or_final_state(HV, g_heads):
    x = make_inputs(B=1, T=70, H=1, HV=HV, g_heads=g_heads, K=16, V=16, dtype=torch.float32, seed=5,
                    initial_state=False)
    check(x, None, with_final=False)


def test_wider_heads_two_key_blocks_and_two_value_blocks():
    # K = 128 splits into two key blocks of 64 in the Gram kernels, V = 128 into value blocks
    x = make_inputs(B=1, T=64, H=1, K=128, V=128, dtype=torch.float32, seed=7)
    check(x, x["h0"])


@pytest.mark.parametrize("packed", [False, True])
def test_broadcast_gates_are_read_as_dense_tensors(packed):
    """Scalar gates expanded over a head's channels (stride 0, as the scalar-decay, scalar-erase and scalar-write
    variants pass them) give the gradients of the same gates made dense, forward and backward."""
    B, T, H, K = 1, 70, 2, 16
    gen = torch.Generator().manual_seed(4)
    q, k = (F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1) for _ in range(2))
    v = torch.randn(B, T, H, K, generator=gen)
    g1 = F.logsigmoid(torch.randn(B, T, H, 1, generator=gen) + 2)
    b1, w1 = (torch.sigmoid(torch.randn(B, T, H, 1, generator=gen)) for _ in range(2))
    do = torch.randn(B, T, H, K, generator=gen)
    cu = torch.tensor([0, 30, 70]).to(DEVICE) if packed else None
    grads = {}
    for form in ("expanded", "dense"):
        leaves = [t.clone().to(DEVICE).requires_grad_() for t in (q, k, v, g1, b1, w1)]
        gates = [t.expand(B, T, H, K) for t in leaves[3:]]
        if form == "dense":
            gates = [t.contiguous() for t in gates]
        o, _ = chunk_gdn2(*leaves[:3], *gates, cu_seqlens=cu, backend="triton")
        (o * do.to(DEVICE)).sum().backward()
        grads[form] = [t.grad.cpu() for t in leaves]
    for name, a, e in zip(("q", "k", "v", "g", "b", "w"), grads["expanded"], grads["dense"], strict=True):
        torch.testing.assert_close(a, e, msg=f"d{name}")


def test_in_op_activations_give_the_same_gradients_as_the_torch_path():
    B, T, H, K = 1, 70, 2, 16
    gen = torch.Generator().manual_seed(3)
    q, k, v, g, b, w = (torch.randn(B, T, H, K, generator=gen) for _ in range(6))
    A_log, dt_bias = torch.randn(H, generator=gen) * 0.3, torch.randn(H * K, generator=gen) * 0.3
    do = torch.randn(B, T, H, K, generator=gen)
    grads = {}
    for backend in ("torch", "triton"):
        leaves = [t.clone().to(DEVICE).requires_grad_() for t in (q, k, v, g, b, w, A_log, dt_bias)]
        o, _ = chunk_gdn2(*leaves[:6], use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=leaves[6],
                          dt_bias=leaves[7], use_bw_sigmoid_in_kernel=True, erase_max=2.0, backend=backend)
        (o * do.to(DEVICE)).sum().backward()
        grads[backend] = [t.grad.cpu() for t in leaves]
    for name, a, e in zip(("q", "k", "v", "g", "b", "w", "A_log", "dt_bias"), grads["triton"], grads["torch"],
                          strict=True):
        assert_close(f"d{name}", a, e.double(), torch.float32, factor=2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("B,T", [(8, 2048), (1, 16384), (2, 1000), (1, 63)])
def test_gpu_benchmark_shapes_bf16(B, T):
    """bf16 inputs at the benchmark width against fp64 (the token loop for short inputs; for long ones the fp64
    chunked PyTorch path, itself checked against the token loop, since the loop's autograd graph would not fit),
    and against FLA when importable."""
    gen = torch.Generator(device="cuda").manual_seed(T)
    H, K, V = 16, 128, 128

    def r(*s):
        return torch.randn(*s, generator=gen, device="cuda")

    x = dict(q=F.normalize(r(B, T, H, K), dim=-1).bfloat16(), k=F.normalize(r(B, T, H, K), dim=-1).bfloat16(),
             v=r(B, T, H, V).bfloat16(), g=F.logsigmoid(r(B, T, H, K) + 3.0), b=torch.sigmoid(r(B, T, H, K)).bfloat16(),
             w=torch.sigmoid(r(B, T, H, V)).bfloat16())
    h0 = r(B, H, K, V)
    do, dht = r(B, T, H, V).bfloat16(), r(B, H, K, V)
    o, s, got = grads_of(chunk_gdn2, x, h0, do, dht, backend="triton")
    x64 = {n: t.double() for n, t in x.items()}
    reference = recurrent_reference if B * T <= 2048 else chunk_reference
    o_ref, s_ref, want = grads_of(reference, x64, h0.double(), do.double(), dht.double())
    assert_close("o", o.detach().float(), o_ref.detach(), torch.bfloat16)
    assert_close("final state", s.detach(), s_ref.detach(), torch.bfloat16)
    for n, ref in want.items():
        assert_close(f"d{n}", got[n].float(), ref, torch.bfloat16, factor=2.0 if n in GATES else 1.0)
    try:
        from fla.ops.gdn2 import chunk_gdn2 as fla_chunk
    except ImportError:
        return
    _, _, fla = grads_of(lambda *a, **kw: fla_chunk(*a, **kw), x, h0, do, dht)
    for n in want:
        assert_close(f"d{n} vs FLA", got[n].float(), fla[n].double(), torch.bfloat16,
                     factor=4.0 if n in GATES else 2.0)


@pytest.mark.parametrize("key_dtype,lowp", [(torch.float32, False), (torch.float16, False), (torch.float16, True)])
@pytest.mark.parametrize("gates", ["normal", "strong_mixed"])
def test_decayed_qk_variant_matches_the_token_loop(gates, key_dtype, lowp):
    """The variant that forms the decayed q and k once in the forward (and reuses them in the backward's
    state pass) gives the same outputs and gradients, up to the dtype's tolerance; with ``Y`` and ``A_qk`` kept
    in fp16 (``key_dtype``), within the 16-bit table (fp16 keeps tf32's 10 mantissa bits); and with the forward's
    sequential pass on 16-bit operands and ``U`` kept in fp16 too (``lowp``), whose intermediates the backward
    then reads."""
    from gdn2ts.kernels.chunk_bwd import chunk_bwd
    from gdn2ts.kernels.chunk_fwd import chunk_fwd
    from gdn2ts.kernels.tiling import FwdTiling

    x = make_inputs(B=1, T=100, H=1, HV=2, K=16, V=16, dtype=torch.float32, gates=gates, seed=11)
    on = {n: t.to(DEVICE) for n, t in x.items()}
    scale = 0.3
    tiling = FwdTiling(decayed_qk=True, key_dtype=key_dtype, lowp=lowp, u_dtype=key_dtype if lowp else torch.float32)
    o, s, saved = chunk_fwd(*(on[n] for n in ARGS), scale, on["h0"], True, save=True, tiling=tiling)
    assert "qg" in saved and "kt" in saved
    assert saved["Y"].dtype == saved["Aqk"].dtype == key_dtype
    gen = torch.Generator().manual_seed(2)
    do, dht = torch.randn(o.shape, generator=gen, dtype=torch.float64), torch.randn(s.shape, generator=gen,
                                                                                    dtype=torch.float64)
    got = chunk_bwd(*(on[n] for n in ARGS), scale, saved, do.float().to(DEVICE), dht.float().to(DEVICE), True)
    o_ref, s_ref, want = grads_of(recurrent_reference, {n: t.double() for n, t in x.items() if t is not None},
                                  x["h0"].double(), do, dht, scale=scale)
    table = torch.float32 if key_dtype == torch.float32 else torch.float16
    assert_close("o", o.cpu(), o_ref.detach(), table)
    assert_close("final state", s.cpu(), s_ref.detach(), table)
    for name, a in zip((*ARGS, "h0"), got, strict=True):
        assert_close(f"d{name}", a.cpu(), want[name], table, factor=2.0 if name in GATES else 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("key_dtype,lowp", [(torch.float32, False), (torch.float16, False), (torch.bfloat16, True)])
def test_gpu_decayed_qk_variant_bf16(key_dtype, lowp):
    """The decayed-q/k variant (fp16 storage for bf16 inputs) on the GPU against fp64, at FLA's tolerances; also
    with ``Y`` and ``A_qk`` kept in fp16, and with the forward's sequential pass on bf16 operands (``lowp``, all
    key-side intermediates and ``U`` in bf16), whose kept intermediates the backward then reads."""
    from gdn2ts.kernels.chunk_bwd import chunk_bwd
    from gdn2ts.kernels.chunk_fwd import chunk_fwd
    from gdn2ts.kernels.tiling import FwdTiling

    gen = torch.Generator(device="cuda").manual_seed(5)
    B, T, H, K, V = 2, 1000, 16, 128, 128

    def r(*s):
        return torch.randn(*s, generator=gen, device="cuda")

    x = dict(q=F.normalize(r(B, T, H, K), dim=-1).bfloat16(), k=F.normalize(r(B, T, H, K), dim=-1).bfloat16(),
             v=r(B, T, H, V).bfloat16(), g=F.logsigmoid(r(B, T, H, K) + 3.0), b=torch.sigmoid(r(B, T, H, K)).bfloat16(),
             w=torch.sigmoid(r(B, T, H, V)).bfloat16())
    h0 = r(B, H, K, V)
    do, dht = r(B, T, H, V).bfloat16(), r(B, H, K, V)
    tiling = FwdTiling(decayed_qk=True, key_dtype=key_dtype, lowp=lowp, u_dtype=key_dtype if lowp else torch.float32,
                       saved_state_dtype=torch.bfloat16 if lowp else torch.float32)
    o, s, saved = chunk_fwd(*(x[n] for n in ARGS), K**-0.5, h0, True, save=True, tiling=tiling)
    got = chunk_bwd(*(x[n] for n in ARGS), K**-0.5, saved, do, dht, True)
    o_ref, s_ref, want = grads_of(chunk_reference, {n: t.double() for n, t in x.items()}, h0.double(), do.double(),
                                  dht.double())
    assert_close("o", o.float(), o_ref.detach(), torch.bfloat16)
    assert_close("final state", s, s_ref.detach(), torch.bfloat16)
    for name, a in zip((*ARGS, "h0"), got, strict=True):
        assert_close(f"d{name}", a.float(), want[name], torch.bfloat16, factor=2.0 if name in GATES else 1.0)
