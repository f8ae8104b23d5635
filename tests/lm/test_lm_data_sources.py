"""LM data sources, tokenizers and the token cache: local files of each format, FineWeb-Edu's layout and listing,
the 32k SentencePiece model, cache == text, tinyshakespeare packing time, named errors."""

from __future__ import annotations

import io
import json
import pickle
import time
import urllib.error
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import safetensors.numpy
import torch

from gdn2ts.lm.data import PackedBlocks, build_dataset
from gdn2ts.lm.sources import (
    JsonLines,
    ParquetFiles,
    TextFiles,
    build_source,
    expand_paths,
    fineweb_edu,
    list_hf_files,
)
from gdn2ts.lm.token_cache import TokenCache, write_token_cache
from gdn2ts.lm.tokenizer import ByteTokenizer, SentencePieceTokenizer, load_tokenizer

SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "text" / "tinyshakespeare.txt"
DOCS = ["First document.", "", "Second one, with ünïcode.", "Third\nhas two lines."]


def _write_fineweb(root: Path, folder: str, shards: list[list[str]]) -> None:
    """Shards with FineWeb-Edu's schema (text plus metadata columns)."""
    (root / folder).mkdir(parents=True)
    n = 0
    for i, texts in enumerate(shards):
        pl.DataFrame({"text": texts, "id": [f"<urn:uuid:{n + j}>" for j in range(len(texts))],
                      "dump": ["CC-MAIN-2024-10"] * len(texts), "url": ["https://example.org"] * len(texts),
                      "language": ["en"] * len(texts), "score": [3.2] * len(texts),
                      "int_score": [3] * len(texts), "token_count": [len(t) for t in texts]},
                     ).write_parquet(root / folder / f"{i:03d}_00000.parquet", row_group_size=2)
        n += len(texts)


def test_every_format_gives_the_same_documents_in_order(tmp_path):
    (tmp_path / "t").mkdir()
    for i, d in enumerate(DOCS):
        (tmp_path / "t" / f"{i}.txt").write_text(d)
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": d, "n": i}) for i, d in enumerate(DOCS)) + "\n\n")
    pl.DataFrame({"text": DOCS[:2]}).write_parquet(tmp_path / "p0.parquet")
    pl.DataFrame({"text": DOCS[2:], "other": [1, 2]}).write_parquet(tmp_path / "p1.parquet")
    sources = [TextFiles(str(tmp_path / "t" / "*.txt")), JsonLines(tmp_path / "d.jsonl"),
               ParquetFiles(str(tmp_path / "p*.parquet"), batch_rows=1)]
    for src in sources:
        assert list(src.documents()) == DOCS
        for start in range(len(DOCS) + 1):
            assert list(src.documents(start)) == DOCS[start:]


def test_blank_line_split_rule(tmp_path):
    (tmp_path / "a.txt").write_text("\n\nPara one\nline 2\n\n\n \t\nPara two\r\n\r\nPara three\n")
    (tmp_path / "b.txt").write_text("Next file")
    src = TextFiles([tmp_path / "a.txt", tmp_path / "b.txt"], split="blank_lines")
    assert list(src.documents()) == ["Para one\nline 2", "Para two", "Para three", "Next file"]
    assert list(src.documents(2)) == ["Para three", "Next file"]


def test_fineweb_edu_local_copy_reads_shards_in_order(tmp_path):
    _write_fineweb(tmp_path, "sample/10BT", [["a", "b", "c"], ["d"], ["e", "f"]])
    assert list(fineweb_edu("sample-10BT", root=str(tmp_path)).documents()) == list("abcdef")
    assert list(fineweb_edu("sample-10BT", root=str(tmp_path), shards=2).documents(2)) == list("cd")
    _write_fineweb(tmp_path, "data/CC-MAIN-2024-10", [["x"]])
    assert list(fineweb_edu("CC-MAIN-2024-10", root=str(tmp_path)).documents()) == ["x"]
    ds = build_dataset(source="fineweb-edu", fineweb_root=str(tmp_path), tokenizer="bytes", block_len=3)
    assert [b["input_ids"].tolist() for b in ds] == [[97, 257, 98], [99, 257, 100], [101, 257, 102]]


