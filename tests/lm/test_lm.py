"""The causal LM: prefill + recurrent/cached steps == the parallel forward for every mixer, generation, errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from gdn2ts.layers.attention import Attention, AttentionConfig, apply_rope
from gdn2ts.lm import MIXERS, CausalLM, load_recipe

TINY = load_recipe("tiny_gdn2")  # hidden 32, window 8
CELLS = [(m,) for m in MIXERS] + [("gdn2", "swa"), ("kda", "attention"), ("swa", "mamba2")]


def _model(cell, seed=0, **overrides) -> CausalLM:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(TINY, cell=tuple(cell), window=4, **overrides)
    return CausalLM(cfg).double().eval()


@pytest.mark.parametrize("cell", CELLS, ids="-".join)
def test_prefill_then_steps_equal_forward(cell):
    """Prefill 5 tokens, then 10 single steps (past the window of 4): logits equal the parallel forward's."""
    model = _model(cell)
    ids = torch.randint(0, TINY.vocab_size, (3, 15), generator=torch.Generator().manual_seed(1))
    full, _ = model(ids)
    logits, state = model(ids[:, :5])
    torch.testing.assert_close(logits, full[:, :5], rtol=0, atol=1e-10)
    for t in range(5, 15):
        step, state = model.step(ids[:, t], state)
        torch.testing.assert_close(step, full[:, t], rtol=0, atol=1e-10)
    for block, s in zip(model.blocks, state, strict=True):
        if block.name == "swa":
            assert s.k.shape[2] == 4 and int(s.pos) == 15
        elif block.name == "attention":
            assert s.k.shape[2] == 15


@pytest.mark.parametrize("cell", [("gdn2", "swa"), ("attention", "kda")], ids="-".join)
def test_two_forward_calls_carrying_state_equal_one(cell):
    model = _model(cell)
    ids = torch.randint(0, TINY.vocab_size, (2, 13), generator=torch.Generator().manual_seed(2))
    full, final = model(ids)
    first, state = model(ids[:, :6])
    second, state = model(ids[:, 6:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), full, rtol=0, atol=1e-10)
    for a, b in zip(state, final, strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-10)


