"""The Mamba-3 mixer: the chunked forward equals a token-by-token complex-valued recurrence written from the
formulas, step equals forward, packed equals separate, gradients reach every parameter, bad configs are named,
and the recipes count exactly."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from gdn2ts.layers import Mamba3, Mamba3Config, Mamba3State
from gdn2ts.lm import CausalLM, build_model, load_recipe
from gdn2ts.models.lm_config import LMConfig

F64 = torch.float64
# small shapes that still exercise every path: 2 B/C groups over 4 heads, MIMO rank 3, chunks of 4 tokens
CASES = {
    "siso": dict(mode="siso"),
    "mimo": dict(mode="mimo", mimo_rank=3),
    "siso_full_rope": dict(mode="siso", rope_fraction=1.0),
    "mimo_rank1_one_group": dict(mode="mimo", mimo_rank=1, num_bc_heads=1),
}


def _layer(seed=0, **overrides) -> Mamba3:
    torch.manual_seed(seed)
    fields = dict(hidden_size=24, num_heads=4, head_dim=6, state_dim=8, num_bc_heads=2, chunk_size=4)
    layer = Mamba3(Mamba3Config(**{**fields, **overrides})).to(F64)
    with torch.no_grad():
        # move every parameter off its init (ones, 1/R) so that a mixed-up axis or factor cannot hide
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer


def _x(batch, length, seed=1, hidden=24):
    return torch.randn(batch, length, hidden, dtype=F64, generator=torch.Generator().manual_seed(seed))


def complex_reference(layer: Mamba3, u: torch.Tensor) -> torch.Tensor:
    """Mamba-3 from its definition, one token at a time, with the rotation written as a complex-valued diagonal
    transition: B/C channel pairs (2i, 2i+1) are complex numbers, and a head's state turns by the phase
    ``-tanh(theta) * pi * dt`` each step (unrotated pairs: phase 0); ``y = Re(conj(C)^T h)``."""
    cfg = layer.config
    H, P, N, R, G = cfg.num_heads, cfg.head_dim, cfg.state_dim, cfg.rank, cfg.num_bc_heads
    A = cfg.num_angles
    proj = u @ layer.in_proj.weight.T
    z, x, b, c, dd_dt, dd_a, trap, theta = proj.split(
        [H * P, H * P, R * G * N, R * G * N, H, H, H, A], dim=-1)
    Bsz, T = u.shape[:2]
    mx = layer.mimo_x if cfg.mode == "mimo" else torch.ones(H, R, P, dtype=F64)
    mz = layer.mimo_z if cfg.mode == "mimo" else torch.ones(H, R, P, dtype=F64)
    mo = layer.mimo_o if cfg.mode == "mimo" else torch.ones(H, R, P, dtype=F64)
    h = torch.zeros(Bsz, H, N // 2, P, dtype=torch.complex128)
    prev = torch.zeros(Bsz, H, N // 2, P, dtype=torch.complex128)  # sum_r B_{t-1,r} v_{t-1,r}^T
    out = []
    for t in range(T):
        def norm(m, weight, t=t):
            m = m[:, t].reshape(Bsz, R, G, N)
            m = m / torch.sqrt(m.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * weight
            return m.repeat_interleave(H // G, dim=2)  # [B, R, H, N], head j reads group j // (H / G)
        bt = norm(b, layer.B_norm.weight) + layer.B_bias.transpose(0, 1)
        ct = norm(c, layer.C_norm.weight) + layer.C_bias.transpose(0, 1)
        bz, cz = torch.complex(bt[..., 0::2], bt[..., 1::2]), torch.complex(ct[..., 0::2], ct[..., 1::2])
        dt = F.softplus(dd_dt[:, t] + layer.dt_bias)  # [B, H]
        rate = torch.clamp(F.softplus(dd_a[:, t]), min=cfg.a_floor)
        alpha = torch.exp(-rate * dt)
        lam = torch.sigmoid(trap[:, t])
        phase = torch.zeros(Bsz, H, N // 2, dtype=F64)
        phase[..., :A] = torch.tanh(theta[:, t])[:, None, :] * math.pi * dt[..., None]
        turn = torch.exp(-1j * phase)[..., None]  # [B, H, N/2, 1]
        v = x[:, t].reshape(Bsz, H, P)[:, None] * mx.transpose(0, 1)  # [B, R, H, P]
        now = torch.einsum("brhn,brhp->bhnp", bz, v.to(torch.complex128))
        h = turn * (alpha[..., None, None] * h + ((1 - lam) * dt * alpha)[..., None, None] * prev) \
            + (lam * dt)[..., None, None] * now
        prev = now
        y = torch.einsum("brhn,bhnp->brhp", cz.conj(), h).real + layer.D[:, None] * v
        gate = F.silu(z[:, t].reshape(Bsz, H, P)[:, None] * mz.transpose(0, 1))
        out.append(((y * gate) * mo.transpose(0, 1)).sum(1).reshape(Bsz, H * P))
    return torch.stack(out, 1) @ layer.out_proj.weight.T


@pytest.mark.parametrize("case", CASES)
def test_forward_equals_the_complex_recurrence(case):
    layer = _layer(**CASES[case])
    u = _x(2, 11)
    y, _ = layer(u)
    torch.testing.assert_close(y, complex_reference(layer, u), rtol=0, atol=1e-10)


@pytest.mark.parametrize("case", CASES)
def test_prefill_then_steps_equal_forward(case):
    """Prefill 6 tokens (across a chunk boundary), then 9 single steps: outputs and final states agree."""
    layer = _layer(**CASES[case])
    u = _x(3, 15)
    full, final = layer(u)
    y, state = layer(u[:, :6])
    torch.testing.assert_close(y, full[:, :6], rtol=0, atol=1e-10)
    for t in range(6, 15):
        y_t, state = layer.step(u[:, t], state)
        torch.testing.assert_close(y_t, full[:, t], rtol=0, atol=1e-10)
    for name, a, b in zip(Mamba3State._fields, state, final, strict=True):
        if name == "angle":  # equal modulo 2 pi (wrapped separately)
            a, b = torch.polar(torch.ones_like(a), a), torch.polar(torch.ones_like(b), b)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)
    assert bool((state.angle >= 0).all() and (state.angle < 2 * math.pi).all())


def test_steps_from_zero_equal_forward_and_state_is_left_alone():
    layer = _layer(mode="mimo", mimo_rank=2)
    u = _x(2, 7)
    full, _ = layer(u)
    state = layer.init_state(2)
    for t in range(7):
        y_t, state = layer.step(u[:, t], state)
        torch.testing.assert_close(y_t, full[:, t], rtol=0, atol=1e-10)
    kept = [t.clone() for t in state]
    layer(u, state)
    layer.step(u[:, 0], state)
    assert all(torch.equal(a, b) for a, b in zip(state, kept, strict=True))


@pytest.mark.parametrize("case", ["siso", "mimo"])
def test_two_forward_calls_carrying_state_equal_one(case):
    """The trapezoid's term for the last token of the first call is added by the first token of the second."""
    layer = _layer(**CASES[case])
    u = _x(2, 13)
    full, final = layer(u)
    first, state = layer(u[:, :5])
    empty, same = layer(u[:, :0], state)
    assert empty.shape == (2, 0, 24) and all(torch.equal(a, b) for a, b in zip(same, state, strict=True))
    second, state = layer(u[:, 5:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), full, rtol=0, atol=1e-10)
    torch.testing.assert_close(state.recurrent, final.recurrent, rtol=0, atol=1e-10)


