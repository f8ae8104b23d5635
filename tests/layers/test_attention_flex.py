"""Sliding-window and packed attention through FlexAttention block masks equal the dense-mask SDPA path; the block
masks skip the blocks outside the window. On the CPU FlexAttention runs unfused and forward only: these tests check
the masks and the wiring in fp64; the gradients of the fused kernel are checked on CUDA (``-m gpu``), and its
speed is measured there by ``gdn2ts lm throughput``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gdn2ts.layers.attention import Attention, AttentionConfig
from gdn2ts.layers.flex import packed_block_mask, window_block_mask


def _pair(**kw):
    torch.manual_seed(0)
    cfg = AttentionConfig(hidden_size=32, num_heads=4, head_dim=8, backend="sdpa", **kw)
    dense = Attention(cfg).double()
    flex = Attention(dataclasses.replace(cfg, backend="flex")).double()
    flex.load_state_dict(dense.state_dict())
    return dense, flex


def _grads(layer, x, **kw):
    x = x.clone().requires_grad_()
    y, _ = layer(x, **kw)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)).sum().backward()
    return y.detach(), x.grad, [p.grad.clone() for p in layer.parameters()]


def _close(got, want, tol):
    y1, gx1, gp1 = got
    y0, gx0, gp0 = want
    torch.testing.assert_close(y1, y0, rtol=tol, atol=tol)
    torch.testing.assert_close(gx1, gx0, rtol=tol, atol=tol)
    for a, b in zip(gp1, gp0, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("window, kv_heads", [(48, None), (48, 2), (200, 1), (None, 2)])
def test_windowed_calls_equal_the_dense_mask(window, kv_heads):
    dense, flex = _pair(window=window, num_kv_heads=kv_heads)
    x = torch.randn(2, 300, 32, dtype=torch.float64)
    with torch.no_grad():
        (y1, s1), (y0, s0) = flex(x), dense(x)
    torch.testing.assert_close(y1, y0, rtol=1e-10, atol=1e-10)
    # the cache a windowed call leaves behind is the same, and continuing from it agrees
    torch.testing.assert_close(s1.k, s0.k)
    step = torch.randn(2, 32, dtype=torch.float64)
    torch.testing.assert_close(flex.step(step, s1)[0], dense.step(step, s0)[0])


@pytest.mark.parametrize("window", [None, 40])
def test_packed_documents_equal_the_dense_mask(window):
    dense, flex = _pair(window=window, num_kv_heads=2)
    cu = torch.tensor([0, 70, 71, 230, 300])
    x = torch.randn(1, 300, 32, dtype=torch.float64)
    with torch.no_grad():
        y1 = flex(x, cu_seqlens=cu)[0]
        torch.testing.assert_close(y1, dense(x, cu_seqlens=cu)[0], rtol=1e-10, atol=1e-10)
        # and each document alone gives its own rows
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
            torch.testing.assert_close(y1[:, s:e], dense(x[:, s:e])[0], rtol=1e-10, atol=1e-10)


def test_block_masks_skip_the_blocks_outside_the_window():
    cpu = torch.device("cpu")
    T, W = 2048, 256
    full = window_block_mask(T, T, None, cpu)
    windowed = window_block_mask(T, T, W, cpu)
    # 16 query blocks of 128: causal visits 1 + 2 + ... + 16 = 136 key blocks, the window at most 3 per query block
    assert int(full.kv_num_blocks.sum() + full.full_kv_num_blocks.sum()) == 136
    visited = windowed.kv_num_blocks + windowed.full_kv_num_blocks
    assert int(visited.max()) == W // 128 + 1 and int(visited.sum()) <= 3 * 16
    # documents: no block pair across two documents of whole blocks
    packed = packed_block_mask(torch.tensor([0, 1024, 2048]), T, None)
    assert int(packed.kv_num_blocks.sum() + packed.full_kv_num_blocks.sum()) == 2 * 36
    # the dense masks are cached by shape
    assert window_block_mask(T, T, W, cpu) is windowed


def test_backend_is_checked_and_auto_keeps_the_cpu_on_sdpa():
    with pytest.raises(ValueError, match="field 'backend' expected one of"):
        AttentionConfig(hidden_size=32, num_heads=4, head_dim=8, backend="flash")
    layer = Attention(AttentionConfig(hidden_size=32, num_heads=4, head_dim=8, window=16))
    assert not layer._use_flex(4096, torch.device("cpu"))
    assert layer._use_flex(4096, torch.device("cuda")) and not layer._use_flex(64, torch.device("cuda"))


def test_training_through_flex_off_cuda_is_refused_clearly():
    _, flex = _pair(window=48)
    with pytest.raises(ValueError, match="FlexAttention has no CPU backward"):
        flex(torch.randn(1, 300, 32, dtype=torch.float64, requires_grad=True))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window, packed", [(256, False), (256, True), (None, True)])
def test_fused_flex_kernel_matches_sdpa_forward_and_backward(dtype, window, packed):
    dense, flex = _pair(window=window, num_kv_heads=2)
    dense, flex = dense.to("cuda", dtype), flex.to("cuda", dtype)
    T = 2048
    x = torch.randn(1 if packed else 2, T, 32, device="cuda", dtype=dtype)
    kw = {"cu_seqlens": torch.tensor([0, 300, 301, 1500, T], device="cuda")} if packed else {}
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    _close(_grads(flex, x, **kw), _grads(dense, x, **kw), tol)
