"""The CPU shortcuts against what they replace, forward and every gradient in fp64: the depthwise conv's shifted
multiply-adds against ``conv1d``; a sequence shorter than a chunk (one smaller chunk) against the token loop; a
layer's all-observed mask (the dense path) against the packed path it skips."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gdn2ts.layers import GatedDeltaNet2, GDN2Config
from gdn2ts.ops import chunk_reference, recurrent_reference
from gdn2ts.ops.conv import causal as conv_module

from tolerances import assert_close

F64 = torch.float64


@pytest.mark.parametrize("L", [1, 3, 11, 128, 129, 200])
@pytest.mark.parametrize("W", [2, 4])
def test_depthwise_shifts_equal_conv1d(L, W):
    gen = torch.Generator().manual_seed(L * 10 + W)
    N, C = 3, 5
    xt = torch.randn(N, C, W - 1 + L, generator=gen, dtype=F64, requires_grad=True)
    weight = torch.randn(C, 1, W, generator=gen, dtype=F64, requires_grad=True)
    dy = torch.randn(N, C, L, generator=gen, dtype=F64)
    got = conv_module._depthwise(xt, weight, L)
    g_x, g_w = torch.autograd.grad((got * dy).sum(), (xt, weight))
    want = F.conv1d(xt, weight, groups=C)
    e_x, e_w = torch.autograd.grad((want * dy).sum(), (xt, weight))
    assert got.shape == (N, C, L)
    for name, a, e in (("y", got, want), ("dxt", g_x, e_x), ("dweight", g_w, e_w)):
        assert_close(name, a, e, F64)


@pytest.mark.parametrize("T", [1, 2, 5, 11, 31])
def test_a_sequence_shorter_than_a_chunk_matches_the_token_loop(T):
    gen = torch.Generator().manual_seed(T)
    B, H, K, V = 2, 2, 8, 4

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=F64)

    leaves = [r(B, T, H, K), F.normalize(r(B, T, H, K), dim=-1), r(B, T, H, V), -torch.rand(B, T, H, K, generator=gen,
              dtype=F64), torch.rand(B, T, H, K, generator=gen, dtype=F64), torch.rand(B, T, H, V, generator=gen,
              dtype=F64), r(B, H, K, V)]
    do, ds = r(B, T, H, V), r(B, H, K, V)
    results = []
    for fn in (chunk_reference, recurrent_reference):
        xs = [t.clone().requires_grad_() for t in leaves]
        o, s = fn(*xs[:6], initial_state=xs[6], output_final_state=True)
        grads = torch.autograd.grad((o * do).sum() + (s * ds).sum(), xs)
        results.append((o, s, *grads))
    for name, a, e in zip(("o", "state", "dq", "dk", "dv", "dg", "db", "dw", "dh0"), *results, strict=True):
        assert_close(name, a, e, F64)


@pytest.mark.parametrize("variant", ["gdn2", "kda", "mamba2"])
def test_an_all_observed_mask_takes_the_dense_path_with_the_packed_result(variant, monkeypatch):
    torch.manual_seed(0)
    layer = GatedDeltaNet2(GDN2Config.variant(variant, hidden_size=24, num_heads=2, head_k_dim=8, head_v_dim=8,
                                              gate_low_rank=4)).double()
    B, T = 3, 9
    x = torch.randn(B, T, 24, dtype=F64, requires_grad=True)
    scale = torch.rand(B, T, dtype=F64) + 0.5
    mask = torch.ones(B, T, dtype=torch.bool)
    dy = torch.randn(B, T, 24, dtype=F64)
    y, s = layer(x, attention_mask=mask, decay_scale=scale)
    (dx,) = torch.autograd.grad((y * dy).sum() + s.recurrent.sum(), (x,))

    # the packed path, as the mask would have taken it
    calls = []
    real = layer._forward_packed
    monkeypatch.setattr(layer, "_forward_packed", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer(x.detach()[:, :2], attention_mask=mask[:, :2])
    assert not calls, "an all-observed mask on the CPU should not pack"
    cu = torch.arange(0, B * T + 1, T)
    y_p, s_p = real(x.reshape(1, B * T, 24), None, cu, scale.reshape(1, B * T))
    (dx_p,) = torch.autograd.grad((y_p.reshape(B, T, 24) * dy).sum() + s_p.recurrent.sum(), (x,))
    assert_close("y", y, y_p.reshape(B, T, 24), F64)
    assert_close("recurrent state", s.recurrent, s_p.recurrent, F64)
    assert_close("conv tail", s.conv, s_p.conv, F64)
    assert_close("dx", dx, dx_p, F64)
