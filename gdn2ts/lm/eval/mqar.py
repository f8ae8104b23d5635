"""Multi-query associative recall (MQAR): key-value pairs, then queries of some of the keys; the model must answer
each query with its key's value.

One sequence of ``seq_len`` tokens:

    k_1 v_1 k_2 v_2 ... k_P v_P | 0 ... 0 k_a 0 ... 0 k_b 0 ...
    '---- 2 * num_pairs ------' '---- queries in the rest ----'

Token ``0`` is the filler. Keys come from ``[1, 1 + n_keys)`` and values from ``[1 + n_keys, vocab_size)`` with
``n_keys = (vocab_size - 1) // 2``; the keys of one sequence are distinct, and so are its values. ``num_queries``
distinct keys of the pairs are asked, in random order, each at a random even offset of the query region (so the
token after a query is never another query): uniform over the offsets, or with ``query_power`` ``a`` the Zoology
study's power law, offset ``i`` (0-based, in pairs of tokens) drawn with weight ``(i + 1) ** (a - 1)`` without
replacement, so that most queries come soon after the pairs. With ``filler="random"`` each token of the query
region that is not a query is a uniform draw from the whole vocabulary instead of ``0`` (the Zoology generator's
default: noise that a recurrent state takes in too). The label at a query's position is its value (the next-token
prediction there); every other label is ``-100``. Sequences are a pure function of the config and the seed (or
the state of the ``torch.Generator`` given).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["IGNORE_INDEX", "MQARConfig", "make_mqar", "mqar_accuracy", "evaluate_mqar"]

IGNORE_INDEX = -100


def _positive_int(owner: str, name: str, value: object, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}: field '{name}' expected an int >= {low}, got {value!r}")


@dataclass(frozen=True)
class MQARConfig:
    """One MQAR difficulty level.

    Example:
        >>> cfg = MQARConfig(vocab_size=64, num_pairs=4, seq_len=24, num_queries=3)
        >>> cfg.n_keys, cfg.query_slots, cfg.label
        (31, 8, '4 pairs / 24 tokens')
    """

    vocab_size: int = 8192
    """Tokens: the filler ``0``, then ``(vocab_size - 1) // 2`` key tokens, then the value tokens."""
    num_pairs: int = 16
    """Key-value pairs ``P`` at the start of every sequence (the memory load)."""
    seq_len: int = 128
    """Tokens per sequence ``T`` (at least ``2 * num_pairs + 2 * num_queries``)."""
    num_queries: int | None = None
    """Keys asked per sequence, at most ``num_pairs`` (None: every pair is asked once)."""
    name: str | None = None
    """Label of the level in tables and plots (None: ``"<P> pairs / <T> tokens"``)."""
    query_power: float | None = None
    """Placement of the queries: None, uniform over the query slots; ``a`` in (0, 1], slot ``i`` (0-based) weighted
    ``(i + 1) ** (a - 1)`` (the Zoology study's power law, ``a = 0.01``: mostly near the pairs; 1 is uniform)."""
    filler: str = "zero"
    """The tokens of the query region that are not queries: ``zero`` (token 0) or ``random`` (uniform over the
    vocabulary, keys and values included)."""

    def __post_init__(self):
        owner = "MQARConfig"
        _positive_int(owner, "vocab_size", self.vocab_size, 5)
        _positive_int(owner, "num_pairs", self.num_pairs)
        _positive_int(owner, "seq_len", self.seq_len, 2)
        q = self.queries
        if self.num_queries is not None:
            _positive_int(owner, "num_queries", self.num_queries)
            if self.num_queries > self.num_pairs:
                raise ValueError(f"{owner}: field 'num_queries' expected at most num_pairs={self.num_pairs}, "
                                 f"got {self.num_queries}")
        if self.n_keys < self.num_pairs or self.vocab_size - 1 - self.n_keys < self.num_pairs:
            need = 2 * self.num_pairs + 1
            raise ValueError(f"{owner}: field 'vocab_size' expected at least {need} (the filler and "
                             f"{self.num_pairs} distinct keys and values), got {self.vocab_size}")
        if self.query_slots < q:
            raise ValueError(f"{owner}: field 'seq_len' expected at least {2 * self.num_pairs + 2 * q} "
                             f"(2 * num_pairs + 2 * num_queries), got {self.seq_len}")
        if self.name is not None and (not isinstance(self.name, str) or not self.name):
            raise ValueError(f"{owner}: field 'name' expected None or a non-empty string, got {self.name!r}")
        a = self.query_power
        if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 < a <= 1):
            raise ValueError(f"{owner}: field 'query_power' expected None or a float in (0, 1], got {a!r}")
        if self.filler not in ("zero", "random"):
            raise ValueError(f"{owner}: field 'filler' expected 'zero' or 'random', got {self.filler!r}")

    @property
    def queries(self) -> int:
        """Queries per sequence: ``num_queries`` or ``num_pairs``."""
        return self.num_pairs if self.num_queries is None else self.num_queries

    @property
    def n_keys(self) -> int:
        """Key tokens ``[1, 1 + n_keys)``; values are ``[1 + n_keys, vocab_size)``."""
        return (self.vocab_size - 1) // 2

    @property
    def query_slots(self) -> int:
        """Even offsets of the query region where a query may stand: ``(seq_len - 2 * num_pairs) // 2``."""
        return (self.seq_len - 2 * self.num_pairs) // 2

    @property
    def label(self) -> str:
        """``name``, or ``"<P> pairs / <T> tokens"``."""
        return self.name or f"{self.num_pairs} pairs / {self.seq_len} tokens"


