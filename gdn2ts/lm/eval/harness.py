"""A :class:`~gdn2ts.models.lm.CausalLM` behind lm-evaluation-harness's model API (``lm_eval.api.model.LM``).

:class:`CausalLMEvalAdapter` holds the model and a tokenizer and answers the three request types of the
harness; it needs nothing from ``lm_eval`` (requests are anything with ``.args``, or plain tuples).
:func:`register_lm_eval` imports ``lm_eval`` (the optional extra ``pip install -e ".[lm-eval]"``), registers the
model class under ``"gdn2ts"`` and returns it.

* ``loglikelihood``: ``(context, continuation)`` -> ``(log p(continuation | context), is_greedy)``. The pair is
  tokenized as one string and the continuation's tokens are those after the context's (trailing spaces of the
  context move to the continuation, as the harness expects); an empty context starts from ``prefix_token_id``.
* ``loglikelihood_rolling``: ``(text,)`` -> the log-likelihood of every token of the text after
  ``prefix_token_id``. The model reads the whole text in chunks of ``max_length`` tokens carrying its state, so
  every token is predicted once with all of the text before it (the recurrent state, the sliding window's cache
  and full attention's cache make this exact; no overlapping windows are needed).
* ``generate_until``: ``(context, gen_kwargs)`` -> the greedy continuation (or sampled, with ``do_sample``),
  prefilled in parallel and then stepped token by token, cut before the first ``until`` string, stopped at EOS or
  after ``max_gen_toks`` tokens.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["CausalLMEvalAdapter", "load_weights", "model_from_args", "register_lm_eval"]


def _wide(logits: torch.Tensor) -> torch.Tensor:
    # half-precision logits are scored in fp32; fp64 stays fp64
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _args(request, n: int | None, op: str) -> tuple:
    args = request.args if hasattr(request, "args") else request
    if not isinstance(args, tuple) or (n is not None and len(args) != n):
        raise ValueError(f"{op}: a request expected {n} argument(s) (an lm_eval Instance or a tuple), got {args!r}")
    return args


class CausalLMEvalAdapter:
    """The harness's three request types on a causal LM and a tokenizer (``encode(str) -> list[int]``,
    ``decode(list[int]) -> str``, ``eos_id``, ``bos_id``).

    Args:
        model: a :class:`~gdn2ts.models.lm.CausalLM` (anything with ``forward(ids, state)`` and ``step``).
        tokenizer: the tokenizer the model was trained with.
        batch_size: loglikelihood requests scored together.
        max_length: tokens per forward call: longer loglikelihood inputs keep their last ``max_length`` tokens;
            rolling texts are read in chunks of this size with the state carried.
        max_gen_toks: default cap on generated tokens.
        prefix_token_id: token that starts an empty context and every rolling text (None: the tokenizer's BOS).

    Example:
        >>> from gdn2ts.models.lm import CausalLM
        >>> from gdn2ts.models.lm_config import LMConfig
        >>> class Bytes:
        ...     bos_id, eos_id = 256, 257
        ...     def encode(self, text): return list(text.encode())
        ...     def decode(self, ids): return bytes(i for i in ids if i < 256).decode(errors="replace")
        >>> model = CausalLM(LMConfig(vocab_size=258, hidden_size=16, num_cells=1, intermediate_size=32,
        ...                           num_heads=2, head_k_dim=8, head_v_dim=8, gate_low_rank=4))
        >>> lm = CausalLMEvalAdapter(model, Bytes(), max_length=8)
        >>> [(round(lp, 3) < 0, greedy) for lp, greedy in lm.loglikelihood([("a b", " c")])]
        [(True, False)]
        >>> len(lm.generate_until([("abc", {"until": ["\\n"], "max_gen_toks": 3})])[0]) <= 3
        True
    """

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int = 2048, max_gen_toks: int = 256,
                 prefix_token_id: int | None = None):
        op = "CausalLMEvalAdapter"
        for name in ("encode", "decode"):
            if not callable(getattr(tokenizer, name, None)):
                raise ValueError(f"{op}: argument 'tokenizer' expected an object with {name}(), got "
                                 f"{type(tokenizer).__name__}")
        for name, value in (("batch_size", batch_size), ("max_length", max_length), ("max_gen_toks", max_gen_toks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{op}: argument '{name}' expected an int >= 1, got {value!r}")
        prefix = prefix_token_id if prefix_token_id is not None else getattr(tokenizer, "bos_id", None)
        vocab = model.config.vocab_size if hasattr(model, "config") else None
        tok_vocab = getattr(tokenizer, "vocab_size", None)
        if vocab and isinstance(tok_vocab, int) and tok_vocab > vocab:
            raise ValueError(f"{op}: argument 'tokenizer' expected at most the model's {vocab} tokens, got a "
                             f"tokenizer of {tok_vocab} (another model's tokenizer?)")
        if isinstance(prefix, bool) or not isinstance(prefix, int) or prefix < 0 or (vocab and prefix >= vocab):
            raise ValueError(f"{op}: argument 'prefix_token_id' expected a token id in [0, {vocab}) (default: the "
                             f"tokenizer's bos_id), got {prefix!r}")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length, self.max_gen_toks = batch_size, max_length, max_gen_toks
        self.prefix_token_id = prefix
        self.eos_id = getattr(tokenizer, "eos_id", None)
        self.device = next(model.parameters()).device

    # ----------------------------------------------------------------------------------------------------------

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = list(self.tokenizer.encode(context + continuation))
        ctx = list(self.tokenizer.encode(context)) if context else []
        # a merge across the boundary makes the context's own tokens no prefix of the whole: split at its length
        cont = whole[len(ctx):]
        if not ctx:
            ctx = [self.prefix_token_id]
        return ctx, cont

    @torch.no_grad()
    def loglikelihood(self, requests, disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """``[(log p(continuation | context), whether greedy decoding gives the continuation)]``, one per
        ``(context, continuation)`` request, in request order."""
        pairs = []
        for r in requests:
            context, continuation = _args(r, 2, "loglikelihood")
            ctx, cont = self._encode_pair(context, continuation)
            if not cont:
                raise ValueError(f"loglikelihood: a request expected a continuation with at least one token, got "
                                 f"{continuation!r}")
            # the model reads everything but the last token; keep the last max_length of them
            tokens = (ctx + cont)[-(self.max_length + 1):]
            pairs.append((tokens, min(len(cont), len(tokens) - 1)))
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        # longest first: each batch is right-padded to its first row, and causal models ignore the padding
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]))
        self.model.eval()
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            width = len(pairs[idx[0]][0]) - 1
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            for row, i in enumerate(idx):
                inp = pairs[i][0][:-1]
                ids[row, :len(inp)] = torch.tensor(inp)
            logits, _ = self.model(ids.to(self.device))
            logp = F.log_softmax(_wide(logits), dim=-1)
            for row, i in enumerate(idx):
                tokens, n = pairs[i]
                end = len(tokens) - 1
                target = torch.tensor(tokens[-n:], device=self.device)
                lp = logp[row, end - n:end]
                out[i] = (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
        return out

    @torch.no_grad()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = True) -> list[float]:
        """The log-likelihood of each ``(text,)`` request's every token, after ``prefix_token_id``."""
        self.model.eval()
        results = []
        for r in requests:
            (text,) = _args(r, 1, "loglikelihood_rolling")
            tokens = torch.tensor([self.prefix_token_id, *self.tokenizer.encode(text)], dtype=torch.long)
            total, state = 0.0, None
            for i in range(0, len(tokens) - 1, self.max_length):
                inp = tokens[i:i + self.max_length][None].to(self.device)
                target = tokens[i + 1:i + 1 + self.max_length].to(self.device)
                logits, state = self.model(inp, state)
                total -= float(F.cross_entropy(_wide(logits[0, :len(target)]), target, reduction="sum"))
            results.append(total)
        return results

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = True) -> list[str]:
        """The continuation of each ``(context, gen_kwargs)`` request: ``gen_kwargs`` may hold ``until`` (a
        string or a list of them), ``max_gen_toks``, ``do_sample`` and ``temperature``."""
        self.model.eval()
        results = []
        for r in requests:
            context, kwargs = _args(r, 2, "generate_until")
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            limit = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            ctx = list(self.tokenizer.encode(context)) or [self.prefix_token_id]
            # prefill at most max_length tokens of context at a time, carrying the state
            state, logits = None, None
            ids = torch.tensor(ctx, dtype=torch.long, device=self.device)
            for i in range(0, len(ids), self.max_length):
                logits, state = self.model(ids[i:i + self.max_length][None], state)
            logits = logits[:, -1]
            generated: list[int] = []
            text = ""
            for _ in range(limit):
                if temperature > 0:
                    token = torch.multinomial(F.softmax(logits.float() / temperature, -1), 1)[:, 0]
                else:
                    token = logits.argmax(-1)
                if self.eos_id is not None and int(token) == self.eos_id:
                    break
                generated.append(int(token))
                text = self.tokenizer.decode(generated)
                if any(s in text for s in until):
                    break
                logits, state = self.model.step(token, state)
            cut = min((text.find(s) for s in until if s in text), default=len(text))
            results.append(text[:cut])
        return results


