"""recurrent_gdn2: the decode/streaming op with explicit state and an optional state pool."""

from __future__ import annotations

import pytest
import torch

from gdn2ts.ops import chunk_gdn2, recurrent_gdn2

from inputs import make_inputs
from tolerances import assert_close

ARGS = ("q", "k", "v", "g", "b", "w")


def seq(x, sl=slice(None)):
    return [x[n][:, sl] for n in ARGS]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_token_by_token_steps_equal_chunked(dtype):
    x = make_inputs(T=70, dtype=dtype, seed=1)
    o_ref, s_ref = chunk_gdn2(*seq(x), initial_state=x["h0"], output_final_state=True)
    state, outs = x["h0"], []
    for t in range(70):
        o, state = recurrent_gdn2(*seq(x, slice(t, t + 1)), initial_state=state)
        outs.append(o)
    assert_close("o", torch.cat(outs, dim=1), o_ref, dtype)
    assert_close("state", state, s_ref, dtype)


def test_several_tokens_per_call_and_varlen():
    x = make_inputs(B=1, T=9, dtype=torch.float64, seed=2)
    cu = torch.tensor([0, 2, 2, 9])
    h0 = torch.randn(3, 2, 16, 8, dtype=torch.float64)
    o, s = recurrent_gdn2(*seq(x), initial_state=h0, cu_seqlens=cu)
    o_ref, s_ref = chunk_gdn2(*seq(x), initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert_close("o", o, o_ref, torch.float64)
    assert_close("state", s, s_ref, torch.float64)
    assert torch.equal(s[1], h0[1])  # the empty sequence keeps its state


def test_initial_state_is_not_modified():
    x = make_inputs(T=3, dtype=torch.float32)
    before = x["h0"].clone()
    recurrent_gdn2(*seq(x), initial_state=x["h0"])
    assert torch.equal(x["h0"], before)


def test_state_pool_reads_and_writes_slots_in_place():
    x = make_inputs(B=3, T=2, dtype=torch.float64, seed=4)
    pool = torch.randn(6, 2, 16, 8, dtype=torch.float64)
    before = pool.clone()
    idx = torch.tensor([4, -1, 1])
    o, out = recurrent_gdn2(*seq(x), initial_state=pool, state_indices=idx)
    assert out is pool
    h0 = torch.stack([before[4], torch.zeros_like(before[0]), before[1]])
    o_ref, s_ref = chunk_gdn2(*seq(x), initial_state=h0, output_final_state=True)
    assert_close("o", o, o_ref, torch.float64)
    assert_close("slot 4", pool[4], s_ref[0], torch.float64)
    assert_close("slot 1", pool[1], s_ref[2], torch.float64)
    for slot in (0, 2, 3, 5):  # untouched slots, including none for the padding row
        assert torch.equal(pool[slot], before[slot])


@pytest.mark.parametrize("idx,msg", [([0, 0, 1], "distinct"), ([0, 6, 1], "slots in"), ([0, -2, 1], "slots in"),
                                     ([0, 1], "state_indices")])
def test_bad_slot_indices_leave_the_pool_unchanged(idx, msg):
    x = make_inputs(B=3, T=1, dtype=torch.float32)
    pool = torch.randn(6, 2, 16, 8)
    before = pool.clone()
    with pytest.raises(ValueError, match=msg):
        recurrent_gdn2(*seq(x), initial_state=pool, state_indices=torch.tensor(idx))
    assert torch.equal(pool, before)


def test_raises_when_gradients_are_requested():
    x = make_inputs(T=1, dtype=torch.float32)
    q = x["q"].clone().requires_grad_()
    with pytest.raises(RuntimeError, match="forward-only"):
        recurrent_gdn2(q, *seq(x)[1:], initial_state=x["h0"])
    with torch.no_grad():
        recurrent_gdn2(q, *seq(x)[1:], initial_state=x["h0"])


@pytest.mark.parametrize("op", [recurrent_gdn2, chunk_gdn2])
def test_identity_step_leaves_state_unchanged(op):
    """b = w = 0 and g = 0: the state is exactly the same (the encoding of padding and of unobserved steps)."""
    x = make_inputs(T=5, dtype=torch.float32, seed=8)
    zeros_k = torch.zeros_like(x["g"])
    o, s = op(x["q"], x["k"], x["v"], zeros_k, zeros_k, torch.zeros_like(x["w"]), initial_state=x["h0"],
              output_final_state=True)
    assert torch.equal(s, x["h0"])
    read = torch.einsum("bthk,bhkv->bthv", x["q"] * 16**-0.5, x["h0"])
    assert_close("o", o, read, torch.float32)
