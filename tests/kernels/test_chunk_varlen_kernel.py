"""Packed sequences (``cu_seqlens``) on the Triton chunked kernels, forward and backward, against the fp64 token
loop run on the same packed batch: under the interpreter on tiny shapes (CPU, in CI) and on the GPU at a
training-like shape (marked ``gpu``). Sequences of length 0, 1, one chunk and across chunks; initial and final
states per sequence; the backward's buffers poisoned with NaN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gdn2ts.ops import chunk_gdn2, chunk_reference, recurrent_reference
from gdn2ts.ops.gdn2.chunk_triton import chunk_layout

from inputs import make_inputs
from kernel_cases import ARGS, DEVICE, GATES
from tolerances import assert_close


def run(fn, x, h0, cu, do, dht, **kw):
    """Outputs, final states and the gradients of ``<o, do> + <final, dht>``."""
    leaves = {n: x[n].detach().clone().requires_grad_() for n in ARGS}
    if h0 is not None:
        leaves["h0"] = h0.detach().clone().requires_grad_()
    o, s = fn(*(leaves[n] for n in ARGS), initial_state=leaves.get("h0"), output_final_state=True, cu_seqlens=cu,
              **kw)
    ((o.double() * do.double()).sum() + (s.double() * dht.double()).sum()).backward()
    return o.detach(), s.detach(), {n: t.grad for n, t in leaves.items()}


def packed_inputs(lens, H=1, HV=2, K=16, V=16, gates="normal", seed=0, initial_state=True):
    total = sum(lens)
    x = make_inputs(B=1, T=total, H=H, HV=HV, K=K, V=V, dtype=torch.float32, gates=gates, seed=seed,
                    initial_state=False)
    gen = torch.Generator().manual_seed(seed + 1)
    N = len(lens)
    h0 = torch.randn(N, HV, K, V, generator=gen) if initial_state else None
    do = torch.randn(1, total, HV, V, generator=gen, dtype=torch.float64)
    dht = torch.randn(N, HV, K, V, generator=gen, dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    return x, h0, cu, do, dht


@pytest.mark.parametrize("lens,gates", [((1, 0, 63, 64, 65, 3), "normal"), ((130, 2, 70), "strong_mixed"),
                                        ((0, 5), "decay_near_0")])
def test_packed_outputs_states_and_gradients_match_the_token_loop(lens, gates):
    x, h0, cu, do, dht = packed_inputs(lens, gates=gates, seed=len(lens))
    on = {n: t.to(DEVICE) for n, t in x.items() if t is not None}
    o, s, got = run(chunk_gdn2, on, h0.to(DEVICE), cu.to(DEVICE), do.to(DEVICE, torch.float32),
                    dht.to(DEVICE, torch.float32), backend="triton")
    x64 = {n: t.double() for n, t in x.items() if t is not None}
    o_ref, s_ref, want = run(recurrent_reference, x64, h0.double(), cu, do, dht)
    assert_close("o", o.cpu(), o_ref, torch.float32)
    assert_close("final states", s.cpu(), s_ref, torch.float32)
    for n, ref in want.items():
        assert_close(f"d{n}", got[n].cpu(), ref, torch.float32, factor=2.0 if n in GATES else 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_packed_without_initial_state_inference_path(dtype):
    """No initial state and no gradient wanted: the inference forward on the packed layout (fp16 inputs take the
    16-bit state pass with the corrections formed in it, as bf16 does on the GPU)."""
    x, _, cu, _, _ = packed_inputs((40, 90), initial_state=False, seed=3)
    on = {n: t.to(DEVICE, dtype if n != "g" else torch.float32) for n, t in x.items() if t is not None}
    with torch.no_grad():
        o, s = chunk_gdn2(*(on[n] for n in ARGS), output_final_state=True, cu_seqlens=cu.to(DEVICE),
                          backend="triton")
    o_ref, s_ref = recurrent_reference(*(on[n].double().cpu() for n in ARGS), output_final_state=True, cu_seqlens=cu)
    assert_close("o", o.float().cpu(), o_ref, dtype)
    assert_close("final states", s.cpu(), s_ref, dtype)


def test_chunk_layout_puts_each_sequence_on_its_own_chunks():
    cu = torch.tensor([0, 64, 64, 65, 200])
    dest, lo, hi, padded = chunk_layout(cu, 200)
    assert lo.tolist() == [0, 1, 1, 2] and hi.tolist() == [1, 1, 2, 5]
    assert dest[:64].tolist() == list(range(64)) and dest[64].item() == 64 and dest[65].item() == 128
    assert dest.unique().numel() == 200 and int(dest.max()) < padded == 200 + 63 * 4


def packed_bf16(lens, seed, device="cuda"):
    """A packed batch as the layer makes it (16 heads of 128: unit-norm q/k, fp32 log-decay, gates in (0, 1), bf16),
    its ``cu_seqlens``, and the seeded ``randn`` that made it (for states and cotangents)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    total, H, K, V = sum(lens), 16, 128, 128

    def r(*s):
        return torch.randn(*s, generator=gen, device=device)

    x = dict(q=F.normalize(r(1, total, H, K), dim=-1).bfloat16(), k=F.normalize(r(1, total, H, K), dim=-1).bfloat16(),
             v=r(1, total, H, V).bfloat16(), g=F.logsigmoid(r(1, total, H, K) + 3.0),
             b=torch.sigmoid(r(1, total, H, K)).bfloat16(), w=torch.sigmoid(r(1, total, H, V)).bfloat16())
    return x, torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=device), r