def _distinct(n: int, high: int, k: int, generator: torch.Generator, device) -> torch.Tensor:
    """``[n, k]`` rows of ``k`` distinct ints in ``[0, high)``, each row a uniform random k-subset in random order."""
    # the k largest of ``high`` uniforms pick a uniform k-subset; topk's order is by value, itself random
    return torch.rand(n, high, generator=generator, device=device).topk(k, dim=1).indices


def make_mqar(config: MQARConfig, num_examples: int, seed: int | torch.Generator = 0, device=None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_examples`` MQAR sequences: ``(input_ids [N, T], labels [N, T])``, int64, labels ``-100`` except at
    the query positions.

    ``seed`` is an int (a fresh generator on ``device``) or a ``torch.Generator`` (on ``device``) whose state
    advances, for a stream of fresh training batches. The same seed gives the same sequences on the same device
    type; CPU and CUDA generators differ.

    Example:
        >>> cfg = MQARConfig(vocab_size=21, num_pairs=3, seq_len=14, num_queries=2)
        >>> ids, labels = make_mqar(cfg, 2, seed=0)
        >>> ids.shape, int((labels != -100).sum(1).max())
        (torch.Size([2, 14]), 2)
        >>> q = labels[0] != -100                      # the answer of every query is its key's value
        >>> pairs = dict(zip(ids[0, 0:6:2].tolist(), ids[0, 1:6:2].tolist()))
        >>> all(pairs[k] == v for k, v in zip(ids[0][q].tolist(), labels[0][q].tolist()))
        True
        >>> bool(torch.equal(make_mqar(cfg, 2, seed=0)[0], ids))
        True
    """
    if not isinstance(config, MQARConfig):
        raise ValueError(f"make_mqar: argument 'config' expected an MQARConfig, got {type(config).__name__}")
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"make_mqar: argument 'num_examples' expected an int >= 1, got {num_examples!r}")
    if isinstance(seed, torch.Generator):
        gen = seed
        device = gen.device if device is None else torch.device(device)
        if device.type != gen.device.type:
            raise ValueError(f"make_mqar: argument 'seed' expected a generator on {device}, got one on {gen.device}")
    elif isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0:
        device = torch.device("cpu" if device is None else device)
        gen = torch.Generator(device=device).manual_seed(seed)
    else:
        raise ValueError(f"make_mqar: argument 'seed' expected an int >= 0 or a torch.Generator, got {seed!r}")

    n, P, T, Q = num_examples, config.num_pairs, config.seq_len, config.queries
    keys = _distinct(n, config.n_keys, P, gen, device) + 1
    values = _distinct(n, config.vocab_size - 1 - config.n_keys, P, gen, device) + 1 + config.n_keys
    ids = torch.zeros(n, T, dtype=torch.long, device=device)
    ids[:, 0:2 * P:2] = keys
    ids[:, 1:2 * P:2] = values
    asked = _distinct(n, P, Q, gen, device)
    if config.query_power is None:
        slots = _distinct(n, config.query_slots, Q, gen, device).sort(dim=1).values
    else:
        # the asked keys are in random order already, so the slots may stay in the order they were drawn
        rank = torch.arange(1, config.query_slots + 1, dtype=torch.float64, device=device)
        weights = rank.pow(config.query_power - 1).expand(n, -1)
        slots = torch.multinomial(weights, Q, replacement=False, generator=gen)
    pos = 2 * P + 2 * slots
    ids.scatter_(1, pos, keys.gather(1, asked))
    labels = torch.full((n, T), IGNORE_INDEX, dtype=torch.long, device=device)
    labels.scatter_(1, pos, values.gather(1, asked))
    if config.filler == "random":
        noise = torch.randint(0, config.vocab_size, (n, T), generator=gen, device=device)
        rest = torch.ones(n, T, dtype=torch.bool, device=device)
        rest[:, :2 * P] = False
        rest.scatter_(1, pos, False)
        ids = torch.where(rest, noise, ids)
    return ids, labels


def mqar_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """``(correct, answered)``: the argmax of ``logits`` ``[N, T, vocab]`` against ``labels`` ``[N, T]`` at the
    positions whose label is not ``-100``.

    Example:
        >>> logits = torch.zeros(1, 3, 4); logits[0, 0, 2] = 1; logits[0, 2, 1] = 1
        >>> mqar_accuracy(logits, torch.tensor([[2, -100, 3]]))
        (1, 2)
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"mqar_accuracy: argument 'logits' expected a tensor [N, T, vocab], got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(logits.shape[:2]):
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"mqar_accuracy: argument 'labels' expected shape {tuple(logits.shape[:2])}, got {got}")
    mask = labels != IGNORE_INDEX
    correct = (logits.argmax(-1) == labels) & mask
    return int(correct.sum()), int(mask.sum())


