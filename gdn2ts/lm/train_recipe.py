"""LM training recipes (``tasks/lm/train/*.yaml``): a model recipe of ``tasks/lm/`` by name, the data, the optimizer
and the trainer settings, each a typed frozen section; and the run they describe.

A recipe::

    model: tiny_gdn2            # a name in tasks/lm/ or a YAML path
    vocab_size: 258             # optional: replaces the model recipe's vocabulary (the byte tokenizer has 258)
    data: {source: text, paths: [../shared/data/text/tinyshakespeare.txt], tokenizer: bytes, block_len: 128}
    optim: {lr: 3.0e-3, warmup_steps: 10}
    train: {batch_size: 8, max_steps: 200}
    out: runs/lm/tiny
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from gdn2ts.lm.optim import OptimConfig
from gdn2ts.lm.recipes import load_recipe
from gdn2ts.lm.train_config import TrainConfig
from gdn2ts.models.lm_config import LMConfig
from gdn2ts.models.typed_yaml import load_typed

__all__ = ["TRAIN_RECIPE_DIR", "DataConfig", "TrainRecipe", "build_data", "list_train_recipes", "load_train_recipe",
           "model_config", "run_recipe"]

TRAIN_RECIPE_DIR = Path(__file__).resolve().parents[2] / "tasks" / "lm" / "train"
SOURCES = ("text", "jsonl", "parquet", "fineweb-edu")


def _fail(cls: str, name: str, expected: str, got: object) -> None:
    raise ValueError(f"{cls}: field '{name}' expected {expected}, got {got!r}")


@dataclass(frozen=True)
class DataConfig:
    """Where the documents come from, how they are tokenized and packed, and which are held out.

    Example:
        >>> DataConfig(paths=["a.txt"], tokenizer="bytes", block_len=64).paths
        ('a.txt',)
    """

    source: str = "text"
    """``text`` (plain text files), ``jsonl`` (JSON lines), ``parquet`` or ``fineweb-edu`` (the public dataset)."""
    paths: tuple[str, ...] = ()
    """Files or globs of a ``text`` / ``jsonl`` / ``parquet`` source (relative to the working directory)."""
    text_split: str = "blank_lines"
    """``text``: one document per paragraph (``blank_lines``) or per file (``file``)."""
    field: str = "text"
    """``jsonl``: the string field of each line; ``parquet``: the string column."""
    fineweb_config: str = "sample-10BT"
    """``fineweb-edu``: the dataset config (``sample-10BT``, ``sample-100BT``, ... or a dump ``CC-MAIN-YYYY-WW``)."""
    fineweb_shards: int | None = None
    """``fineweb-edu``: read only the first shards (None: all)."""
    fineweb_root: str | None = None
    """``fineweb-edu``: a local copy of the dataset repository instead of the Hub."""
    tokenizer: str = "mistral"
    """``mistral`` (the 32,000-token SentencePiece model), ``bytes``, or a SentencePiece model file."""
    block_len: int = 2048
    """Tokens per training row ``T``."""
    bos: bool = False
    """Prefix every document with BOS (documents always end with EOS)."""
    holdout: float = 0.01
    """Fraction of documents held out (by a hash of their text) for validation perplexity; 0: no validation."""
    cache: str | None = None
    """A token cache file (``gdn2ts.lm.token_cache``): read when it exists, else written first from the source."""

    def __post_init__(self):
        paths = self.paths
        if isinstance(paths, (list, str)):
            # YAML gives a list (or one string); stored as a tuple so that the config stays hashable
            paths = (paths,) if isinstance(paths, str) else tuple(paths)
            object.__setattr__(self, "paths", paths)
        if self.source not in SOURCES:
            _fail("DataConfig", "source", f"one of {SOURCES}", self.source)
        if self.source != "fineweb-edu" and not paths:
            _fail("DataConfig", "paths", f"at least one file or glob for source {self.source!r}", self.paths)
        if self.text_split not in ("blank_lines", "file"):
            _fail("DataConfig", "text_split", "'blank_lines' or 'file'", self.text_split)
        if isinstance(self.block_len, bool) or not isinstance(self.block_len, int) or self.block_len < 1:
            _fail("DataConfig", "block_len", "an int >= 1", self.block_len)
        h = self.holdout
        if isinstance(h, bool) or not isinstance(h, (int, float)) or not 0 <= h < 1:
            _fail("DataConfig", "holdout", "a fraction in [0, 1)", h)


@dataclass(frozen=True)
class TrainRecipe:
    """One training run: model, data, optimizer, trainer settings and output folder."""

    model: str
    """A model recipe: a name in ``tasks/lm/`` (``small_gdn2``) or a YAML path."""
    data: DataConfig
    """The data."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and the schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Devices, precision, strategy, batch, length, logging, checkpoints."""
    vocab_size: int | None = None
    """Replaces the model recipe's vocabulary size (None: keep it); must cover the tokenizer's."""
    out: str = "runs/lm"
    """Output folder: ``last.ckpt``, ``logs/version_<n>/metrics.csv``, ``summary.json``."""