@pytest.mark.parametrize("case", ["siso", "mimo"])
def test_packed_equals_separate(case):
    """Packed sequences (lengths 6, 1, 0, 9), each continuing its own state row, equal separate forwards."""
    layer = _layer(**CASES[case])
    lengths = [6, 1, 0, 9]
    docs = [_x(1, n, seed=10 + n) for n in lengths]
    _, warm = layer(_x(4, 3, seed=3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    packed, state = layer(torch.cat(docs, 1), warm, cu_seqlens=cu)
    alone = [layer(d, Mamba3State(*(t[i:i + 1] for t in warm))) for i, d in enumerate(docs)]
    torch.testing.assert_close(packed, torch.cat([y for y, _ in alone], 1), rtol=0, atol=1e-10)
    for i, (_, s) in enumerate(alone):
        for a, b in zip(state, s, strict=True):
            torch.testing.assert_close(a[i:i + 1], b, rtol=0, atol=1e-10)
    fresh, _ = layer(torch.cat(docs, 1), cu_seqlens=cu)
    torch.testing.assert_close(fresh[:, 7:], layer(docs[3])[0], rtol=0, atol=1e-10)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    cfg = dataclasses.replace(load_recipe("tiny_gdn2"), cell=("mamba3_mimo", "swa", "mamba3_siso"), mimo_rank=2,
                              window=4)
    model = CausalLM(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    _, state = model(ids[:, :4])
    logits, _ = model(ids[:, 4:], state)
    F.cross_entropy(logits.flatten(0, 1), ids[:, 4:].flatten()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or not p.grad.abs().sum() > 0]
    assert not missing
    no_decay = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)}
    assert {"dt_bias", "D", "B_bias", "C_bias"} <= no_decay


def test_hybrid_lm_prefill_then_steps_equal_forward():
    torch.manual_seed(5)
    cfg = dataclasses.replace(load_recipe("tiny_gdn2"), cell=("mamba3_siso", "swa", "mamba3_mimo"), window=3,
                              num_v_heads=4, mimo_rank=2)
    model = CausalLM(cfg).double().eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(6))
    full, _ = model(ids)
    _, state = model(ids[:, :4])
    for t in range(4, 10):
        step, state = model.step(ids[:, t], state)
        torch.testing.assert_close(step, full[:, t], rtol=0, atol=1e-10)
    out = model.generate(ids[:, :3], max_new_tokens=4)
    assert out.shape == (2, 7)