@torch.no_grad()
def evaluate_mqar(model, input_ids: torch.Tensor, labels: torch.Tensor, batch_size: int = 64,
                  autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Accuracy of a causal LM (``model(ids) -> (logits, state)``) on MQAR sequences, in eval mode, batched:
    ``{"accuracy": answers right / answers, "sequence_accuracy": sequences with every answer right / sequences,
    "loss": mean cross-entropy at the answers}``. The model's train/eval mode is restored afterwards.

    Example:
        >>> from gdn2ts.models.lm import CausalLM
        >>> from gdn2ts.models.lm_config import LMConfig
        >>> cfg = MQARConfig(vocab_size=21, num_pairs=3, seq_len=14)
        >>> model = CausalLM(LMConfig(vocab_size=21, hidden_size=16, num_cells=1, intermediate_size=32,
        ...                           num_heads=2, head_k_dim=8, head_v_dim=8, gate_low_rank=4))
        >>> r = evaluate_mqar(model, *make_mqar(cfg, 4, seed=1), batch_size=3)
        >>> sorted(r), 0 <= r["accuracy"] <= 1
        (['accuracy', 'loss', 'sequence_accuracy'], True)
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or not isinstance(labels, torch.Tensor) \
            or labels.shape != input_ids.shape:
        raise ValueError("evaluate_mqar: arguments 'input_ids' and 'labels' expected two tensors [N, T] of one "
                         "shape (from make_mqar)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"evaluate_mqar: argument 'batch_size' expected an int >= 1, got {batch_size!r}")
    was_training = model.training
    model.eval()
    correct = answered = full = 0
    loss_sum = 0.0
    try:
        for i in range(0, input_ids.shape[0], batch_size):
            ids, lab = input_ids[i:i + batch_size], labels[i:i + batch_size]
            with torch.autocast(ids.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits, _ = model(ids)
            # half-precision logits are scored in fp32; fp64 stays fp64
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            c, a = mqar_accuracy(logits, lab)
            correct, answered = correct + c, answered + a
            mask = lab != IGNORE_INDEX
            hits = ((logits.argmax(-1) == lab) | ~mask).all(dim=1)
            full += int(hits.sum())
            loss_sum += float(torch.nn.functional.cross_entropy(logits[mask], lab[mask], reduction="sum"))
    finally:
        model.train(was_training)
    n = input_ids.shape[0]
    return {"accuracy": correct / answered if answered else math.nan, "sequence_accuracy": full / n,
            "loss": loss_sum / answered if answered else math.nan}