def test_fineweb_edu_on_the_hub_lists_pages_and_reads_hf_urls():
    pages = {"https://huggingface.co/api/datasets/HuggingFaceFW/fineweb-edu/tree/main/sample/10BT?recursive=true":
             ([{"type": "file", "path": "sample/10BT/001_00000.parquet"}], '<https://next.page/2>; rel="next"'),
             "https://next.page/2": ([{"type": "file", "path": "sample/10BT/000_00000.parquet"},
                                      {"type": "file", "path": "sample/10BT/README.md"}], "")}
    asked = []

    class Reply(io.BytesIO):
        def __init__(self, url):
            entries, link = pages[url]
            super().__init__(json.dumps(entries).encode())
            self.headers = {"Link": link}

    def opener(url, timeout):
        asked.append(url)
        return Reply(url)

    files = list_hf_files("HuggingFaceFW/fineweb-edu", "sample/10BT", opener=opener)
    assert files == ["sample/10BT/000_00000.parquet", "sample/10BT/001_00000.parquet"] and len(asked) == 2
    src = fineweb_edu("sample-10BT", shards=1, lister=lambda repo, folder: files)
    assert src.paths == ["hf://datasets/HuggingFaceFW/fineweb-edu/sample/10BT/000_00000.parquet"]
    with pytest.raises(ValueError, match="lists none"):
        fineweb_edu("sample-100BT", lister=lambda repo, folder: [])

    def offline(url, timeout):
        raise urllib.error.URLError("Name or service not known")

    with pytest.raises(ConnectionError, match="needs the network, or give fineweb_edu a local copy"):
        list_hf_files("HuggingFaceFW/fineweb-edu", "sample/10BT", opener=offline)


def test_mistral_tokenizer_is_the_32k_llama_style_model():
    tok = load_tokenizer("mistral")
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)
    text = "Gated DeltaNet-2 erases\n\tand writes: ünïcode ✓ 12345"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and max(ids) < 32000 and tok.bos_id not in ids
    assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]
    assert pickle.loads(pickle.dumps(tok)).encode(text) == ids  # DataLoader workers started by spawn


