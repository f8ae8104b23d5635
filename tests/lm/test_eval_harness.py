"""The lm-evaluation-harness adapter: its three request types against direct computations with the model (these
need no lm_eval), checkpoint loading, and, where lm_eval is installed (the ``lm-eval`` extra), the registered
class under the harness's own request objects and evaluator."""

from __future__ import annotations

import importlib.util

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from choice_task import write_choice_task

from gdn2ts.lm.eval import CausalLMEvalAdapter, load_weights
from gdn2ts.lm.eval.checkpoint import kept_generators
from gdn2ts.models.lm import CausalLM
from gdn2ts.models.lm_config import LMConfig

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,;:!?ABCDEF\n"


class Chars:
    """One token per character of ALPHABET; BOS and EOS after it."""

    vocab_size, bos_id, eos_id = len(ALPHABET) + 2, len(ALPHABET), len(ALPHABET) + 1

    def encode(self, text):
        return [ALPHABET.index(c) for c in text]

    def decode(self, ids):
        return "".join(ALPHABET[i] for i in ids if i < len(ALPHABET))


def _model(cell=("gdn2",)):
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=Chars.vocab_size, hidden_size=16, num_cells=2, cell=cell, intermediate_size=32,
                   num_heads=2, head_k_dim=8, head_v_dim=8, gate_low_rank=4, attn_num_heads=2, attn_head_dim=8,
                   window=5)
    return CausalLM(cfg).double().eval()


def _logprob(model, tokens, n):
    """log p of the last ``n`` of ``tokens`` given the ones before, from one forward."""
    ids = torch.tensor(tokens)
    logits, _ = model(ids[None, :-1])
    lp = F.log_softmax(logits[0], -1)[-n:]
    return lp.gather(1, ids[-n:, None]).sum().item()


@pytest.mark.parametrize("cell", [("gdn2",), ("kda", "swa")])
def test_loglikelihood_equals_direct_computation(cell):
    model, tok = _model(cell), Chars()
    lm = CausalLMEvalAdapter(model, tok, batch_size=2, max_length=64)
    requests = [("the cat sat on", " the mat"), ("", "hello"), ("a longer context, with more words", " ok"),
                ("x", "yz")]
    out = lm.loglikelihood(requests)
    want = [_logprob(model, tok.encode("the cat sat on the mat"), 8),
            _logprob(model, [tok.bos_id, *tok.encode("hello")], 5),
            _logprob(model, tok.encode("a longer context, with more words ok"), 3),
            _logprob(model, tok.encode("xyz"), 2)]
    assert [round(lp, 9) for lp, _ in out] == [round(w, 9) for w in want]


def test_trailing_context_spaces_move_to_the_continuation():
    model, tok = _model(), Chars()
    lm = CausalLMEvalAdapter(model, tok)
    (a, _), (b, _) = lm.loglikelihood([("the cat ", "sat"), ("the cat", " sat")])
    assert a == pytest.approx(b, abs=1e-12)


def test_long_inputs_keep_their_last_max_length_tokens():
    model, tok = _model(), Chars()
    lm = CausalLMEvalAdapter(model, tok, max_length=6)
    (lp, _), = lm.loglikelihood([("abcdefghij", "klm")])
    assert lp == pytest.approx(_logprob(model, tok.encode("abcdefghijklm")[-7:], 3), abs=1e-12)


def test_is_greedy_follows_the_model_argmax():
    model, tok = _model(), Chars()
    lm = CausalLMEvalAdapter(model, tok)
    for seed in range(50):
        ctx = "".join(ALPHABET[i] for i in torch.randint(0, 26, (6,), generator=torch.Generator().manual_seed(seed)))
        greedy = model.generate(torch.tensor([tok.encode(ctx)]), max_new_tokens=3)[0, 6:].tolist()
        if max(greedy) < len(ALPHABET):
            break
    else:
        pytest.fail("no context whose greedy continuation is plain characters")
    cont = tok.decode(greedy)
    other = ALPHABET[(greedy[-1] + 1) % 26]
    (lp, yes), (_, no) = lm.loglikelihood([(ctx, cont), (ctx, cont[:-1] + other)])
    assert yes and not no and lp < 0


@pytest.mark.parametrize("cell", [("gdn2",), ("gdn2", "swa"), ("attention",)])
def test_rolling_loglikelihood_reads_the_whole_text_once(cell):
    model, tok = _model(cell), Chars()
    text = "gated deltanet decides what to erase, and what to write; " * 2
    direct = _logprob(model, [tok.bos_id, *tok.encode(text)], len(text))
    for max_length in (7, 64, 1000):
        lm = CausalLMEvalAdapter(model, tok, max_length=max_length)
        assert lm.loglikelihood_rolling([(text,), ("ab",)])[0] == pytest.approx(direct, abs=1e-9)


