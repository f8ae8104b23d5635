"""RULER-style needle retrieval over token sequences: single-key and multi-key needle in a haystack, scored by
exact match of the model's greedy continuation.

One prompt of ``context_len`` tokens:

    haystack ... [needle_open] key [needle_sep] value  ... haystack ... [query_open] key [needle_sep]
                 '------------ the needle ------------'                '----------- the query -------'

The model must continue the prompt with the queried needle's ``value`` (``value_len`` tokens). Single-key: one
needle. Multi-key (``num_needles > 1``): the other needles carry other keys and values (distractors) at random
depths. The queried needle starts after ``round(depth * H)`` haystack tokens (``H``: the haystack's length),
so ``depth`` 0 is the start of the context and 1 its end, just before the query. The haystack is random tokens
or windows of a token sequence (a tokenized text); keys, values and random haystack tokens come from
``[first_token, vocab_size)``, leaving the tokens below for the markers. A pure function of (config, seed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["NeedleConfig", "make_needles", "needle_accuracy", "needle_depth_sweep"]


def _tokens(owner: str, name: str, value) -> None:
    if not isinstance(value, tuple) or not value or any(isinstance(t, bool) or not isinstance(t, int) or t < 0
                                                        for t in value):
        raise ValueError(f"{owner}: field '{name}' expected a non-empty list of token ids >= 0, got {value!r}")


@dataclass(frozen=True)
class NeedleConfig:
    """One needle-retrieval task.

    Example:
        >>> cfg = NeedleConfig(vocab_size=64, context_len=40, num_needles=2, key_len=2, value_len=3)
        >>> cfg.needle_len, cfg.query_len, cfg.haystack_len
        (7, 4, 22)
    """

    vocab_size: int = 256
    """Tokens of the model's vocabulary."""
    context_len: int = 512
    """Tokens of each prompt: haystack, needles and the query."""
    num_needles: int = 1
    """Needles per prompt: 1 is single-key retrieval; more is multi-key, one queried and the rest distractors."""
    key_len: int = 2
    """Tokens of each key."""
    value_len: int = 4
    """Tokens of each value (the answer)."""
    depth: float | None = 0.5
    """Where the queried needle stands in the haystack, 0 (start) to 1 (end); None: uniform per prompt."""
    first_token: int = 4
    """Keys, values and random haystack tokens are drawn from ``[first_token, vocab_size)``."""
    needle_open: tuple[int, ...] = (1,)
    """Tokens that open a needle (for a text haystack: a tokenized phrase such as "The magic number for")."""
    needle_sep: tuple[int, ...] = (2,)
    """Tokens between a key and its value, in the needle and at the end of the query."""
    query_open: tuple[int, ...] = (3,)
    """Tokens that open the query."""

    def __post_init__(self):
        owner = "NeedleConfig"
        for name in ("needle_open", "needle_sep", "query_open"):
            value = getattr(self, name)
            if isinstance(value, list):
                # YAML and the command line give lists; the frozen config stores tuples
                value = tuple(value)
                object.__setattr__(self, name, value)
            _tokens(owner, name, value)
        for name, low in (("vocab_size", 2), ("context_len", 1), ("num_needles", 1), ("key_len", 1),
                          ("value_len", 1), ("first_token", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{owner}: field '{name}' expected an int >= {low}, got {value!r}")
        if self.vocab_size - self.first_token < self.num_needles:
            raise ValueError(f"{owner}: field 'first_token' expected at most vocab_size - num_needles = "
                             f"{self.vocab_size - self.num_needles} (distinct keys), got {self.first_token}")
        d = self.depth
        if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 1):
            raise ValueError(f"{owner}: field 'depth' expected None or a float in [0, 1], got {d!r}")
        marks = self.needle_open + self.needle_sep + self.query_open
        if max(marks) >= self.vocab_size:
            raise ValueError(f"{owner}: marker tokens expected ids < vocab_size={self.vocab_size}, got {marks}")
        if self.haystack_len < 0:
            raise ValueError(f"{owner}: field 'context_len' expected at least {self.context_len - self.haystack_len}"
                             f" (the needles and the query), got {self.context_len}")

    @property
    def needle_len(self) -> int:
        """Tokens of one needle: ``needle_open + key + needle_sep + value``."""
        return len(self.needle_open) + self.key_len + len(self.needle_sep) + self.value_len

    @property
    def query_len(self) -> int:
        """Tokens of the query: ``query_open + key + needle_sep``."""
        return len(self.query_open) + self.key_len + len(self.needle_sep)

    @property
    def haystack_len(self) -> int:
        """Haystack tokens ``H`` of each prompt."""
        return self.context_len - self.num_needles * self.needle_len - self.query_len


def make_needles(config: NeedleConfig, num_examples: int, seed: int = 0, haystack: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_examples`` prompts and answers: ``(prompts [N, context_len], answers [N, value_len])``, int64, CPU.

    ``haystack``: None for random tokens, or a 1-D token tensor of at least ``config.haystack_len`` tokens from
    which each prompt takes a window at a random offset.

    Example:
        >>> cfg = NeedleConfig(vocab_size=32, context_len=20, num_needles=2, key_len=1, value_len=2, depth=0.0)
        >>> prompts, answers = make_needles(cfg, 3, seed=0)
        >>> prompts.shape, answers.shape
        (torch.Size([3, 20]), torch.Size([3, 2]))
        >>> p = prompts[0].tolist()                      # the queried needle opens the context (depth 0)
        >>> p[:5] == [1, p[-2], 2, *answers[0].tolist()], p[-3], p[-1]
        (True, 3, 2)
    """
    op = "make_needles"
    if not isinstance(config, NeedleConfig):
        raise ValueError(f"{op}: argument 'config' expected a NeedleConfig, got {type(config).__name__}")
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"{op}: argument 'num_examples' expected an int >= 1, got {num_examples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{op}: argument 'seed' expected an int >= 0, got {seed!r}")
    H = config.haystack_len
    if haystack is not None:
        if not isinstance(haystack, torch.Tensor) or haystack.dim() != 1 or haystack.shape[0] < H \
                or haystack.dtype not in (torch.int32, torch.int64):
            got = (f"{haystack.dtype} shape {tuple(haystack.shape)}" if isinstance(haystack, torch.Tensor)
                   else type(haystack).__name__)
            raise ValueError(f"{op}: argument 'haystack' expected None or a 1-D int tensor of at least {H} tokens, "
                             f"got {got}")
        if haystack.numel() and (int(haystack.min()) < 0 or int(haystack.max()) >= config.vocab_size):
            raise ValueError(f"{op}: argument 'haystack' expected token ids in [0, {config.vocab_size}), got "
                             f"values in [{int(haystack.min())}, {int(haystack.max())}]")
    gen = torch.Generator().manual_seed(seed)
    n, M, lo, V = num_examples, config.num_needles, config.first_token, config.vocab_size
    # distinct first key tokens make the keys of one prompt distinct
    first = torch.rand(n, V - lo, generator=gen).topk(M, dim=1).indices + lo
    keys = torch.randint(lo, V, (n, M, config.key_len), generator=gen)
    keys[:, :, 0] = first
    values = torch.randint(lo, V, (n, M, config.value_len), generator=gen)
    if haystack is None:
        hay = torch.randint(lo, V, (n, H), generator=gen)
    else:
        starts = torch.randint(0, haystack.shape[0] - H + 1, (n,), generator=gen)
        hay = torch.stack([haystack[s:s + H] for s in starts.tolist()]).long()
    if config.depth is None:
        where = torch.randint(0, H + 1, (n,), generator=gen)
    else:
        where = torch.full((n,), round(config.depth * H), dtype=torch.long)
    # needle 0 is the queried one; the distractors stand at uniform insertion points of the haystack
    spots = torch.randint(0, H + 1, (n, M), generator=gen)
    spots[:, 0] = where
    opn, sep, qry = (list(config.needle_open), list(config.needle_sep), list(config.query_open))
    prompts = []
    for i in range(n):
        row, h = [], hay[i].tolist()
        # ties at one insertion point keep the needles' index order, the queried one first
        order = sorted(range(M), key=lambda m: (int(spots[i, m]), m))
        prev = 0
        for m in order:
            cut = int(spots[i, m])
            row += h[prev:cut] + opn + keys[i, m].tolist() + sep + values[i, m].tolist()
            prev = cut
        row += h[prev:] + qry + keys[i, 0].tolist() + sep
        prompts.append(row)
    return torch.tensor(prompts, dtype=torch.long), values[:, 0].clone()


@torch.no_grad()
def needle_accuracy(model, prompts: torch.Tensor, answers: torch.Tensor, batch_size: int = 16) -> dict[str, float]:
    """Greedy retrieval by ``model.generate`` (prefill of the prompt, then recurrent steps):
    ``{"exact_match": prompts whose continuation equals the answer / prompts, "token_accuracy": answer tokens
    right / answer tokens}``. The model's train/eval mode is restored afterwards.

    Example:
        >>> from gdn2ts.models.lm import CausalLM
        >>> from gdn2ts.models.lm_config import LMConfig
        >>> cfg = NeedleConfig(vocab_size=32, context_len=24, key_len=1, value_len=2)
        >>> model = CausalLM(LMConfig(vocab_size=32, hidden_size=16, num_cells=1, intermediate_size=32,
        ...                           num_heads=2, head_k_dim=8, head_v_dim=8, gate_low_rank=4))
        >>> r = needle_accuracy(model, *make_needles(cfg, 4), batch_size=3)
        >>> sorted(r), 0 <= r["exact_match"] <= r["token_accuracy"] <= 1
        (['exact_match', 'token_accuracy'], True)
    """
    op = "needle_accuracy"
    if not isinstance(prompts, torch.Tensor) or prompts.dim() != 2 or not isinstance(answers, torch.Tensor) \
            or answers.dim() != 2 or answers.shape[0] != prompts.shape[0] or answers.shape[1] < 1:
        raise ValueError(f"{op}: arguments 'prompts' [N, L] and 'answers' [N, value_len] expected two 2-D tensors "
                         f"with one row per prompt (from make_needles)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{op}: argument 'batch_size' expected an int >= 1, got {batch_size!r}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    exact = tokens = 0
    try:
        for i in range(0, prompts.shape[0], batch_size):
            p, a = prompts[i:i + batch_size].to(device), answers[i:i + batch_size].to(device)
            out = model.generate(p, max_new_tokens=a.shape[1])[:, p.shape[1]:]
            hit = out == a
            exact += int(hit.all(dim=1).sum())
            tokens += int(hit.sum())
    finally:
        model.train(was_training)
    return {"exact_match": exact / prompts.shape[0], "token_accuracy": tokens / answers.numel()}


def needle_depth_sweep(model, config: NeedleConfig, depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0),
                       num_examples: int = 64, seed: int = 0, haystack: torch.Tensor | None = None,
                       batch_size: int = 16) -> dict[float, dict[str, float]]:
    """Exact match and token accuracy at each needle depth (the same seed, so only the depth changes).

    Example:
        >>> from gdn2ts.models.lm import CausalLM
        >>> from gdn2ts.models.lm_config import LMConfig
        >>> model = CausalLM(LMConfig(vocab_size=32, hidden_size=16, num_cells=1, intermediate_size=32,
        ...                           num_heads=2, head_k_dim=8, head_v_dim=8, gate_low_rank=4))
        >>> sweep = needle_depth_sweep(model, NeedleConfig(vocab_size=32, context_len=24), (0.0, 1.0), 2)
        >>> list(sweep)
        [0.0, 1.0]
    """
    from dataclasses import replace

    if not depths or any(isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d)
                         for d in depths):
        raise ValueError(f"needle_depth_sweep: argument 'depths' expected a non-empty list of floats in [0, 1], "
                         f"got {depths!r}")
    return {float(d): needle_accuracy(model, *make_needles(replace(config, depth=float(d)), num_examples, seed,
                                                           haystack), batch_size=batch_size)
            for d in depths}