def test_bf16_autocast_runs_with_fp32_state():
    layer = Mamba3(Mamba3Config(hidden_size=16, num_heads=2, head_dim=4, state_dim=8, mode="mimo", mimo_rank=2))
    x = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = layer(x)
    ref, _ = layer(x)
    assert state.recurrent.dtype == torch.float32 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), ref, rtol=0.1, atol=0.05)


@pytest.mark.parametrize("field, value", [
    ("mode", "miso"), ("mimo_rank", 0), ("rope_fraction", 0.3), ("rope_fraction", True), ("num_bc_heads", 3),
    ("state_dim", 2), ("head_dim", 0), ("a_floor", 0.0), ("norm_eps", float("inf")), ("chunk_size", 1.5),
    ("num_heads", None),
])
def test_bad_layer_config_names_the_field(field, value):
    base = dict(hidden_size=16, num_heads=4, head_dim=4, state_dim=8, num_bc_heads=2)
    with pytest.raises(ValueError, match=f"Mamba3Config: field '{field}'"):
        Mamba3Config(**{**base, field: value})


@pytest.mark.parametrize("field, value", [("mimo_rank", 0), ("mimo_rank", 2.0), ("rope_fraction", 0.25),
                                          ("head_k_dim", 2)])
def test_bad_lm_config_names_the_field(field, value):
    base = dict(vocab_size=16, hidden_size=32, num_heads=2, head_k_dim=8, head_v_dim=8, cell=["mamba3_siso"])
    with pytest.raises(ValueError, match=f"LMConfig: field '{field}'"):
        LMConfig(**{**base, field: value})


def test_bad_inputs_and_states_are_named():
    layer = _layer()
    x = _x(2, 5)
    with pytest.raises(ValueError, match="'x' expected a 3-D tensor"):
        layer(x[0])
    with pytest.raises(ValueError, match="'x' expected dtype torch.float64"):
        layer(x.float())
    _, state = layer(x)
    with pytest.raises(ValueError, match=r"'state.key' expected shape \(2, 1, 4, 8\)"):
        layer(x, state._replace(key=torch.zeros(2, 2, 4, 8, dtype=F64)))
    with pytest.raises(ValueError, match="'state.recurrent' expected dtype torch.float64"):
        layer.step(x[:, 0], state._replace(recurrent=state.recurrent.float()))
    with pytest.raises(ValueError, match="'state' expected a Mamba3State"):
        layer(x, tuple(state))
    with pytest.raises(ValueError, match="batch size 1"):
        layer(x, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="'cu_seqlens' expected offsets from 0 to T=5"):
        layer(x[:1], cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="'config' expected a Mamba3Config"):
        Mamba3({"hidden_size": 16})
    model = build_model(dataclasses.replace(load_recipe("tiny_gdn2"), cell=("mamba3_siso",)))
    _, lm_state = model(torch.randint(0, 64, (1, 3)))
    bad = tuple(model.blocks[0].mixer.init_state(1) if i else None for i in range(2))
    with pytest.raises(ValueError, match=r"'state\[0\]' expected a Mamba3State \(block 0 is 'mamba3_siso'\)"):
        model.step(torch.tensor([1]), bad)
    assert isinstance(lm_state[0], Mamba3State)


# Block stacks of the Mamba-3 recipes (docs/lm.md states the same numbers; tests/lm/test_recipes.py checks them
# too): the MLP width is the integer nearest to gdn2_1.3B's (or small_gdn2's) count.
RECIPES = {
    "mamba3_siso_1.3B": (1_302_622_848, 15_049_024, 8292),
    "mamba3_mimo_1.3B": (1_302_636_672, 16_867_648, 8029),
    "small_mamba3_siso": (31_004_800, 948_496, 1905),
    "small_mamba3_mimo": (31_004_800, 1_354_000, 1641),
}


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_count_exactly(name):
    blocks, mixer, mlp = RECIPES[name]
    model = build_model(name, device="meta")
    cfg = model.config
    assert model.num_parameters()["blocks"] == blocks
    layer = model.blocks[0].mixer
    assert isinstance(layer, Mamba3) and sum(p.numel() for p in layer.parameters()) == mixer
    assert cfg.intermediate_size == mlp
    assert layer.config.state_floats == cfg.state_floats_per_layer
    assert layer.config.state_floats == (262_144 if name.endswith("1.3B") else 65_536)
    assert layer.config.rank == (4 if "mimo" in name else 1) and layer.config.num_bc_heads == 1
    # the other mixers' neighbours in parameters: within 0.02 % of the GDN-2 recipe of the same size
    target = 1_302_638_112 if name.endswith("1.3B") else 30_999_584
    assert abs(blocks - target) / target < 2e-4