def load_weights(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load a checkpoint's tensors into ``model``: a ``.safetensors`` file, or a ``torch.save`` file read with
    ``weights_only=True``; a nested ``"model"`` / ``"state_dict"`` entry and a ``"model."`` key prefix (as
    training modules save them) are unwrapped. Missing or unexpected keys are a ValueError naming them.

    Example:
        >>> import tempfile, safetensors.torch
        >>> from gdn2ts.models.lm import CausalLM
        >>> from gdn2ts.models.lm_config import LMConfig
        >>> cfg = LMConfig(vocab_size=8, hidden_size=8, num_cells=1, intermediate_size=8, num_heads=1,
        ...                head_k_dim=8, head_v_dim=8, gate_low_rank=2)
        >>> a, b = CausalLM(cfg), CausalLM(cfg)
        >>> path = tempfile.mkdtemp() + "/w.safetensors"
        >>> safetensors.torch.save_file({"model." + k: v for k, v in a.state_dict().items()}, path)
        >>> bool(torch.equal(load_weights(b, path).embed.weight, a.embed.weight))
        True
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"load_weights: argument 'path' expected an existing checkpoint file, got '{path}'")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
    else:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(tensors, dict) and isinstance(tensors.get(key), dict):
            tensors = tensors[key]
    if not isinstance(tensors, dict):
        raise ValueError(f"load_weights: '{path}' expected a mapping of tensors, got {type(tensors).__name__}")
    if tensors and all(k.startswith("model.") for k in tensors):
        tensors = {k[len("model."):]: v for k, v in tensors.items()}
    want = set(model.state_dict())
    missing, unexpected = sorted(want - set(tensors)), sorted(set(tensors) - want)
    if missing or unexpected:
        raise ValueError(f"load_weights: '{path}' expected the model's {len(want)} tensors, got missing "
                         f"{missing[:5]}{'...' if len(missing) > 5 else ''} and unexpected "
                         f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    model.load_state_dict(tensors)
    return model


def model_from_args(recipe=None, weights=None, checkpoint=None) -> tuple[torch.nn.Module, dict | None]:
    """The model the harness arguments name, and the training configuration when it came from a training
    checkpoint (else None).

    ``checkpoint``: a checkpoint written by ``gdn2ts lm train``; the model is built from the configuration saved
    with its weights (vocabulary included). ``recipe`` and ``weights``: a recipe name or YAML path and a weights
    file (:func:`load_weights`; None keeps the fresh initialization); when ``weights`` is a training checkpoint,
    its stored configuration builds the model, and the recipe must agree with it in every field but the
    vocabulary (which a training recipe may replace) -- otherwise a ValueError names the fields that differ.
    """
    from gdn2ts.lm.generate import load_lm, read_lm_config

    if checkpoint is not None:
        if recipe is not None or weights is not None:
            raise ValueError("GDN2TSLM: argument 'checkpoint' expected alone (the model and weights come from it), "
                             f"got also recipe={recipe!r}, weights={weights!r}")
        return load_lm(checkpoint)
    if recipe is None:
        raise ValueError("GDN2TSLM: argument 'checkpoint' or 'recipe' expected (or pass model=), got neither")
    from gdn2ts.lm.recipes import load_recipe
    from gdn2ts.models.lm import CausalLM

    want = load_recipe(recipe)
    stored = read_lm_config(weights) if weights is not None else None
    if stored is None:
        model = CausalLM(want)
        if weights is not None:
            load_weights(model, weights)
        return model, None
    theirs, ours = dataclasses.asdict(stored), dataclasses.asdict(want)
    differ = sorted(k for k, v in theirs.items() if k != "vocab_size" and ours.get(k) != v)
    if differ:
        raise ValueError(f"GDN2TSLM: argument 'weights' holds a model that differs from recipe {recipe!r} in "
                         f"{differ}; pass checkpoint={str(weights)!r} alone to evaluate the trained model")
    return load_lm(weights)


_REGISTERED: dict[str, type] = {}


def register_lm_eval(name: str = "gdn2ts") -> type:
    """Import ``lm_eval``, register the model class under ``name`` and return it (again on later calls).

    The class takes, as keyword arguments or an ``lm_eval`` ``model_args`` string: ``checkpoint`` (a
    ``gdn2ts lm train`` checkpoint: the model is built from the configuration stored with its weights), or
    ``recipe`` (a name in ``tasks/lm/`` or a YAML path) with ``weights`` (see :func:`model_from_args`); ``tokenizer``
    (``"mistral"``, ``"bytes"`` or a SentencePiece file; default: the checkpoint's, else ``"mistral"``), ``device``,
    ``dtype`` (``float32``, ``bfloat16``), ``batch_size``, ``max_length``, ``max_gen_toks``; or ``model=`` and
    ``tokenizer=`` objects directly.
    """
    if name in _REGISTERED:
        return _REGISTERED[name]
    try:
        # the harness fills its registry with its own models only while the registry is empty: fill it first, so
        # that registering ours does not hide them
        import lm_eval.models  # noqa: F401
        from lm_eval.api.model import LM
        from lm_eval.api.registry import register_model
    except ImportError as err:
        raise ImportError("register_lm_eval: the lm-evaluation-harness is not installed; install the optional "
                          "extra with pip install -e \".[lm-eval]\"") from err

    class GDN2TSLM(LM):
        """lm-evaluation-harness model: a gdn2ts CausalLM and its tokenizer."""

        def __init__(self, recipe=None, weights=None, tokenizer=None, model=None, device=None, dtype=None,
                     batch_size=8, max_length=2048, max_gen_toks=256, checkpoint=None, **_ignored):
            super().__init__()
            if model is None:
                model, trained = model_from_args(recipe, weights, checkpoint)
                if tokenizer is None and trained is not None:
                    tokenizer = trained.get("data", {}).get("tokenizer")
            if tokenizer is None:
                tokenizer = "mistral"
            if isinstance(tokenizer, (str, Path)):
                from gdn2ts.lm.tokenizer import load_tokenizer

                tokenizer = load_tokenizer(tokenizer)
            if dtype is not None:
                model = model.to(getattr(torch, str(dtype)))
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            model = model.to(device)
            self._device = torch.device(device)
            self.adapter = CausalLMEvalAdapter(model, tokenizer, batch_size=int(batch_size),
                                               max_length=int(max_length), max_gen_toks=int(max_gen_toks))

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self.adapter.loglikelihood(requests)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self.adapter.loglikelihood_rolling(requests)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return self.adapter.generate_until(requests)

    register_model(name)(GDN2TSLM)
    _REGISTERED[name] = GDN2TSLM
    return GDN2TSLM