@pytest.mark.gpu
def test_gpu_packed_documents_bf16():
    """A training-like packed batch (16 heads of 128, documents of 1 to 3,000 tokens, bf16) against the fp64
    chunked path on the same packed batch, and against FLA's varlen ``chunk_gdn2`` when importable."""
    lens = [1, 700, 64, 3000, 0, 129, 2200, 5]
    x, cu, r = packed_bf16(lens, seed=7)
    N, total, H, V = len(lens), sum(lens), 16, 128
    h0, do, dht = r(N, H, 128, V), r(1, total, H, V).bfloat16(), r(N, H, 128, V)
    o, s, got = run(chunk_gdn2, x, h0, cu, do, dht, backend="triton")
    o_ref, s_ref, want = run(chunk_reference, {n: t.double() for n, t in x.items()}, h0.double(), cu, do.double(),
                             dht.double())
    assert_close("o", o.float(), o_ref, torch.bfloat16)
    assert_close("final states", s, s_ref, torch.bfloat16)
    for n, ref in want.items():
        assert_close(f"d{n}", got[n].float(), ref, torch.bfloat16, factor=2.0 if n in GATES else 1.0)
    try:
        from fla.ops.gdn2 import chunk_gdn2 as fla_chunk
    except ImportError:
        return
    o_f, s_f, fla = run(lambda *a, **kw: fla_chunk(*a, **kw), x, h0, cu, do, dht)
    assert_close("o vs FLA", o.float(), o_f.double(), torch.bfloat16, factor=2.0)
    for n in want:
        assert_close(f"d{n} vs FLA", got[n].float(), fla[n].double(), torch.bfloat16, factor=4.0 if n in GATES else 2.0)


@pytest.mark.gpu
def test_gpu_packed_documents_inference_bf16():
    """The inference forward on a packed bf16 batch (the 16-bit state pass that forms the corrections itself, per
    sequence) against the fp64 token loop, with and without initial states."""
    lens = [1, 700, 64, 0, 1500, 129, 5]
    x, cu, r = packed_bf16(lens, seed=8)
    for h0 in (r(len(lens), 16, 128, 128), None):
        with torch.no_grad():
            o, s = chunk_gdn2(*(x[n] for n in ARGS), initial_state=h0, output_final_state=True, cu_seqlens=cu,
                              backend="triton")
        o_ref, s_ref = recurrent_reference(*(x[n].double() for n in ARGS), initial_state=None if h0 is None else
                                           h0.double(), output_final_state=True, cu_seqlens=cu)
        assert_close("o", o.float(), o_ref, torch.bfloat16)
        assert_close("final states", s, s_ref, torch.bfloat16)
