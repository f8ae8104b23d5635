"""Skipped tokens (attention_mask) in the causal LM: a left-padded batch gives every row what it gives alone, in the
prefill, in the steps after it and in generation, for every mixer; the recurrent mixers skip holes anywhere."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gdn2ts.layers.attention import Attention, AttentionConfig
from gdn2ts.layers.mamba3 import Mamba3
from gdn2ts.layers.mamba3_config import Mamba3Config
from gdn2ts.lm import MIXERS, CausalLM, load_recipe

TINY = load_recipe("tiny_gdn2")
CELLS = [(m,) for m in MIXERS] + [("gdn2", "swa"), ("mamba3_mimo", "attention")]
LENGTHS = (7, 3, 5)  # prompt lengths of the three rows; the batch is left-padded to 7


def _model(cell, seed=0) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(dataclasses.replace(TINY, cell=tuple(cell), num_cells=1, window=4)).double().eval()


def _left_padded(lengths, seed=1, pad=0):
    rows = [torch.randint(1, TINY.vocab_size, (n,), generator=torch.Generator().manual_seed(seed + i))
            for i, n in enumerate(lengths)]
    T = max(lengths)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    return rows, ids, mask


@pytest.mark.parametrize("cell", CELLS, ids="-".join)
def test_left_padded_prefill_and_steps_equal_each_row_alone(cell):
    model = _model(cell)
    rows, ids, mask = _left_padded(LENGTHS)
    nxt = torch.randint(1, TINY.vocab_size, (len(rows), 3), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        logits, state = model(ids, attention_mask=mask)
        steps = []
        for t in range(nxt.shape[1]):
            out, state = model.step(nxt[:, t], state)
            steps.append(out)
        for i, r in enumerate(rows):
            alone, s = model(r[None])
            torch.testing.assert_close(logits[i, -len(r):], alone[0], rtol=0, atol=1e-10)
            for t in range(nxt.shape[1]):
                out, s = model.step(nxt[i:i + 1, t], s)
                torch.testing.assert_close(steps[t][i], out[0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("cell", [("gdn2", "swa"), ("mamba3_siso", "attention")], ids="-".join)
def test_generate_with_left_padding_equals_each_row_alone(cell):
    model = _model(cell)
    rows, ids, mask = _left_padded(LENGTHS, seed=3)
    out = model.generate(ids, 6, attention_mask=mask)
    for i, r in enumerate(rows):
        assert torch.equal(out[i, ids.shape[1]:], model.generate(r[None], 6)[0, len(r):])


def test_skipped_tokens_in_a_later_call_leave_the_recurrent_states_as_they_were():
    model = _model(("kda", "mamba3_siso", "mamba2"))
    ids = torch.randint(1, TINY.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    gap = torch.randint(1, TINY.vocab_size, (2, 3), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full, _ = model(ids)
        _, state = model(ids[:, :5])
        out, state = model(gap, state, attention_mask=torch.zeros(2, 3, dtype=torch.bool))
        rest, _ = model(ids[:, 5:], state)
    torch.testing.assert_close(rest, full[:, 5:], rtol=0, atol=1e-10)


def test_mamba3_skips_holes_anywhere_exactly():
    torch.manual_seed(0)
    layer = Mamba3(Mamba3Config(hidden_size=16, num_heads=2, head_dim=4, state_dim=8, mode="mimo",
                                mimo_rank=2)).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    keep = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 0, 1]], dtype=torch.bool)
    y, state = layer(x, attention_mask=keep)
    for i in range(2):
        alone, s = layer(x[i:i + 1, keep[i]])
        torch.testing.assert_close(y[i, keep[i]], alone[0], rtol=0, atol=1e-12)
        assert bool((y[i, ~keep[i]] == 0).all())
        for a, b in zip(state, s, strict=True):
            torch.testing.assert_close(a[i], b[0], rtol=0, atol=1e-12)


def test_attention_skipped_queries_output_zero_and_cache_remembers_skipped_keys():
    torch.manual_seed(0)
    layer = Attention(AttentionConfig(hidden_size=16, num_heads=2, head_dim=8)).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    keep = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
    y, state = layer(x, attention_mask=keep)
    assert bool((y[0, :3] == 0).all()) and torch.isfinite(y).all()
    assert state.mask.tolist() == keep.bool().tolist()
    x_t = torch.randn(2, 16, dtype=torch.float64)
    y_t, state = layer.step(x_t, state)
    alone, s = layer(x[:1, 3:])
    torch.testing.assert_close(y_t[0], layer.step(x_t[:1], s)[0][0], rtol=0, atol=1e-12)
    assert state.mask.shape == (2, 6)


def test_bad_masks_are_named():
    model = _model(("gdn2", "swa"))
    ids = torch.randint(1, TINY.vocab_size, (2, 4))
    with pytest.raises(ValueError, match=r"CausalLM.forward: argument 'attention_mask' expected shape \[2, 4\]"):
        model(ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="argument 'attention_mask' expected bool or 0/1 values"):
        model(ids, attention_mask=torch.full((2, 4), 2))
    with pytest.raises(ValueError, match="expected None when cu_seqlens packs documents"):
        model(ids.view(1, 8), cu_seqlens=torch.tensor([0, 4, 8]), attention_mask=torch.ones(1, 8))
    right_padded = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with pytest.raises(ValueError, match=r"expected left padding .* got rows \[1\] ending in padding"):
        model.generate(ids, 2, attention_mask=right_padded)
