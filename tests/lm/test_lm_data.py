"""LM data pipeline: the packing rule, cu_seqlens for CausalLM, exact resume, disjoint shares, split, errors."""

from __future__ import annotations

import dataclasses
import io
import random
from itertools import islice

import pytest
import torch

from gdn2ts.lm import CausalLM, load_recipe
from gdn2ts.lm.data import PackedBlocks, collate_packed, in_holdout
from gdn2ts.lm.sources import Documents
from gdn2ts.lm.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def _corpus(n=40, seed=0) -> list[str]:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "é", "ünï", "x"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(0, 12))) for _ in range(n)]


def _reference_blocks(docs, block_len, bos=False):
    """The packing rule written plainly: one stream of [BOS] doc EOS, cut every block_len + 1 tokens."""
    stream, starts = [], []
    for d in docs:
        starts.append(len(stream))
        stream += ([TOK.bos_id] if bos else []) + TOK.encode(d) + [TOK.eos_id]
    size = block_len + 1
    out = []
    for b in range(len(stream) // size):
        lo = b * size
        block = stream[lo:lo + size]
        ds = sorted({0} | {s - lo for s in starts if lo <= s < lo + block_len})
        out.append((block[:-1], block[1:], ds))
    return out


@pytest.mark.parametrize("block_len", [1, 3, 7, 64])
@pytest.mark.parametrize("bos", [False, True])
def test_blocks_follow_the_packing_rule(block_len, bos):
    docs = _corpus()
    got = [(b["input_ids"].tolist(), b["labels"].tolist(), b["doc_starts"].tolist())
           for b in PackedBlocks(Documents(docs), TOK, block_len, bos=bos)]
    assert got == _reference_blocks(docs, block_len, bos)
    assert len(got) > 0


def test_collate_cu_seqlens_matches_per_document_forward():
    """A packed batch through CausalLM with cu_seqlens equals running every document piece on its own."""
    cfg = dataclasses.replace(load_recipe("tiny_gdn2"), vocab_size=TOK.vocab_size, cell=("gdn2", "swa"), window=4)
    torch.manual_seed(0)
    model = CausalLM(cfg).double().eval()
    items = list(PackedBlocks(Documents(_corpus(12)), TOK, block_len=16))[:3]
    batch = collate_packed(items)
    B, T = batch["input_ids"].shape
    cu = batch["cu_seqlens"]
    assert (B, T) == (3, 16) and cu.dtype == torch.int32 and int(cu[0]) == 0 and int(cu[-1]) == B * T
    assert set(range(0, B * T, T)) <= set(cu.tolist())
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
    flat = batch["input_ids"].reshape(1, -1)
    with torch.no_grad():
        packed, _ = model(flat, cu_seqlens=cu)
        for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
            alone, _ = model(flat[:, lo:hi])
            torch.testing.assert_close(packed[:, lo:hi], alone, rtol=0, atol=1e-10)


@pytest.mark.parametrize("repeat", [False, True])
def test_resume_gives_the_uninterrupted_blocks(repeat):
    """Stop after k blocks, save the state (weights_only-safe), rebuild, load: the rest equals the straight run."""
    docs = _corpus(30, seed=1)
    straight = [b["input_ids"] for b in islice(PackedBlocks(Documents(docs), TOK, 9, repeat=repeat), 60)]
    for k in (0, 1, 5, 17, len(straight) - 1):
        first = PackedBlocks(Documents(docs), TOK, 9, repeat=repeat)
        assert len(list(islice(first, k))) == k
        buf = io.BytesIO()
        torch.save(first.state_dict(), buf)
        buf.seek(0)
        resumed = PackedBlocks(Documents(docs), TOK, 9, repeat=repeat)
        resumed.load_state_dict(torch.load(buf, weights_only=True))
        rest = [b["input_ids"] for b in islice(resumed, len(straight) - k)]
        assert len(rest) == len(straight) - k
        for a, b in zip(rest, straight[k:], strict=True):
            assert torch.equal(a, b)


def test_a_finished_pass_starts_over_a_stopped_one_continues():
    ds = PackedBlocks(Documents(_corpus(10)), TOK, 5)
    every = [b["input_ids"] for b in ds]
    assert ds.state_dict()["positions"] == [[0, 0, 0]]
    again = [b["input_ids"] for b in ds]
    assert len(again) == len(every) and all(torch.equal(a, b) for a, b in zip(again, every, strict=True))
    assert len(list(islice(ds, 2))) == 2
    assert torch.equal(next(iter(ds))["input_ids"], every[2])
    ds.reset()
    assert torch.equal(next(iter(ds))["input_ids"], every[0])
    ds.reset()
    assert len(list(ds)) == len(every)  # a whole pass in the main process (one share) ...
    assert len(list(ds.loader(batch_size=1, num_workers=2))) > 0  # ... does not tie the dataset to one share


def test_repeat_continues_into_the_next_pass():
    docs = ["abcd", "ef"]
    blocks = [b["input_ids"].tolist() for b in islice(PackedBlocks(Documents(docs), TOK, 3, repeat=True), 4)]
    stream = (TOK.encode("abcd") + [257] + TOK.encode("ef") + [257]) * 3
    assert blocks == [stream[i * 4:i * 4 + 3] for i in range(4)]


def _stream(blocks) -> list[int]:
    """The packed token stream back from blocks: each block's inputs and its last label."""
    return [t for b in blocks for t in b["input_ids"].tolist() + b["labels"][-1:].tolist()]


def _doc_stream(docs) -> list[int]:
    return [t for d in docs for t in TOK.encode(d) + [TOK.eos_id]]


def test_ranks_and_workers_take_disjoint_deterministic_shares():
    """Share s of S packs documents s, s + S, ...; two DataLoader workers give shares 0/1 of 2, interleaved."""
    docs = [f"document number {i}" for i in range(21)]
    for world in (1, 2, 3):
        for rank in range(world):
            got = _stream(PackedBlocks(Documents(docs), TOK, 1, rank=rank, world_size=world))
            want = _doc_stream(docs[rank::world])
            assert got == want[:len(want) // 2 * 2]
    share0 = list(PackedBlocks(Documents(docs), TOK, 5, rank=0, world_size=2))
    share1 = list(PackedBlocks(Documents(docs), TOK, 5, rank=1, world_size=2))
    ds = PackedBlocks(Documents(docs), TOK, 5)
    got = [batch["input_ids"][0] for batch in ds.loader(batch_size=1, num_workers=2)]
    n = min(len(share0), len(share1))
    want = [x["input_ids"] for pair in zip(share0[:n], share1[:n], strict=True) for x in pair]
    want += [x["input_ids"] for x in share0[n:] + share1[n:]]
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_resume_with_workers_through_loader():
    docs = _corpus(50, seed=2)
    straight = [b["input_ids"] for b in PackedBlocks(Documents(docs), TOK, 8).loader(batch_size=2, num_workers=2)]
    ds = PackedBlocks(Documents(docs), TOK, 8)
    first = [b["input_ids"] for b in islice(ds.loader(batch_size=2, num_workers=2), 5)]
    state = ds.state_dict()
    assert state["shares"] == 2 and state["share_ids"] == [0, 1]
    resumed = PackedBlocks(Documents(docs), TOK, 8)
    resumed.load_state_dict(state)
    with pytest.raises(ValueError, match="saved with 2 shares"):
        next(iter(resumed))  # in the main process: one share, not the two saved
    rest = [b["input_ids"] for b in resumed.loader(batch_size=2, num_workers=2)]
    assert len(first) + len(rest) == len(straight)
    for a, b in zip(first + rest, straight, strict=True):
        assert torch.equal(a, b)


def test_holdout_split_is_disjoint_and_covers_the_corpus():
    docs = [f"doc {i}" for i in range(400)]
    val = [d for d in docs if in_holdout(d, 0.1)]
    assert 15 < len(val) < 70
    for split, part in (("val", val), ("train", [d for d in docs if d not in val])):
        got = _stream(PackedBlocks(Documents(docs), TOK, 1, split=split, holdout=0.1))
        want = _doc_stream(part)
        assert got == want[:len(want) // 2 * 2]


def test_bad_input_names_the_problem():
    docs = Documents(["abc"])
    with pytest.raises(ValueError, match="block_len"):
        PackedBlocks(docs, TOK, 0)
    with pytest.raises(ValueError, match="split"):
        PackedBlocks(docs, TOK, 4, split="test")
    with pytest.raises(ValueError, match="holdout"):
        PackedBlocks(docs, TOK, 4, split="val")
    with pytest.raises(ValueError, match="empty corpus"):
        list(PackedBlocks(Documents([]), TOK, 4))
    with pytest.raises(ValueError, match="empty corpus"):
        list(PackedBlocks(Documents(["a"]), TOK, 4, rank=1, world_size=2, repeat=True))
    ds = PackedBlocks(docs, TOK, 4)
    before = ds.state_dict()
    with pytest.raises(ValueError, match="block_len 4"):
        ds.load_state_dict({**before, "block_len": 8})
    with pytest.raises(ValueError, match="state_dict"):
        ds.load_state_dict({"positions": []})
    assert ds.state_dict() == before
    with pytest.raises(ValueError, match="at least one block"):
        collate_packed([])
    with pytest.raises(ValueError, match="doc_starts"):
        collate_packed([{"input_ids": torch.zeros(4, dtype=torch.long), "labels": torch.zeros(4, dtype=torch.long),
                         "doc_starts": torch.tensor([1])}])


class _Chars:
    """A tokenizer of the bare protocol (no encode_batch): one token per character of a small alphabet."""

    alphabet = "abcdefghij "
    vocab_size, bos_id, eos_id = len(alphabet) + 2, len(alphabet), len(alphabet) + 1

    def encode(self, text):
        return [self.alphabet.index(c) for c in text]

    def decode(self, ids):
        return "".join(self.alphabet[i] for i in ids if i < len(self.alphabet))


def test_a_tokenizer_without_encode_batch_packs_the_same_stream():
    docs = ["abc def", "", "ghij", "a b c"]
    got = _stream(PackedBlocks(Documents(docs), _Chars(), 2, bos=True))
    want = [t for d in docs for t in [_Chars.bos_id, *_Chars().encode(d), _Chars.eos_id]]
    assert got == want[:len(want) // 3 * 3]
