"""The causal LM in Hugging Face transformers: config and weights round trip through save_pretrained /
from_pretrained (safetensors), the Auto classes, logits equal to CausalLM's, greedy generate equal to
CausalLM.generate for every mixer and the hybrids, left-padded batches equal to each row alone, beams, errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from gdn2ts.hf import GDN2TSCache, GDN2TSConfig, GDN2TSForCausalLM
from gdn2ts.lm import MIXERS, load_recipe

TINY = load_recipe("tiny_gdn2")  # hidden 32, 2 heads of 8, vocabulary 64
# every mixer alone, the paper's hybrid, and full attention beside Mamba-3 (window 4: generation runs past it)
LAYOUTS = [(m,) for m in MIXERS] + [("gdn2", "swa"), ("mamba3_mimo", "attention")]


def _model(cell, seed=0, num_cells=1) -> GDN2TSForCausalLM:
    torch.manual_seed(seed)
    lm = dataclasses.replace(TINY, cell=tuple(cell), num_cells=num_cells, window=4)
    return GDN2TSForCausalLM(GDN2TSConfig.from_lm_config(lm, pad_token_id=0)).eval()


def _ids(B, T, seed=1):
    return torch.randint(1, TINY.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def test_round_trip_is_bit_identical_and_auto_classes_load_it(tmp_path):
    model = _model(("gdn2", "swa"), num_cells=2)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "gdn2ts" and saved["lm"]["cell"] == ["gdn2", "swa"]
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, GDN2TSConfig) and config.lm_config == model.config.lm_config
    ids = _ids(2, 11)
    want = model(ids).logits
    for cls in (GDN2TSForCausalLM, AutoModelForCausalLM):
        loaded = cls.from_pretrained(tmp_path).eval()
        assert type(loaded) is GDN2TSForCausalLM
        assert torch.equal(loaded(ids).logits, want)
        for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
            assert torch.equal(p, q), name


@pytest.mark.parametrize("cell", LAYOUTS, ids="-".join)
def test_logits_and_greedy_generate_equal_causal_lm(cell):
    model = _model(cell)
    ids = _ids(2, 6)
    logits, _ = model.model(ids)
    assert torch.equal(model(ids).logits, logits)
    out = model.generate(ids, max_new_tokens=7, do_sample=False)
    assert torch.equal(out, model.model.generate(ids, 7))


def _left_padded(lengths):
    rows = [_ids(1, n, seed=10 + n)[0] for n in lengths]
    T = max(lengths)
    ids = torch.zeros(len(rows), T, dtype=torch.long)  # pad id 0, on the left
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    return rows, ids, mask


@pytest.mark.parametrize("cell", [("kda",), ("gdn2", "swa"), ("mamba3_siso", "attention")], ids="-".join)
def test_left_padded_batch_generates_what_each_row_generates_alone(cell):
    model = _model(cell)
    rows, ids, mask = _left_padded((6, 2, 4))
    T = ids.shape[1]
    out = model.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False)
    for i, r in enumerate(rows):
        alone = model.model.generate(r[None], 7)[0, len(r):]
        assert torch.equal(out[i, T:], alone), i
        assert torch.equal(model.generate(r[None], max_new_tokens=7, do_sample=False)[0, len(r):], alone)
    # the padded forward scores every row as alone
    logits = model(ids, attention_mask=mask).logits
    for i, r in enumerate(rows):
        torch.testing.assert_close(logits[i, T - len(r):], model.model(r[None])[0][0], rtol=0, atol=1e-5)


def test_generate_without_a_cache_reruns_the_padded_batch_to_the_same_tokens():
    model = _model(("gdn2", "swa"))
    _, ids, mask = _left_padded((5, 2))
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, use_cache=False),
                       out)


def test_cache_carries_the_state_between_calls():
    model = _model(("gdn2", "swa"))
    ids = _ids(2, 9)
    out = model(ids[:, :5], use_cache=True)
    cache = out.cache
    assert isinstance(cache, GDN2TSCache) and cache.get_seq_length() == 5 and cache.is_linear == [True, False]
    with torch.no_grad():
        for t in range(5, 9):
            step = model(ids[:, t:t + 1], cache=cache)
            assert step.cache is cache and cache.get_seq_length() == t + 1
    full = model(ids).logits
    torch.testing.assert_close(step.logits[:, -1], full[:, -1], rtol=0, atol=1e-5)
    # a cache of the caller's, empty at first, is filled by generate and kept
    mine = GDN2TSCache(model.model.config.layout)
    out = model.generate(ids[:, :5], max_new_tokens=3, do_sample=False, cache=mine)
    assert torch.equal(out, model.model.generate(ids[:, :5], 3)) and mine.get_seq_length() == 7


def test_beam_search_reorders_the_cache():
    model = _model(("kda", "swa")).double()
    ids = _ids(2, 5)
    beams = model.generate(ids, max_new_tokens=4, num_beams=3, do_sample=False)
    assert torch.equal(beams, model.generate(ids, max_new_tokens=4, num_beams=3, do_sample=False, use_cache=False))
    two = model.generate(ids, max_new_tokens=3, num_beams=3, num_return_sequences=2, do_sample=False)
    assert two.shape == (4, 8)


def test_labels_give_the_next_token_loss():
    model = _model(("gdn2",))
    ids = _ids(2, 7)
    out = model(ids, labels=ids)
    want = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, want)
    out.loss.backward()
    assert model.model.embed.weight.grad is not None


def test_bad_input_is_named(tmp_path):
    model = _model(("gdn2",))
    ids = _ids(1, 3)
    with pytest.raises(ValueError, match="'output_attentions' is not supported"):
        model(ids, output_attentions=True)
    with pytest.raises(ValueError, match="'cache' expected a GDN2TSCache"):
        model(ids, cache=((torch.zeros(1),),))
    with pytest.raises(ValueError, match="'cache' expected the layout of this model"):
        model(ids, cache=GDN2TSCache(("swa",)))
    with pytest.raises(ValueError, match=r"'attention_mask' expected a 2-D tensor \[B=1, T >= 3\]"):
        model(ids, attention_mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match="expected token ids in"):
        model(ids + TINY.vocab_size)
    with pytest.raises(ValueError, match="cannot be taken back"):
        model(ids, use_cache=True).cache.crop(-1)
    with pytest.raises(ValueError, match="cannot be taken back .* decode without an assistant model"):
        model.generate(ids, max_new_tokens=3, do_sample=False, assistant_model=model)
    with pytest.raises(ValueError, match="belongs|inside lm="):
        GDN2TSConfig(hidden_size=32)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        GDN2TSConfig(tie_word_embeddings=True)
    with pytest.raises(ValueError, match=r"'eos_token_id' expected None or a token id in \[0, 64\)"):
        GDN2TSConfig(lm={"vocab_size": 64}, eos_token_id=257)
    # a folder of another architecture
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    with pytest.raises(ValueError, match="'model_type' expected 'gdn2ts', got 'llama'"):
        GDN2TSConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'model_type' expected 'gdn2ts', got 'llama'"):
        GDN2TSForCausalLM.from_pretrained(tmp_path)