@pytest.mark.parametrize("tokenizer", ["bytes", "mistral"])
def test_token_cache_packs_the_same_blocks_as_the_text(tmp_path, tokenizer):
    docs = [f"Document {i}: " + "lorem ipsum " * (i % 7) for i in range(60)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = load_tokenizer(tokenizer)
    cache = write_token_cache(JsonLines(tmp_path / "d.jsonl"), tok, tmp_path / "c.safetensors")
    plain = safetensors.numpy.load_file(tmp_path / "c.safetensors")  # the file is standard safetensors
    assert plain["tokens"].dtype == np.uint16 and len(plain["offsets"]) == len(docs) + 1
    assert plain["tokens"][plain["offsets"][3]:plain["offsets"][4]].tolist() == tok.encode(docs[3])
    for kw in ({}, {"split": "val", "holdout": 0.2}, {"split": "train", "holdout": 0.2, "bos": True},
               {"rank": 1, "world_size": 3}):
        a = [b["input_ids"] for b in PackedBlocks(cache, tok, 7, **kw)]
        b = [b["input_ids"] for b in PackedBlocks(JsonLines(tmp_path / "d.jsonl"), tok, 7, **kw)]
        assert len(a) == len(b) > 0
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_build_dataset_reuses_its_cache_and_refuses_another_sources(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n\nthree\n")
    (tmp_path / "b.txt").write_text("other\n")
    kw = {"tokenizer": "bytes", "block_len": 2, "cache": str(tmp_path / "a.cache")}
    first = [b["input_ids"].tolist() for b in build_dataset(paths=str(tmp_path / "a.txt"), **kw)]
    mtime = (tmp_path / "a.cache").stat().st_mtime_ns
    again = build_dataset(paths=str(tmp_path / "a.txt"), **kw)
    assert isinstance(again.source, TokenCache) and (tmp_path / "a.cache").stat().st_mtime_ns == mtime
    assert [b["input_ids"].tolist() for b in again] == first
    with pytest.raises(ValueError, match="token cache of this source"):
        build_dataset(paths=str(tmp_path / "b.txt"), **kw)
    with pytest.raises(ValueError, match="same tokenizer"):
        PackedBlocks(again.source, load_tokenizer("mistral"), 4)


def test_tinyshakespeare_packs_in_seconds():
    assert SHAKESPEARE.is_file(), f"expected the shared data beside the repository at {SHAKESPEARE}"
    t0 = time.perf_counter()
    ds = build_dataset(paths=str(SHAKESPEARE), tokenizer="mistral", block_len=256, text_split="blank_lines")
    blocks = list(ds)
    seconds = time.perf_counter() - t0
    assert 1000 < len(blocks) < 2000 and seconds < 10, (len(blocks), seconds)
    assert ds.tokenizer.decode(blocks[0]["input_ids"][:4].tolist()).startswith("First Citizen")


def test_bad_input_names_the_problem(tmp_path):
    with pytest.raises(ValueError, match="'source' expected one of"):
        build_source("csv", ["x.csv"])
    with pytest.raises(ValueError, match="no such file"):
        TextFiles(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="matches none"):
        expand_paths(str(tmp_path / "*.parquet"))
    with pytest.raises(ValueError, match="at least one path"):
        JsonLines([])
    with pytest.raises(ValueError, match="'split' expected"):
        TextFiles(tmp_path, split="lines")
    with pytest.raises(ValueError, match="no such file"):
        load_tokenizer(tmp_path / "missing.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="SentencePiece model"):
        load_tokenizer(tmp_path / "bad.model")
    pl.DataFrame({"text": [1, 2]}).write_parquet(tmp_path / "ints.parquet")
    with pytest.raises(ValueError, match="to be text"):
        list(ParquetFiles(tmp_path / "ints.parquet").documents())
    with pytest.raises(ValueError, match="expected a column 'body'"):
        list(ParquetFiles(tmp_path / "ints.parquet", column="body").documents())
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(ValueError, match="d.jsonl:2 expected the field 'text' to be a string"):
        list(JsonLines(tmp_path / "d.jsonl").documents())
    (tmp_path / "e.jsonl").write_text('{"body": "ok"}\n')
    with pytest.raises(ValueError, match="e.jsonl:1 expected an object with the field 'text'"):
        list(JsonLines(tmp_path / "e.jsonl").documents())
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match="empty corpus"):
        list(build_dataset(paths=str(tmp_path / "empty.txt"), tokenizer="bytes", block_len=4))
    with pytest.raises(ValueError, match="empty corpus"):
        build_dataset(paths=str(tmp_path / "empty.txt"), tokenizer="bytes", block_len=4,
                      cache=str(tmp_path / "empty.cache"))
    assert not (tmp_path / "empty.cache").exists()
    with pytest.raises(ValueError, match="block_len"):
        build_dataset(paths=str(tmp_path / "d.jsonl"), source="jsonl", tokenizer="bytes", block_len=0)
    with pytest.raises(ValueError, match="config"):
        fineweb_edu("sample-1T")
    with pytest.raises(ValueError, match="token cache"):
        TokenCache(tmp_path / "d.jsonl")
    assert ByteTokenizer().decode([104, 195]) == "h\ufffd"


def test_gdn2ts_lm_tokenize_writes_the_cache(tmp_path, capsys):
    from gdn2ts.cli import main

    (tmp_path / "a.jsonl").write_text('{"text": "hello"}\n{"text": "world!"}\n')
    out = tmp_path / "a.safetensors"
    main(["lm", "tokenize", "--out", str(out), "--source", "jsonl", "--paths", f"[{tmp_path / 'a.jsonl'}]",
          "--tokenizer", "bytes"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["documents"], summary["tokens"]) == (2, 11)
    cache = TokenCache(out)
    assert [ids.tolist() for _, _, ids in cache.token_documents()] == [list(b"hello"), list(b"world!")]