def list_train_recipes() -> list[str]:
    """Names (file stems) of the training recipes in :data:`TRAIN_RECIPE_DIR`, sorted.

    Example:
        >>> "tiny_shakespeare" in list_train_recipes()
        True
    """
    return sorted(p.stem for p in TRAIN_RECIPE_DIR.glob("*.yaml"))


def load_train_recipe(recipe: str | Path) -> TrainRecipe:
    """The :class:`TrainRecipe` of a name in :data:`TRAIN_RECIPE_DIR` or of a YAML path, read by the parser of
    ``gdn2ts lm train --config`` (:func:`~gdn2ts.models.typed_yaml.load_typed`): an unknown or missing field, a
    value of the wrong type or one a section's checks refuse is a ValueError naming it and the file.

    Example:
        >>> r = load_train_recipe("tiny_shakespeare")
        >>> r.model, r.data.tokenizer, r.train.max_steps
        ('tiny_gdn2', 'bytes', 40)
    """
    path = Path(recipe)
    if path.suffix not in (".yaml", ".yml"):
        path = TRAIN_RECIPE_DIR / f"{recipe}.yaml"
    if not path.is_file():
        raise ValueError(f"load_train_recipe: argument 'recipe' expected a YAML path or one of "
                         f"{list_train_recipes()}, got {str(recipe)!r}")
    return load_typed(TrainRecipe, path, "load_train_recipe: recipe")


def model_config(recipe: TrainRecipe, tokenizer_vocab: int | None = None) -> LMConfig:
    """The recipe's :class:`LMConfig` with ``vocab_size`` replaced when the recipe sets it; a vocabulary smaller
    than the tokenizer's is a ValueError."""
    cfg = load_recipe(recipe.model)
    if recipe.vocab_size is not None:
        cfg = dataclasses.replace(cfg, vocab_size=recipe.vocab_size)
    if tokenizer_vocab is not None and cfg.vocab_size < tokenizer_vocab:
        raise ValueError(f"TrainRecipe: model {recipe.model!r} has vocab_size {cfg.vocab_size}, the tokenizer "
                         f"{recipe.data.tokenizer!r} has {tokenizer_vocab} tokens; set vocab_size >= {tokenizer_vocab}")
    return cfg


def build_data(data: DataConfig):
    """``(train_blocks, val_blocks or None, tokenizer)``: :func:`~gdn2ts.lm.data.build_dataset` over the source,
    the training split repeating endlessly, the validation split (``holdout > 0``) one pass."""
    from gdn2ts.lm.data import build_dataset
    from gdn2ts.lm.tokenizer import load_tokenizer

    values = dataclasses.asdict(data)
    values["paths"] = list(data.paths)
    train = build_dataset(**values, split="train" if data.holdout > 0 else "all", repeat=True)
    val = build_dataset(**values, split="val") if data.holdout > 0 else None
    return train, val, load_tokenizer(data.tokenizer)


def run_recipe(recipe: TrainRecipe, resume: str | None = None, quiet: bool = False) -> dict:
    """Train as ``recipe`` says (``resume``: a checkpoint, or ``"auto"`` for ``out/last.ckpt`` when present);
    returns the run's summary (:func:`~gdn2ts.lm.train.fit_lm`)."""
    from gdn2ts.lm.train import fit_lm

    train_data, val_data, tok = build_data(recipe.data)
    cfg = model_config(recipe, tok.vocab_size)
    meta = {"data": dataclasses.asdict(recipe.data), "recipe": recipe.model}
    return fit_lm(cfg, train_data, recipe.optim, recipe.train, recipe.out, val_data=val_data, resume=resume,
                  block_len=recipe.data.block_len, meta=meta, quiet=quiet)