def test_generate_until_is_greedy_and_stops():
    model, tok = _model(("gdn2", "swa")), Chars()
    lm = CausalLMEvalAdapter(model, tok, max_length=4, max_gen_toks=12)
    ctx = "abc def ghi"
    ids = model.generate(torch.tensor([tok.encode(ctx)]), max_new_tokens=12)[0, len(ctx):].tolist()
    full = tok.decode(ids[:ids.index(tok.eos_id)] if tok.eos_id in ids else ids)
    assert lm.generate_until([(ctx, {"until": []})]) == [full]
    if tok.eos_id not in ids[:3]:
        assert lm.generate_until([(ctx, {"max_gen_toks": 3})]) == [tok.decode(ids[:3])]
    if len(full) >= 4:
        stop = full[3]
        assert lm.generate_until([(ctx, {"until": [stop, "\n\n"]})]) == [full[:full.index(stop)]]


def test_adapter_errors_are_named():
    model, tok = _model(), Chars()
    with pytest.raises(ValueError, match="argument 'tokenizer' expected an object with encode"):
        CausalLMEvalAdapter(model, object())
    with pytest.raises(ValueError, match="argument 'prefix_token_id' expected a token id in"):
        CausalLMEvalAdapter(model, tok, prefix_token_id=1000)
    with pytest.raises(ValueError, match="argument 'tokenizer' expected at most the model's 42 tokens"):
        CausalLMEvalAdapter(model, type("Big", (Chars,), {"vocab_size": 1000})())
    with pytest.raises(ValueError, match="argument 'max_length' expected an int >= 1"):
        CausalLMEvalAdapter(model, tok, max_length=0)
    lm = CausalLMEvalAdapter(model, tok)
    with pytest.raises(ValueError, match="a request expected 2 argument"):
        lm.loglikelihood([("only context",)])
    with pytest.raises(ValueError, match="expected a continuation with at least one token"):
        lm.loglikelihood([("abc", "")])


def test_load_weights_unwraps_training_checkpoints(tmp_path):
    a, b = _model(), _model()
    with torch.no_grad():
        for p in a.parameters():
            p.add_(1.0)
    torch.save({"model": a.state_dict(), "step": torch.tensor(3)}, tmp_path / "ckpt.pt")
    load_weights(b, tmp_path / "ckpt.pt")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    state = a.state_dict()
    state.pop("embed.weight")
    safetensors.torch.save_file(state, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match=r"got missing \['embed.weight'\]"):
        load_weights(b, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match="expected an existing checkpoint file"):
        load_weights(b, tmp_path / "none.pt")


LM_EVAL = importlib.util.find_spec("lm_eval") is not None


@pytest.mark.skipif(not LM_EVAL, reason="the optional lm-eval extra is not installed (pip install -e '.[lm-eval]')")
def test_registered_class_answers_lm_eval_instances():
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import LM
    from lm_eval.api.registry import get_model

    from gdn2ts.lm.eval import register_lm_eval

    cls = register_lm_eval()
    assert get_model("gdn2ts") is cls and issubclass(cls, LM) and register_lm_eval() is cls
    assert get_model("dummy").__name__ == "DummyLM"  # the harness's own models stay reachable
    model, tok = _model(), Chars()
    lm = cls(model=model, tokenizer=tok, device="cpu", max_length=16)
    ll = [Instance("loglikelihood", {}, ("the cat", " sat"), 0), Instance("loglikelihood", {}, ("", "ok"), 1)]
    assert lm.loglikelihood(ll) == CausalLMEvalAdapter(model, tok).loglikelihood([r.args for r in ll])
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("some text",), 0)])
    assert rolling[0] == pytest.approx(_logprob(model, [tok.bos_id, *tok.encode("some text")], 9), abs=1e-9)
    gen = lm.generate_until([Instance("generate_until", {}, ("abc", {"until": ["\n"], "max_gen_toks": 5}), 0)])
    assert len(gen) == 1 and len(gen[0]) <= 5 and "\n" not in gen[0]


@pytest.mark.skipif(not LM_EVAL, reason="the optional lm-eval extra is not installed (pip install -e '.[lm-eval]')")
def test_harness_evaluator_runs_a_local_task(tmp_path):
    """lm_eval's own evaluator on a two-choice task read from a local JSON lines file."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from gdn2ts.lm.eval import register_lm_eval

    rows = [{"q": "the cat sat on the", "choices": ["mat", "sky"], "label": 0},
            {"q": "a b c d", "choices": ["e", "z"], "label": 1},
            {"q": "one two", "choices": ["three", "four", "five"], "label": 2}]
    write_choice_task(tmp_path, rows)
    cls = register_lm_eval()
    model, tok = _model(), Chars()
    lm = cls(model=model, tokenizer=tok, device="cpu")
    with kept_generators():  # the evaluator seeds the global generators: give the other tests theirs back
        out = lm_eval.simple_evaluate(model=lm, tasks=["tiny_choice"], task_manager=TaskManager(
            include_path=str(tmp_path), include_defaults=False), bootstrap_iters=0, log_samples=False)
    # the harness joins question and choice with a space and picks the most likely choice
    adapter = CausalLMEvalAdapter(model, tok)
    right = [max(range(len(r["choices"])), key=lambda i, r=r: adapter.loglikelihood(
        [(r["q"], " " + r["choices"][i])])[0][0]) == r["label"] for r in rows]
    assert out["results"]["tiny_choice"]["acc,none"] == pytest.approx(sum(right) / len(rows))
