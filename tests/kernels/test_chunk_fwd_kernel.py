"""The Triton chunked forward (inference and prefill) against the fp64 token loop: under the interpreter on tiny
shapes (CPU, in CI) and on the GPU at the benchmark shapes (marked ``gpu``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gdn2ts.kernels.chunk_fwd import chunk_fwd
from gdn2ts.kernels.tiling import FwdTiling
from gdn2ts.ops import chunk_gdn2, recurrent_reference

from inputs import make_inputs
from kernel_cases import ARGS, DEVICE, on
from tolerances import assert_close, errors


def truth(x, h0):
    o, s = recurrent_reference(*(x[n].double().cpu() for n in ARGS), initial_state=None if h0 is None else
                               h0.double().cpu(), output_final_state=True)
    return o, s


@pytest.mark.parametrize("T", [1, 63, 65, 130])
@pytest.mark.parametrize("gates", ["normal", "decay_near_0", "binary", "strong_mixed"])
def test_matches_reference(T, gates):
    """Every output element written (NaN-poisoned buffer), fp32 agreement with the token loop."""
    x = on(make_inputs(B=2, T=T, H=1, K=16, V=16, dtype=torch.float32, gates=gates, seed=T))
    out = torch.full_like(x["v"], float("nan"))
    o, s = chunk_fwd(*(x[n] for n in ARGS), 16**-0.5, x["h0"], True, out=out)
    o_ref, s_ref = truth(x, x["h0"])
    assert_close("o", o.cpu(), o_ref, torch.float32)
    assert_close("state", s.cpu(), s_ref, torch.float32)


@pytest.mark.parametrize("gates", ["normal", "strong_mixed", "decay_near_0"])
@pytest.mark.parametrize("decayed_qk", [False, True])
def test_tiling_options_match_reference(gates, decayed_qk):
    """The inverse's row-from-memory substitution and the launch overrides give the token loop's outputs."""
    x = on(make_inputs(B=1, T=130, H=1, K=16, V=16, dtype=torch.float32, gates=gates, seed=5))
    out = torch.full_like(x["v"], float("nan"))
    tiling = FwdTiling(inverse_rows_from_memory=True, inverse_warps=2, gram_warps=2, decayed_qk=decayed_qk, wy_warps=2)
    o, s = chunk_fwd(*(x[n] for n in ARGS), 16**-0.5, x["h0"], True, out=out, tiling=tiling)
    o_ref, s_ref = truth(x, x["h0"])
    assert_close("o", o.cpu(), o_ref, torch.float32)
    assert_close("state", s.cpu(), s_ref, torch.float32)


@pytest.mark.parametrize("T", [64, 150])
def test_gram_launch_keeps_the_in_chunk_cumulative_decay(T):
    """The Gram launch forms G from g itself; what it keeps for the backward is the in-chunk cumulative sum, a
    partial last chunk and grouped gate heads included."""
    x = on(make_inputs(B=2, T=T, H=1, HV=2, g_heads=2, K=16, V=16, dtype=torch.float32, gates="strong_mixed",
                       seed=4))
    saved = chunk_fwd(*(x[n] for n in ARGS), 16**-0.5, x["h0"], True, save=True)[2]
    g = x["g"].double().cpu()
    pad = (-T) % 64
    want = F.pad(g, (0, 0, 0, 0, 0, pad)).view(2, -1, 64, 2, 16).cumsum(2).view(2, T + pad, 2, 16)[:, :T]
    torch.testing.assert_close(saved["G"].double().cpu(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("gates", ["normal", "strong_mixed", "binary"])
@pytest.mark.parametrize("fused_wy", [False, True])
def test_low_precision_state_pass_matches_reference(gates, fused_wy):
    """``lowp``: the sequential pass's products on 16-bit key-side operands (state and corrections rounded for the
    products only) stay within the 16-bit table of the token loop, across a few chunks and with an initial state.
    fp16 here: the Triton interpreter's ``tl.dot`` on bf16 operands returns garbage (a 16 x 16 product of bf16
    loads is off by 1e10), so the bf16 form of this same code path is tested on the GPU
    (``test_gpu_benchmark_shapes``)."""
    key_dtype = torch.float16
    x = on(make_inputs(B=2, T=200, H=1, K=16, V=16, dtype=torch.float32, gates=gates, seed=11))
    out = torch.full_like(x["v"], float("nan"))
    tiling = FwdTiling(decayed_qk=True, key_dtype=key_dtype, lowp=True, u_dtype=key_dtype, fused_wy=fused_wy)
    o, s = chunk_fwd(*(x[n] for n in ARGS), 16**-0.5, x["h0"], True, out=out, tiling=tiling)
    o_ref, s_ref = truth(x, x["h0"])
    assert_close("o", o.cpu(), o_ref, torch.bfloat16)
    assert_close("state", s.cpu(), s_ref, torch.bfloat16)


@pytest.mark.parametrize("gates", ["normal", "strong_mixed", "decay_near_0"])
@pytest.mark.parametrize("lowp,linv_dtype,akk_dtype", [(False, None, None), (True, None, None),
                                                        (True, torch.float32, None), (True, None, torch.float16)])
def test_corrections_formed_in_the_state_pass_match_reference(gates, lowp, linv_dtype, akk_dtype):
    """``fused_wy``: the state pass forms ``R = L^-1 (w v - E S)`` itself (no WY launch), in fp32 and with the
    16-bit products of ``lowp`` (fp16 under the interpreter, as above), grouped value heads, a partial last chunk
    and an initial state included."""
    x = on(make_inputs(B=2, T=150, H=1, HV=2, K=16, V=16, dtype=torch.float32, gates=gates, seed=13))
    out = torch.full_like(x["v"], float("nan"))
    opts = dict(decayed_qk=True, lowp=True, key_dtype=torch.float16, u_dtype=torch.float16) if lowp else {}
    tiling = FwdTiling(fused_wy=True, linv_dtype=linv_dtype, akk_dtype=akk_dtype, **opts)
    o, s = chunk_fwd(*(x[n] for n in ARGS), 16**-0.5, x["h0"], True, out=out, tiling=tiling)
    o_ref, s_ref = truth(x, x["h0"])
    assert_close("o", o.cpu(), o_ref, torch.bfloat16 if lowp else torch.float32)
    assert_close("state", s.cpu(), s_ref, torch.bfloat16 if lowp else torch.float32)


def test_corrections_in_the_state_pass_are_inference_only():
    x = on(make_inputs(B=1, T=8, H=1, K=16, V=16, dtype=torch.float32, seed=1))
    with pytest.raises(ValueError, match="fused_wy=True is an inference form"):
        chunk_fwd(*(x[n] for n in ARGS), 16**-0.5, None, False, save=True, tiling=FwdTiling(fused_wy=True))
    with pytest.raises(ValueError, match="linv_dtype torch.bfloat16 is not float32"):  # the backward reads L^-1
        chunk_fwd(*(x[n] for n in ARGS), 16**-0.5, None, False, save=True,
                  tiling=FwdTiling(linv_dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="linv_dtype torch.int8"):
        chunk_fwd(*(x[n] for n in ARGS), 16**-0.5, None, False, tiling=FwdTiling(linv_dtype=torch.int8))
    with pytest.raises(ValueError, match="fp32 L\\^-1 in the 16-bit state pass needs block_v >= 64, got 32"):
        wide = on(make_inputs(B=1, T=8, H=1, K=16, V=64, dtype=torch.float16, seed=1))
        chunk_fwd(*(wide[n] for n in ARGS), 16**-0.5, None, False,
                  tiling=FwdTiling(fused_wy=True, linv_dtype=torch.float32, block_v=32))
    with pytest.raises(ValueError, match="akk_dtype torch.bfloat16 is not float32 or float16"):
        chunk_fwd(*(x[n] for n in ARGS), 16**-0.5, None, False, tiling=FwdTiling(akk_dtype=torch.bfloat16))


def test_low_precision_state_pass_needs_decayed_16_bit_keys():
    x = on(make_inputs(B=1, T=8, H=1, K=16, V=16, dtype=torch.float32, seed=1))
    with pytest.raises(ValueError, match="lowp=True needs decayed_qk"):
        chunk_fwd(*(x[n] for n in ARGS), 16**-0.5, None, False,
                  tiling=FwdTiling(lowp=True, decayed_qk=False, key_dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="key_dtype bfloat16 or float16"):  # fp32 inputs: key_dtype fp32
        chunk_fwd(*(x[n] for n in ARGS), 16**-0.5, None, False, tiling=FwdTiling(lowp=True, decayed_qk=True))


@pytest.mark.parametrize("HV,g_heads", [(2, 1), (2, 2)])
def test_grouped_value_heads_without_initial_state(HV, g_heads):
    x = on(make_inputs(B=1, T=70, H=1, HV=HV, g_heads=g_heads, K=16, V=16, dtype=torch.float32, seed=3,
                       initial_state=False))
    with torch.no_grad():
        o, s = chunk_gdn2(*(x[n] for n in ARGS), output_final_state=True, backend="triton")
    o_ref, s_ref = truth(x, None)
    assert_close("o", o.cpu(), o_ref, torch.float32)
    assert_close("state", s.cpu(), s_ref, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["default", "lowp_bf16", "lowp_fp16", "wy_launch", "linv_fp32"])
@pytest.mark.parametrize("B,T", [(2, 2048), (1, 1000)])
def test_gpu_benchmark_shapes(B, T, variant):
    gen = torch.Generator(device="cuda").manual_seed(T)
    H, K, V = 16, 128, 128

    def r(*s):
        return torch.randn(*s, generator=gen, device="cuda")

    q, k = F.normalize(r(B, T, H, K), dim=-1).bfloat16(), F.normalize(r(B, T, H, K), dim=-1).bfloat16()
    v, g = r(B, T, H, V).bfloat16(), F.logsigmoid(r(B, T, H, K) + 3.0)
    b, w = torch.sigmoid(r(B, T, H, K)).bfloat16(), torch.sigmoid(r(B, T, H, V)).bfloat16()
    h0 = r(B, H, K, V)
    out = torch.full_like(v, float("nan"))
    # the default is lowp (bf16) with the corrections formed in the state pass and a bf16 L^-1; "wy_launch" forms
    # them in a launch of their own, "linv_fp32" keeps L^-1 in fp32 (64-wide value blocks: narrower ones exceed
    # the shared memory)
    opts = {"default": {}, "wy_launch": dict(fused_wy=False),
            "linv_fp32": dict(linv_dtype=torch.float32, block_v=64, num_stages=1)}.get(variant) or dict(
        decayed_qk=True, lowp=True, key_dtype=torch.bfloat16 if variant == "lowp_bf16" else torch.float16,
        u_dtype=torch.bfloat16 if variant == "lowp_bf16" else torch.float16)
    o, s = chunk_fwd(q, k, v, g, b, w, K**-0.5, h0, True, out=out, tiling=FwdTiling(**opts))
    o_ref, s_ref = recurrent_reference(*(t.double() for t in (q, k, v, g, b, w)), initial_state=h0.double(),
                                       output_final_state=True)
    assert_close("o", o.float(), o_ref, torch.bfloat16)
    assert_close("state", s, s_ref, torch.bfloat16)
    try:
        from fla.ops.gdn2 import chunk_gdn2 as fla_chunk
    except ImportError:
        return
    o_fla, s_fla = fla_chunk(q, k, v, g, b, w, initial_state=h0, output_final_state=True)
    assert_close("o vs FLA", o.float(), o_fla.float().double(), torch.bfloat16)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_causality_future_inputs_never_change_past_outputs(backend):
    """Changing every input (and gate) after step t leaves outputs up to t the same. Not bit for bit: within a chunk
    the decay factors are taken about a mid-point that later gates move, which changes their rounding (measured
    differences ~1e-7 relative, against O(1) for a real leak)."""
    x = on(make_inputs(B=1, T=130, H=1, K=16, V=16, dtype=torch.float32, seed=8))
    t = 77
    y = {n: v.clone() for n, v in x.items()}
    for n in ARGS:
        noise = torch.randn_like(y[n][:, t + 1:])
        y[n][:, t + 1:] = noise if n in ("q", "k", "v") else (-noise.abs() if n == "g" else noise.sigmoid())
    with torch.no_grad():
        o1, _ = chunk_gdn2(*(x[n] for n in ARGS), initial_state=x["h0"], backend=backend)
        o2, _ = chunk_gdn2(*(y[n] for n in ARGS), initial_state=x["h0"], backend=backend)
    rms, _ = errors(o2[:, : t + 1].cpu(), o1[:, : t + 1].cpu())
    assert rms < 1e-5, f"past outputs moved by {rms:.2e} (relative RMS)"
    later, _ = errors(o2[:, t + 1:].cpu(), o1[:, t + 1:].cpu())
    assert later > 1e-2


def test_more_sequence_head_pairs_than_one_grid_axis_takes_are_refused_by_name():
    """The chunked kernels' second grid axis holds at most 65,535 (sequence, value head) pairs: an explicit
    backend='triton' call beyond that is refused with a clear error (backend='auto' takes the PyTorch path)."""
    B, H = 65_536, 1
    q = torch.zeros(B, 1, H, 16, device=DEVICE)
    v = torch.zeros(B, 1, H, 16, device=DEVICE)
    with pytest.raises(ValueError, match="65,535"):
        chunk_gdn2(q, q, v, q, q, v, backend="triton")
