"""Tokenizers for the LM data pipeline: the paper's 32,000-token Llama-style SentencePiece model and a byte-level
tokenizer for tiny CPU runs, behind one :class:`Tokenizer` protocol.

The 32k model is the ``tokenizer.model.v1`` file that the ``mistral-common`` wheel ships (a Llama-style
SentencePiece BPE model: byte fallback, ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2). It is found on disk through the
package's import spec, without importing ``mistral_common`` (whose import pulls in pydantic and more), and read
with ``sentencepiece``. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Protocol, runtime_checkable

__all__ = ["ByteTokenizer", "SentencePieceTokenizer", "Tokenizer", "encode_all", "load_tokenizer", "mistral_model_path"]


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer.

    ``encode`` adds no special tokens (the packer adds BOS/EOS); ``decode`` drops special tokens. A tokenizer may
    also have ``encode_batch(texts) -> list[list[int]]`` for speed (:func:`encode_all` uses it when present).
    """

    vocab_size: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def encode_all(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text: the tokenizer's ``encode_batch`` when it has one, else ``encode`` per text.

    Example:
        >>> encode_all(ByteTokenizer(), ["a", "bc"])
        [[97], [98, 99]]
    """
    batch = getattr(tokenizer, "encode_batch", None)
    return batch(texts) if batch is not None else [tokenizer.encode(t) for t in texts]


class ByteTokenizer:
    """UTF-8 bytes as tokens ``0..255``, then BOS ``256`` and EOS ``257`` (``vocab_size`` 258).

    Example:
        >>> tok = ByteTokenizer()
        >>> tok.encode("hé"), tok.vocab_size, tok.bos_id, tok.eos_id
        ([104, 195, 169], 258, 256, 257)
        >>> tok.decode([256, 104, 195, 169, 257])
        'hé'
    """

    vocab_size = 258
    bos_id = 256
    eos_id = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: list[int]) -> str:
        # A cut in the middle of a multi-byte character (a sampled continuation) decodes to U+FFFD, not an error.
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class SentencePieceTokenizer:
    """A SentencePiece model file (``.model``) through the ``sentencepiece`` package.

    Args:
        path: the model file.

    Example:
        >>> tok = SentencePieceTokenizer(mistral_model_path())
        >>> tok.vocab_size, tok.bos_id, tok.eos_id
        (32000, 1, 2)
        >>> tok.decode(tok.encode("Gated DeltaNet-2"))
        'Gated DeltaNet-2'
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"SentencePieceTokenizer: argument 'path' expected an existing SentencePiece model "
                             f"file, got {str(path)!r} (no such file)")
        import sentencepiece

        self.path = path
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as err:
            raise ValueError(f"SentencePieceTokenizer: argument 'path' expected a SentencePiece model file, "
                             f"got {str(path)!r} ({err})") from err
        self.vocab_size = int(self._sp.vocab_size())
        self.bos_id = int(self._sp.bos_id())
        self.eos_id = int(self._sp.eos_id())
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"SentencePieceTokenizer: model {str(path)!r} expected BOS and EOS pieces, got "
                             f"bos_id={self.bos_id}, eos_id={self.eos_id}")

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # One call over the list runs the encoder in C++ without a Python round trip per document.
        return self._sp.encode(list(texts)) if texts else []

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def __getstate__(self):
        # The C++ processor does not pickle; DataLoader workers started by spawn reload the file.
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r})"


def mistral_model_path() -> Path:
    """Path of the 32,000-token SentencePiece model shipped in the installed ``mistral-common`` wheel.

    Example:
        >>> mistral_model_path().name
        'tokenizer.model.v1'
    """
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("load_tokenizer: name 'mistral' expected the mistral-common package to be installed "
                         "(pip install mistral-common==1.13.1), found no such package")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise ValueError(f"load_tokenizer: name 'mistral' expected the SentencePiece file {str(path)!r} in the "
                         f"mistral-common package, found no such file")
    return path


def load_tokenizer(name_or_path: str | Path) -> Tokenizer:
    """A tokenizer by name (``"mistral"``: the 32k SentencePiece model; ``"bytes"``: :class:`ByteTokenizer`) or
    by the path of a SentencePiece ``.model`` file.

    Example:
        >>> load_tokenizer("bytes").vocab_size, load_tokenizer("mistral").vocab_size
        (258, 32000)
    """
    if isinstance(name_or_path, str) and name_or_path == "bytes":
        return ByteTokenizer()
    if isinstance(name_or_path, str) and name_or_path == "mistral":
        return SentencePieceTokenizer(mistral_model_path())
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"load_tokenizer: argument 'name_or_path' expected 'mistral', 'bytes' or the path of a "
                         f"SentencePiece model file, got {str(name_or_path)!r} (no such file)")
    return SentencePieceTokenizer(path)