def test_grouped_kv_heads_step_equals_forward():
    model = _model(("swa", "attention"), attn_num_heads=4, attn_num_kv_heads=2, attn_head_dim=8)
    ids = torch.randint(0, TINY.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    full, _ = model(ids)
    state = model.init_state(2)
    for t in range(9):
        step, state = model.step(ids[:, t], state)
        torch.testing.assert_close(step, full[:, t], rtol=0, atol=1e-10)
    assert state[0].k.shape == (2, 2, 4, 8)


@pytest.mark.parametrize("window", [None, 1, 3])
def test_attention_matches_a_direct_softmax(window):
    """Each query t attends to keys s with t - window < s <= t (all s <= t without a window), RoPE at position."""
    torch.manual_seed(4)
    cfg = AttentionConfig(hidden_size=16, num_heads=2, head_dim=8, window=window)
    layer = Attention(cfg).double()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    y, _ = layer(x)
    pos = torch.arange(7)
    q = apply_rope(layer.q_proj(x).unflatten(-1, (2, 8)), pos, cfg.rope_theta)
    k = apply_rope(layer.k_proj(x).unflatten(-1, (2, 8)), pos, cfg.rope_theta)
    v = layer.v_proj(x).unflatten(-1, (2, 8))
    out = torch.zeros_like(q)
    for t in range(7):
        lo = 0 if window is None else max(0, t - window + 1)
        scores = torch.einsum("bhd,bshd->bhs", q[:, t], k[:, lo:t + 1]) / 8 ** 0.5
        out[:, t] = torch.einsum("bhs,bshd->bhd", scores.softmax(-1), v[:, lo:t + 1])
    torch.testing.assert_close(y, layer.o_proj(out.flatten(-2)), rtol=0, atol=1e-12)


def test_greedy_generate_follows_the_forward_argmax():
    model = _model(("gdn2", "swa"))
    prompt = torch.randint(0, TINY.vocab_size, (2, 3), generator=torch.Generator().manual_seed(5))
    out = model.generate(prompt, max_new_tokens=9)
    assert out.shape == (2, 12) and torch.equal(out[:, :3], prompt)
    logits, _ = model(out)
    assert torch.equal(logits[:, 2:-1].argmax(-1), out[:, 3:])


def test_sampling_is_seeded_and_top1_is_greedy():
    model = _model(("kda",))
    prompt = torch.randint(0, TINY.vocab_size, (2, 4), generator=torch.Generator().manual_seed(6))
    a = model.generate(prompt, 6, temperature=1.0, generator=torch.Generator().manual_seed(7))
    b = model.generate(prompt, 6, temperature=1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert torch.equal(model.generate(prompt, 6, temperature=0.7, top_k=1), model.generate(prompt, 6))
    assert torch.equal(model.generate(prompt, 0), prompt)


def test_forward_is_differentiable_and_leaves_state_alone():
    model = _model(("gdn2", "swa")).float().train()
    ids = torch.randint(0, TINY.vocab_size, (2, 10), generator=torch.Generator().manual_seed(8))
    _, state = model(ids[:, :4])
    # (an attention cache's mask is None when no token was skipped)
    kept = [[None if t is None else t.clone() for t in s] for s in state]
    logits, _ = model(ids[:, 4:], state)
    F.cross_entropy(logits.flatten(0, 1), ids[:, 4:].flatten()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    for s, k in zip(state, kept, strict=True):
        assert all(a is b is None or torch.equal(a, b) for a, b in zip(s, k, strict=True))


def test_bad_inputs_are_named():
    model = _model(("gdn2", "swa"))
    ids = torch.randint(0, TINY.vocab_size, (2, 5))
    with pytest.raises(ValueError, match=r"'input_ids' expected token ids in \[0, 64\)"):
        model(ids + 64)
    with pytest.raises(ValueError, match="'input_ids' expected an int64/int32 tensor"):
        model(ids.double())
    _, state = model(ids)
    with pytest.raises(ValueError, match="'state' expected one entry per block"):
        model.step(ids[:, 0], state[:1])
    with pytest.raises(ValueError, match=r"'state\[1\]' expected an AttentionState \(block 1 is 'swa'\)"):
        model.step(ids[:, 0], (state[0], state[0], *state[2:]))
    with pytest.raises(ValueError, match="'state.k' expected shape"):
        model.step(ids[:1, 0], (model.init_state(1)[0], *state[1:]))
    with pytest.raises(ValueError, match="'max_new_tokens'"):
        model.generate(ids, -1)
    with pytest.raises(ValueError, match="'temperature'"):
        model.generate(ids, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="'batch'"):
        model.init_state(0)
    with pytest.raises(ValueError, match="field 'window'"):
        AttentionConfig(16, 2, head_dim=8, window=0)


@pytest.mark.parametrize("cell", CELLS, ids="-".join)
def test_packed_documents_equal_separate_forwards(cell):
    """Documents packed with cu_seqlens (lengths 6, 1, 0, 9; the last past the window) get the logits each gets
    alone: every mixer restarts at a boundary, attention positions included."""
    model = _model(cell)
    lengths = [6, 1, 0, 9]
    docs = [torch.randint(0, TINY.vocab_size, (1, n), generator=torch.Generator().manual_seed(10 + n))
            for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    packed, state = model(torch.cat(docs, 1), cu_seqlens=cu)
    assert state is None
    alone = torch.cat([model(d)[0] for d in docs if d.shape[1]], 1)
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-10)


def test_packed_input_errors():
    model = _model(("gdn2", "swa"))
    ids = torch.randint(0, TINY.vocab_size, (2, 5))
    with pytest.raises(ValueError, match="'state' expected None when cu_seqlens"):
        model(ids[:1], model.init_state(1), cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="batch size 1"):
        model(ids, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="'cu_seqlens' expected offsets from 0 to T=5"):
        model(ids[:1], cu_seqlens=torch.tensor([0, 4]))
