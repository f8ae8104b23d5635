"""GatedDeltaNet2.op_inputs: the activated op inputs replay the layer's own recurrence, for every variant, with
masks, decay scales, a carried state and grouped value heads."""

from __future__ import annotations

import pytest
import torch

from gdn2ts.layers import GatedDeltaNet2, GDN2Config
from gdn2ts.ops import recurrent_reference


@pytest.mark.parametrize("variant,v_heads", [("gdn2", None), ("gdn2", 4), ("kda", None), ("gdn", 4),
                                             ("mamba2", None), ("erase_only", None)])
def test_op_inputs_replay_the_layer(variant, v_heads):
    torch.manual_seed(0)
    cfg = GDN2Config.variant(variant, hidden_size=16, num_heads=2, head_k_dim=4, head_v_dim=4, gate_low_rank=4,
                             num_v_heads=v_heads)
    layer = GatedDeltaNet2(cfg).double()
    x0, x = torch.randn(3, 5, 16).double(), torch.randn(3, 9, 16).double()
    _, state = layer(x0)
    mask = torch.rand(3, 9) > 0.3
    mask[:, 0] = True
    scale = torch.rand(3, 9).double() * 2
    params = {k: v.clone() for k, v in layer.state_dict().items()}
    inputs = layer.op_inputs(x, state, attention_mask=mask, decay_scale=scale)
    _, expected = layer(x, state, attention_mask=mask, decay_scale=scale)
    _, replayed = recurrent_reference(*inputs, initial_state=state.recurrent, output_final_state=True)
    torch.testing.assert_close(replayed, expected.recurrent, atol=1e-10, rtol=1e-10)
    # skipped tokens hold the identity step; the activated gates are in range
    for t in inputs:
        assert t.dtype == torch.float64 and bool((t[~mask] == 0).all())
    assert bool((inputs.g <= 0).all()) and bool((inputs.w >= 0).all())
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in params.items())


def test_op_inputs_validates_like_forward():
    layer = GatedDeltaNet2(GDN2Config(16, 2, head_k_dim=4, head_v_dim=4, gate_low_rank=4))
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match="attention_mask"):
        layer.op_inputs(x, attention_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="decay_scale"):
        layer.op_inputs(x, decay_scale=-torch.ones(2, 5))
    with pytest.raises(ValueError, match="'x'"):
        layer.op_inputs(torch.randn(2, 5, 8))
