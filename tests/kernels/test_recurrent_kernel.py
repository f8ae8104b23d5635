"""The Triton step kernel against the fp64 token loop: under the interpreter on tiny shapes (CPU, in CI) and on
the GPU at the benchmark shapes (marked ``gpu``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gdn2ts.kernels.recurrent import recurrent_fwd
from gdn2ts.ops import chunk_gdn2, recurrent_gdn2, recurrent_reference
from gdn2ts.ops.gdn2.options import GDN2Options, activate

from kernel_cases import DEVICE
from tolerances import assert_close


def inputs(N, T, H, K, V, HV=None, g_heads=None, dtype=torch.float32, raw=False, seed=0, device=DEVICE):
    """Fresh random inputs; ``raw`` gives pre-activations for the in-kernel options."""
    HV, gh = HV or H, g_heads or H
    gen = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    q, k, v = r(N, T, H, K), r(N, T, H, K), r(N, T, HV, V)
    if raw:
        g, b, w = r(N, T, gh, K), r(N, T, gh, K), r(N, T, HV, V)
    else:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        g = F.logsigmoid(r(N, T, gh, K) + 2)
        b, w = torch.sigmoid(r(N, T, gh, K)), torch.sigmoid(r(N, T, HV, V))
    return [x.to(dtype).to(device) for x in (q, k, v, g, b, w)]


def poison(t):
    return t.fill_(float("nan"))


def truth(args, h0, cu=None, **opts):
    x64 = [a.double().cpu() for a in args]
    o = GDN2Options(scale=args[0].shape[-1] ** -0.5, use_qk_l2norm=opts.get("use_qk_l2norm_in_kernel", False),
                    use_gate_in_kernel=opts.get("use_gate_in_kernel", False),
                    use_bw_sigmoid=opts.get("use_bw_sigmoid_in_kernel", False),
                    erase_max=opts.get("erase_max", 1.0))
    A_log, dt_bias = opts.get("A_log"), opts.get("dt_bias")
    q, k, g, b, w = activate(x64[0], x64[1], x64[3], x64[4], x64[5], o,
                              None if A_log is None else A_log.double().cpu(),
                              None if dt_bias is None else dt_bias.double().cpu())
    return recurrent_reference(q, k, x64[2], g, b, w, o.scale, None if h0 is None else h0.double().cpu(), True,
                               None if cu is None else cu.cpu())


CASES = [
    dict(N=3, T=1, H=2, K=16, V=8),
    dict(N=2, T=3, H=1, K=8, V=16, HV=2),
    dict(N=2, T=2, H=2, K=12, V=8, HV=4, g_heads=4),
]


@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case):
    """Every output element is written (buffers poisoned with NaN) and equals the fp64 token loop."""
    args = inputs(**case, seed=1)
    HV = case.get("HV", case["H"])
    h0 = torch.randn(case["N"], HV, case["K"], case["V"], device=DEVICE)
    o, s = recurrent_fwd(*args, case["K"] ** -0.5, h0, None, None, out=poison(torch.empty_like(args[2])),
                         out_state=poison(torch.empty_like(h0)))
    o_ref, s_ref = truth(args, h0)
    assert_close("o", o.cpu(), o_ref, torch.float32)
    assert_close("state", s.cpu(), s_ref, torch.float32)


def test_in_kernel_activations():
    N, T, H, K, V = 2, 3, 2, 8, 8
    args = inputs(N, T, H, K, V, raw=True, seed=2)
    opts = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=torch.rand(H, device=DEVICE),
                dt_bias=torch.randn(H * K, device=DEVICE), use_bw_sigmoid_in_kernel=True, erase_max=2.0)
    o, s = recurrent_gdn2(*args, backend="triton", **opts)
    o_ref, s_ref = truth(args, None, **opts)
    assert_close("o", o.cpu(), o_ref, torch.float32)
    assert_close("state", s.cpu(), s_ref, torch.float32)


def test_varlen_and_pool_slots_in_place():
    H, K, V = 2, 8, 8
    cu = torch.tensor([0, 2, 2, 5], device=DEVICE)
    args = inputs(1, 5, H, K, V, seed=3)
    pool = torch.randn(6, H, K, V, device=DEVICE)
    before = pool.clone()
    slots = torch.tensor([4, -1, 0], device=DEVICE)
    o, out = recurrent_gdn2(*args, initial_state=pool, cu_seqlens=cu, state_indices=slots, backend="triton")
    assert out is pool
    h0 = torch.stack([before[4], torch.zeros_like(before[0]), before[0]])
    o_ref, s_ref = truth(args, h0, cu)
    assert_close("o", o.cpu(), o_ref, torch.float32)
    assert_close("slot 4", pool[4].cpu(), s_ref[0], torch.float32)
    assert_close("slot 0", pool[0].cpu(), s_ref[2], torch.float32)
    for slot in (1, 2, 3, 5):
        assert torch.equal(pool[slot], before[slot])


def test_bf16_state_pool():
    N, T, H, K, V = 2, 1, 2, 16, 16
    args = inputs(N, T, H, K, V, seed=4)
    pool = torch.randn(3, H, K, V, device=DEVICE).bfloat16()
    h0 = pool.float()
    slots = torch.tensor([2, 0], device=DEVICE)
    o, _ = recurrent_gdn2(*args, initial_state=pool, state_indices=slots, backend="triton")
    o_ref, s_ref = truth(args, h0[slots.cpu()])
    assert_close("o", o.cpu(), o_ref, torch.float32)
    assert_close("slots", pool[slots].float().cpu(), s_ref, torch.bfloat16)


def test_saturated_gates_stay_finite():
    N, T, H, K, V = 2, 4, 1, 8, 8
    args = inputs(N, T, H, K, V, seed=5)
    args[3] = torch.where(torch.rand_like(args[3]) > 0.5, -1e4, 0.0)  # g: no decay or total decay
    args[4] = (torch.rand_like(args[4]) > 0.5).float()
    args[5] = (torch.rand_like(args[5]) > 0.5).float()
    o, s = recurrent_gdn2(*args, initial_state=torch.randn(N, H, K, V, device=DEVICE), backend="triton")
    assert torch.isfinite(o).all() and torch.isfinite(s).all()


def test_triton_backend_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args = inputs(1, 1, 1, 4, 4, device="cpu")
    with pytest.raises(ValueError, match="'backend' expected 'triton' only for CUDA tensors"):
        recurrent_gdn2(*args, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("N", [1, 64, 1024, 4096])
def test_gpu_benchmark_shapes(N):
    H, K, V = 16, 128, 128
    args = inputs(N, 1, H, K, V, dtype=torch.bfloat16, seed=N)
    pool = torch.randn(N + 3, H, K, V, device="cuda")
    slots = torch.randperm(N + 3, device="cuda")[:N]
    h0 = pool[slots].clone()
    o, _ = recurrent_gdn2(*args, initial_state=pool, state_indices=slots, backend="triton")
    o_ref, s_ref = truth(args, h0)
    assert_close("o", o.float().cpu(), o_ref, torch.bfloat16)
    assert_close("state", pool[slots].cpu(), s_ref, torch.bfloat16)


def test_fp64_inputs_stay_on_the_pytorch_path():
    args = inputs(2, 1, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="'triton' only for fp16/bf16/fp32 inputs"):
        recurrent_gdn2(*args, backend="triton")
    with torch.no_grad(), pytest.raises(ValueError, match="fp64 runs backend='torch'"):
        chunk_gdn2(*args, backend="triton")
    _, s = recurrent_gdn2(*args)
    assert s.dtype == torch.float64
