"""The probes' models: the block-diagonal GRU is a GRU (equal to PyTorch's with one group, its hand-written backward
equal to autograd's) with the encoders' state; the controls have and lack memory as claimed; the shipped recipe's
models match in parameters within 5 %."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from gdn2ts.apps.baselines import GroupedGRUEncoder, GroupedGRUMixer, encoder_state_floats, grouped_gru_scan_reference
from gdn2ts.apps.probes import model_widths
from gdn2ts.apps.probes_data import NeedleConfig, RegimeConfig
from gdn2ts.apps.probes_models import (
    MIXERS,
    MODELS,
    ProbeModelConfig,
    build_model,
    count_parameters,
    matched_mlp_widths,
    state_floats,
)

DOCS = Path(__file__).resolve().parents[2] / "tasks" / "probes" / "docs.yaml"
SMALL = ProbeModelConfig(hidden_size=16, num_heads=2, head_dim=4, horizon=2, gru_group_size=4)


# ---------------------------------------------------------------------------------------------------------------
# the block-diagonal GRU


def test_one_group_is_pytorchs_gru():
    torch.manual_seed(0)
    s = 6
    mixer = GroupedGRUMixer(hidden_size=s, state_size=s, group_size=s, group_io=s).double()
    gru = torch.nn.GRU(s, s, batch_first=True).double()
    with torch.no_grad():
        # identity projections around one group: the group's weights are the GRU's, transposed
        for p in (mixer.in_proj.weight, mixer.out_proj.weight):
            p.copy_(torch.eye(s))
        mixer.read.copy_(torch.eye(s)[None])
        mixer.w_ih.copy_(gru.weight_ih_l0.T[None])
        mixer.w_hh.copy_(gru.weight_hh_l0.T[None])
        mixer.b_ih.copy_(gru.bias_ih_l0[None])
        mixer.b_hh.copy_(gru.bias_hh_l0[None])
    x, h0 = torch.randn(3, 7, s).double(), torch.randn(3, s).double()
    y, h = mixer(x, h0)
    y_ref, h_ref = gru(x, h0[None])
    assert torch.allclose(y, y_ref, atol=1e-12) and torch.allclose(h, h_ref[0], atol=1e-12)


@pytest.mark.parametrize("masked", [False, True])
def test_hand_written_backward_equals_autograd(masked):
    from gdn2ts.apps.baselines import _GroupedGRUScan

    torch.manual_seed(1)
    T, G, B, s = 6, 3, 2, 4
    args = [torch.randn(T, G, B, 3 * s), torch.randn(G, B, s), torch.randn(G, s, 3 * s) * 0.5, torch.randn(G, 3 * s)]
    args = [a.double().requires_grad_() for a in args]
    keep = None
    if masked:
        keep = torch.ones(T, 1, B, 1, dtype=torch.float64)
        keep[1, 0, :], keep[4, 0, 1] = 0.0, 0.0
    assert torch.autograd.gradcheck(lambda *a: _GroupedGRUScan.apply(*a, keep), args)
    y, h = _GroupedGRUScan.apply(*args, keep)
    y_ref, h_ref = grouped_gru_scan_reference(*args, keep)
    weights = torch.randn_like(y)
    grads = torch.autograd.grad((y * weights).sum() + h.sum(), args)
    grads_ref = torch.autograd.grad((y_ref * weights).sum() + h_ref.sum(), args)
    assert torch.equal(y, y_ref) and torch.equal(h, h_ref)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(grads, grads_ref, strict=True))


def test_grouped_gru_has_the_encoders_state_and_its_parameter_count():
    cfg = ProbeModelConfig(hidden_size=32, num_heads=2, head_dim=8, horizon=3, gru_group_size=8, gru_group_io=1)
    gru = build_model("gru", cfg, n_channels=6)
    assert isinstance(gru, GroupedGRUEncoder) and gru.state_size == encoder_state_floats(cfg.encoder(6)) == 272
    assert [tuple(s.shape) for s in gru.init_state(5).layers] == [(5, 272)]
    G, s, io, d = 34, 8, 1, 32
    mixer = gru.mixers[0]
    assert mixer.groups == G
    assert count_parameters(mixer) == d * G * io + G * 3 * s * (io + s + 2) + G * s * io + G * io * d == 11_424
    # a dense GRU of the same state: 3 * S * (hidden + S + 2) + the read-out, twenty times more
    assert 3 * 272 * (32 + 272 + 2) + 272 * 32 > 20 * count_parameters(mixer)


def test_grouped_gru_forward_equals_steps_and_skips_unobserved_steps():
    torch.manual_seed(0)
    gru = GroupedGRUEncoder(SMALL.encoder(3), state_size=12, group_size=4, group_io=2)
    v = torch.randn(3, 9, 3)
    v[0, 4] = math.nan
    v[1, :3] = math.nan
    t = torch.cumsum(torch.rand(3, 9, dtype=torch.float64) + 0.5, dim=1)
    full = gru(v, t)
    state = gru.init_state(3)
    for i in range(9):
        before = state
        out = gru.step(v[:, i], t[:, i], state=state)
        state = out["state"]
        assert torch.allclose(out["forecast"], full["forecast"][:, i], atol=1e-5)
        if i == 4:  # nothing observed in row 0: its state is left exactly as it was
            assert torch.equal(state.layers[0][0], before.layers[0][0])
    assert torch.allclose(state.layers[0], full["state"].layers[0], atol=1e-5)
    second = gru(v[:, 4:], t[:, 4:], state=gru(v[:, :4], t[:, :4])["state"])
    assert torch.allclose(second["forecast"], full["forecast"][:, 4:], atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# the controls


def _observed_stream(seed: int, T: int = 12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, T, 3, generator=g), torch.cumsum(torch.rand(2, T, dtype=torch.float64) + 0.5, dim=1)


def test_memoryless_control_has_no_memory_across_steps():
    torch.manual_seed(0)
    model = build_model("memoryless", SMALL, 3).eval()
    v, t = _observed_stream(0)
    changed = v.clone()
    changed[:, :7] = torch.randn(2, 7, 3) * 3  # every earlier observation changes (times and masks do not)
    a, b = model(v, t), model(changed, t)
    for key in ("forecast", "reconstruction"):
        assert torch.equal(a[key][:, 7:], b[key][:, 7:])
        assert not torch.allclose(a[key][:, :7], b[key][:, :7])
    assert all(float(x.abs().max()) == 0 for x in a["state"].layers[0])
    # the same weights and token as GDN-2: only the memory differs
    assert count_parameters(model) == count_parameters(build_model("gdn2", SMALL, 3))


@pytest.mark.parametrize("name", ["attention", "gdn2", "gru"])
def test_models_with_memory_do_depend_on_earlier_steps(name):
    torch.manual_seed(0)
    model = build_model(name, SMALL, 3).eval()
    v, t = _observed_stream(1)
    changed = v.clone()
    changed[:, :7] = torch.randn(2, 7, 3) * 3
    assert not torch.allclose(model(v, t)["reconstruction"][:, 7:], model(changed, t)["reconstruction"][:, 7:])


@pytest.mark.parametrize("name", ["attention", "memoryless"])
def test_controls_step_as_they_run_whole_windows(name):
    torch.manual_seed(0)
    model = build_model(name, SMALL, 3).eval()
    v, t = _observed_stream(2, T=6)
    v[0, 3] = math.nan
    full, state = model(v, t), model.init_state(2)
    for i in range(6):
        out = model.step(v[:, i], t[:, i], state=state)
        state = out["state"]
        assert torch.allclose(out["forecast"], full["forecast"][:, i], atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# matching


def test_shipped_models_match_parameters_within_5_percent_and_state_exactly():
    recipe = yaml.safe_load(DOCS.read_text())
    mc = ProbeModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in recipe["model"].items()})
    assert set(mc.models) == set(MODELS) and mc.match_parameters
    tasks = {"regimes": RegimeConfig(**recipe["regimes"]), "needle": NeedleConfig(**recipe["needle"])}
    for task, cfg in tasks.items():
        counts = {}
        for name, (width, claimed) in model_widths(task, cfg, mc).items():
            counts[name] = count_parameters(build_model(name, mc, cfg.n_channels, width))
            assert counts[name] == claimed
        assert max(counts.values()) / min(counts.values()) - 1 < 0.05, counts
        # every mixer carries the GDN-2 encoder's state per layer; the controls carry all or nothing
        enc = mc.encoder(cfg.n_channels)
        assert {state_floats(n, mc, cfg.n_channels, cfg.length) for n in MIXERS} == {encoder_state_floats(enc)}
        assert state_floats("memoryless", mc, cfg.n_channels, cfg.length) == 0
        assert state_floats("attention", mc, cfg.n_channels, cfg.length) == 2 * 2 * 8 * cfg.length


def test_matching_sets_only_the_mlp_widths():
    cfg = ProbeModelConfig(models=("gdn2", "gdn", "gru", "attention"), hidden_size=16, num_heads=2, head_dim=4,
                           gru_group_size=4, attention_layers=2)
    widths = matched_mlp_widths(cfg, n_channels=3)
    base = {n: count_parameters(build_model(n, cfg, 3)) for n in cfg.models}
    largest = max(base, key=base.get)
    # the largest model keeps the base width; the others land within half a unit of MLP width of its count
    assert widths[largest] == (cfg.base_width, base[largest]) and cfg.base_width == 32
    for name, (width, count) in widths.items():
        model = build_model(name, cfg, 3, width)
        assert {b.mlp.down_proj.in_features for b in model.blocks} == {width} and count_parameters(model) == count
        assert abs(count - base[largest]) <= 1.5 * 16 * len(model.blocks)
    assert len(build_model("attention", cfg, 3).blocks) == 2


@pytest.mark.parametrize("make_bad", [
    lambda: GroupedGRUMixer(8, 12, 5),
    lambda: GroupedGRUEncoder(SMALL.encoder(3), state_size=12, group_size=0),
    lambda: GroupedGRUEncoder(SMALL.encoder(3), state_size=12, group_size=5),
    lambda: build_model("lstm", SMALL, 3),
    lambda: build_model("gdn2", SMALL, 3, mlp_width=0),
    lambda: build_model("gdn2", SMALL.encoder(3), 3),
    lambda: ProbeModelConfig(hidden_size=16, head_dim=4, gru_group_size=7),
    lambda: ProbeModelConfig(gru_group_size=0),
    lambda: ProbeModelConfig(attention_layers=0),
    lambda: ProbeModelConfig(models=("gdn2", "gdn2")),
    lambda: ProbeModelConfig(mlp_ratio=0.0),
])
def test_bad_model_configs_are_named(make_bad):
    with pytest.raises(ValueError, match="expected"):
        make_bad()
