"""Irregular sampling in the layer: ``decay_scale`` multiplies each token's log-decay (alpha ** dt)."""

from __future__ import annotations

import pytest
import torch

from gdn2ts.layers import GatedDeltaNet2, GDN2Config


def layer(variant="gdn2", seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = GDN2Config.variant(variant, hidden_size=32, num_heads=2, head_k_dim=8, head_v_dim=8, gate_low_rank=4,
                             **overrides)
    return GatedDeltaNet2(cfg).double()


def test_unit_scale_is_the_default():
    m = layer()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    y, s = m(x)
    y1, s1 = m(x, decay_scale=torch.ones(2, 9, dtype=torch.float64))
    assert torch.equal(y, y1) and torch.equal(s.recurrent, s1.recurrent)


@pytest.mark.parametrize("variant", ["gdn2", "gdn", "mamba2"])
def test_step_by_step_equals_parallel_with_scales(variant):
    m = layer(variant)
    x = torch.randn(3, 70, 32, dtype=torch.float64)
    dt = torch.rand(3, 70, dtype=torch.float64) * 3
    y, s = m(x, decay_scale=dt)
    st = m.init_state(3, dtype=torch.float64)
    steps = []
    for t in range(70):
        y_t, st = m.step(x[:, t], st, decay_scale=dt[:, t])
        steps.append(y_t)
    torch.testing.assert_close(torch.stack(steps, 1), y, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(st.recurrent, s.recurrent, atol=1e-10, rtol=1e-9)


def test_scales_follow_the_mask():
    m = layer()
    x = torch.randn(1, 12, 32, dtype=torch.float64)
    dt = torch.rand(1, 12, dtype=torch.float64) * 2
    mask = torch.tensor([[1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1, 1]], dtype=torch.bool)
    y, s = m(x, attention_mask=mask, decay_scale=dt)
    y_ref, s_ref = m(x[:, mask[0]], decay_scale=dt[:, mask[0]])
    torch.testing.assert_close(y[:, mask[0]], y_ref, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(s.recurrent, s_ref.recurrent, atol=1e-10, rtol=1e-9)


def test_a_long_gap_forgets_the_past():
    """After a very long elapsed time the old state has decayed away: the state after the next token no longer
    depends on what came before (no conv, so that the last token's projections see only itself)."""
    m = layer(conv_size=1)
    a, b = torch.randn(1, 10, 32, dtype=torch.float64), torch.randn(1, 10, 32, dtype=torch.float64)
    last = torch.randn(1, 1, 32, dtype=torch.float64)
    gap = torch.ones(1, 11, dtype=torch.float64)
    gap[0, -1] = 1e9
    _, s_a = m(torch.cat([a, last], 1), decay_scale=gap)
    _, s_b = m(torch.cat([b, last], 1), decay_scale=gap)
    torch.testing.assert_close(s_a.recurrent, s_b.recurrent, atol=1e-12, rtol=0)
    _, s_a1 = m(torch.cat([a, last], 1))
    _, s_b1 = m(torch.cat([b, last], 1))
    assert (s_a1.recurrent - s_b1.recurrent).abs().max() > 1e-3


@pytest.mark.parametrize("value,pattern", [
    (torch.full((2, 5), -1.0, dtype=torch.float64), "finite, non-negative"),
    (torch.full((2, 5), float("inf"), dtype=torch.float64), "finite, non-negative"),
    (torch.ones(2, 4, dtype=torch.float64), r"shape \[B=2, T=5\]"),
    (torch.ones(2, 5, dtype=torch.int64), "a floating tensor"),
])
def test_bad_scales(value, pattern):
    with pytest.raises(ValueError, match=pattern):
        layer()(torch.randn(2, 5, 32, dtype=torch.float64), decay_scale=value)
