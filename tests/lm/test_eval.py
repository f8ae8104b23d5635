"""LM evaluation: perplexity against a direct computation (blocks, packed documents, text with bits per byte), and
RULER-style needle prompts (placement at the requested depth, distinct keys, text haystacks) with their scorer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gdn2ts.lm.eval import NeedleConfig, make_needles, needle_accuracy, needle_depth_sweep, perplexity, text_perplexity
from gdn2ts.models.lm import CausalLM
from gdn2ts.models.lm_config import LMConfig


def _model(vocab=40, cell=("gdn2",)):
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=vocab, hidden_size=16, num_cells=2, cell=cell, intermediate_size=32, num_heads=2,
                   head_k_dim=8, head_v_dim=8, gate_low_rank=4, attn_num_heads=2, attn_head_dim=8, window=4)
    return CausalLM(cfg).double()


def _nll(model, ids):
    logits, _ = model(ids[None, :-1])
    return F.cross_entropy(logits[0], ids[1:], reduction="sum").item()


class Bytes:
    """A byte tokenizer (BOS 256, EOS 257) for text tests."""

    vocab_size, bos_id, eos_id = 258, 256, 257

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@pytest.mark.parametrize("cell", [("gdn2",), ("kda", "swa")])
def test_perplexity_equals_direct_nll(cell):
    model = _model(cell=cell)
    blocks = torch.randint(0, 40, (5, 11))
    # ragged: a list whose last block is shorter goes into a batch of its own
    ragged = [*blocks, torch.randint(0, 40, (7,))]
    r = perplexity(model, ragged, batch_size=2)
    total = sum(_nll(model, b) for b in ragged)
    assert r.tokens == 5 * 10 + 6
    assert math.isclose(r.nll, total / r.tokens, rel_tol=1e-10)
    assert math.isclose(r.perplexity, math.exp(total / r.tokens), rel_tol=1e-10)
    assert r.bits_per_byte is None and model.training  # the mode is restored


def test_uniform_model_has_perplexity_vocab():
    model = _model()
    torch.nn.init.zeros_(model.lm_head.weight)
    r = perplexity(model, torch.randint(0, 40, (3, 9)))
    assert math.isclose(r.perplexity, 40, rel_tol=1e-12)


def test_packed_blocks_restart_at_document_boundaries():
    model = _model()
    a, b, c = torch.randint(0, 40, (6,)), torch.randint(0, 40, (4,)), torch.randint(0, 40, (10,))
    row = torch.cat([a, b])
    # the data pipeline's items: inputs, next-token labels (-100 where a document's last token has none)
    items = [{"input_ids": row, "labels": torch.cat([a[1:], torch.tensor([-100]), b[1:], torch.tensor([-100])]),
              "doc_starts": torch.tensor([0, 6])},
             {"input_ids": c, "labels": torch.cat([c[1:], torch.tensor([-100])]), "doc_starts": torch.tensor([0])}]
    r = perplexity(model, items, batch_size=2)
    direct = _nll(model, a) + _nll(model, b) + _nll(model, c)
    assert r.tokens == 5 + 3 + 9 and math.isclose(r.nll * r.tokens, direct, rel_tol=1e-10)


def test_text_perplexity_predicts_every_token_once_and_bits_per_byte():
    model = _model(vocab=258)
    text = "Gated DeltaNet-2 décide what to erase and what to write."
    ids = torch.tensor([256, *text.encode("utf-8")])
    r = text_perplexity(model, Bytes(), text, block_len=16, batch_size=3)
    blocks = [ids[i:i + 17] for i in range(0, len(ids) - 1, 16)]
    direct = sum(_nll(model, b) for b in blocks)
    assert r.tokens == len(ids) - 1 == r.bytes
    assert math.isclose(r.nll * r.tokens, direct, rel_tol=1e-10)
    assert math.isclose(r.bits_per_byte, direct / math.log(2) / r.bytes, rel_tol=1e-10)
    # one block longer than the text is one forward over all of it
    whole = text_perplexity(model, Bytes(), text, block_len=1000)
    assert math.isclose(whole.nll * whole.tokens, _nll(model, ids), rel_tol=1e-10)
    no_bos = text_perplexity(model, Bytes(), text, block_len=1000, add_bos=False)
    assert no_bos.tokens == len(ids) - 2 and no_bos.bytes == r.bytes


def test_perplexity_errors_are_named():
    model = _model()
    with pytest.raises(ValueError, match="argument 'blocks' expected a token tensor"):
        perplexity(model, torch.randint(0, 40, (3, 1)))
    with pytest.raises(ValueError, match="a block expected a 1-D token tensor"):
        perplexity(model, [torch.randint(0, 40, (2, 3))])
    with pytest.raises(ValueError, match="expected at least one predicted token"):
        perplexity(model, [{"input_ids": torch.ones(3, dtype=torch.long), "labels": torch.full((3,), -100)}])
    with pytest.raises(ValueError, match="'doc_starts' expected positions in"):
        perplexity(model, [{"input_ids": torch.ones(3, dtype=torch.long), "labels": torch.ones(3, dtype=torch.long),
                            "doc_starts": torch.tensor([0, 5])}])
    with pytest.raises(ValueError, match="argument 'batch_size' expected an int >= 1"):
        perplexity(model, torch.randint(0, 40, (3, 4)), batch_size=0)
    with pytest.raises(ValueError, match="argument 'text' expected a non-empty string"):
        text_perplexity(model, Bytes(), "")
    with pytest.raises(ValueError, match="expected a tokenizer with a bos_id"):
        text_perplexity(model, type("NoBos", (), {"encode": lambda self, t: [1, 2]})(), "ab")


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_single_needle_stands_at_its_depth(depth):
    cfg = NeedleConfig(vocab_size=50, context_len=60, key_len=2, value_len=3, depth=depth)
    prompts, answers = make_needles(cfg, 6, seed=1)
    assert prompts.shape == (6, 60) and answers.shape == (6, 3)
    H = cfg.haystack_len
    at = round(depth * H)
    for p, a in zip(prompts.tolist(), answers.tolist(), strict=True):
        key = p[-3:-1]
        assert p[-4] == 3 and p[-1] == 2
        assert p[at:at + cfg.needle_len] == [1, *key, 2, *a]
        # the haystack holds no marker tokens
        hay = p[:at] + p[at + cfg.needle_len:-4]
        assert len(hay) == H and min(hay) >= cfg.first_token


def test_multi_key_needles_have_distinct_keys_and_one_answer():
    cfg = NeedleConfig(vocab_size=40, context_len=80, num_needles=4, key_len=1, value_len=2, depth=None)
    prompts, answers = make_needles(cfg, 50, seed=2)
    depths = set()
    for p, a in zip(prompts.tolist(), answers.tolist(), strict=True):
        opens = [i for i, t in enumerate(p[:-3]) if t == 1]
        assert len(opens) == 4
        keys = [p[i + 1] for i in opens]
        assert len(set(keys)) == 4 and p[-2] in keys
        i = opens[keys.index(p[-2])]
        assert p[i + 3:i + 5] == a
        depths.add(i)
    assert len(depths) > 10  # depth None spreads the queried needle
    assert torch.equal(make_needles(cfg, 50, seed=2)[0], prompts)


def test_text_haystack_windows():
    text = torch.arange(10, 200)
    cfg = NeedleConfig(vocab_size=256, context_len=40, key_len=1, value_len=1, depth=1.0)
    prompts, _ = make_needles(cfg, 4, seed=0, haystack=text)
    hay = prompts[:, :cfg.haystack_len]
    # consecutive tokens of the text, at different offsets
    assert bool((hay[:, 1:] - hay[:, :-1] == 1).all()) and len(set(hay[:, 0].tolist())) > 1
    with pytest.raises(ValueError, match="argument 'haystack' expected None or a 1-D int tensor of at least"):
        make_needles(cfg, 2, haystack=text[:5])
    with pytest.raises(ValueError, match="argument 'haystack' expected token ids in"):
        make_needles(cfg, 2, haystack=torch.arange(300, 400))


@pytest.mark.parametrize("fields, message", [
    (dict(context_len=10, value_len=8), "field 'context_len' expected at least"),
    (dict(depth=1.5), "field 'depth' expected None or a float in"),
    (dict(vocab_size=3, first_token=2, num_needles=2), "field 'first_token' expected at most"),
    (dict(needle_open=()), "field 'needle_open' expected a non-empty list"),
    (dict(vocab_size=8, query_open=(9,)), "marker tokens expected ids < vocab_size"),
])
def test_bad_needle_configs(fields, message):
    with pytest.raises(ValueError, match=message):
        NeedleConfig(**fields)


class Oracle:
    """Stands in for a model in the scorer: continues each prompt with the answer it is given."""

    def __init__(self, answers):
        self.answers, self.training, self.row = answers, False, 0
        self.weight = torch.zeros(1)

    def parameters(self):
        return iter([self.weight])

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def generate(self, prompts, max_new_tokens):
        a = self.answers[self.row:self.row + prompts.shape[0]]
        self.row += prompts.shape[0]
        return torch.cat([prompts, a[:, :max_new_tokens]], dim=1)


def test_needle_scorer_exact_match_and_token_accuracy():
    cfg = NeedleConfig(vocab_size=32, context_len=24, key_len=1, value_len=2)
    prompts, answers = make_needles(cfg, 5, seed=0)
    assert needle_accuracy(Oracle(answers), prompts, answers, batch_size=2) == {"exact_match": 1.0,
                                                                                  "token_accuracy": 1.0}
    off = answers.clone()
    off[0, 1] = (off[0, 1] + 1) % 32
    assert needle_accuracy(Oracle(off), prompts, answers, batch_size=2) == {"exact_match": 0.8,
                                                                              "token_accuracy": 0.9}


def test_needle_scorer_is_the_model_greedy_continuation():
    model = _model(vocab=32, cell=("gdn2", "swa"))
    cfg = NeedleConfig(vocab_size=32, context_len=20, key_len=1, value_len=3)
    prompts, _ = make_needles(cfg, 3, seed=4)
    greedy = model.generate(prompts, max_new_tokens=3)[:, 20:]
    assert needle_accuracy(model, prompts, greedy, batch_size=2)["exact_match"] == 1.0
    sweep = needle_depth_sweep(model, cfg, depths=(0.0, 1.0), num_examples=2)
    assert list(sweep) == [0.0, 1.0] and all(0 <= s["exact_match"] <= 1 for s in sweep.values())


def test_perplexity_of_the_data_pipeline_blocks(tmp_path):
    """PackedBlocks items score as training sees them: collate_packed's cu_seqlens over the flattened batch."""
    from gdn2ts.lm.data import build_dataset, collate_packed

    (tmp_path / "a.txt").write_text("To be, or not to be.\n\nThat is the question.\n\nWhether 'tis nobler.\n")
    ds = build_dataset(paths=[str(tmp_path / "a.txt")], tokenizer="bytes", block_len=16)
    items = list(ds)
    model = _model(vocab=258)
    r = perplexity(model, items, batch_size=3)
    total = count = 0
    for i in range(0, len(items), 3):
        batch = collate_packed(items[i:i + 3])
        logits, _ = model(batch["input_ids"].reshape(1, -1), cu_seqlens=batch["cu_seqlens"])
        labels = batch["labels"].reshape(-1)
        total += F.cross_entropy(logits[0], labels, ignore_index=-100, reduction="sum").item()
        count += int((labels != -100).sum())
    assert r.tokens == count and math.isclose(r.nll * r.tokens, total, rel_tol=1e-10)
