"""Recall probes: the generators are deterministic and produce what their configs say, the scores measure what
they claim, the GRU baseline matches the encoder's interface and state size, and ``gdn2ts probe`` runs end to end
on the tiny recipe."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from jsonargparse import ActionConfigFile, ArgumentParser

from gdn2ts.apps.baselines import GRUEncoder, encoder_state_floats
from gdn2ts.apps.probes import (
    ProbeEvalConfig,
    ProbeModelConfig,
    ProbeTrainConfig,
    _score_needle,
    _score_regimes,
    build_model,
    run_task,
)
from gdn2ts.apps.probes_data import NeedleConfig, RegimeConfig, make_needles, make_regimes
from gdn2ts.apps.probes_report import probe
from gdn2ts.cli import main
from gdn2ts.models import EncoderConfig, StreamEncoder

RECIPES = sorted((Path(__file__).resolve().parents[2] / "tasks" / "probes").glob("*.yaml"))


# ---------------------------------------------------------------------------------------------------------------
# generators


def test_generators_are_deterministic_in_the_seed():
    rc, nc = RegimeConfig(length=80, min_gap=5, max_gap=20), NeedleConfig(max_delay=40)
    for make, cfg in ((make_regimes, rc), (make_needles, nc)):
        a, b, c = make(cfg, 3, 4), make(cfg, 3, 4), make(cfg, 4, 4)
        for x, y in zip(a, b, strict=True):
            assert torch.equal(torch.nan_to_num(x, nan=-7.0), torch.nan_to_num(y, nan=-7.0))
        assert not torch.equal(torch.nan_to_num(a.values), torch.nan_to_num(c.values))


def test_regimes_follow_their_config():
    cfg = RegimeConfig(n_channels=5, n_cue_channels=2, n_regimes=3, length=400, episode_steps=3, min_gap=7,
                       max_gap=30, dt_min=0.25, dt_max=2.0, missing_rate=0.3, noise_std=0.0)
    b = make_regimes(cfg, seed=11, n_streams=40)
    dt = b.times.diff(dim=1)
    assert b.times[:, 0].eq(0).all() and dt.min() >= 0.25 and dt.max() <= 2.0
    cue = torch.arange(5) < 2
    observed = ~torch.isnan(b.values)
    # onsets show exactly the cue channels; every other step keeps a recalled channel observed
    assert torch.equal(observed[b.onset], cue.expand(int(b.onset.sum()), 5))
    assert observed[~b.onset][:, ~cue].any(-1).all()
    rate = 1 - observed[~b.onset].float().mean()
    assert abs(float(rate) - 0.3) < 0.02
    for s in range(40):
        onsets = b.onset[s].nonzero().flatten().tolist()
        assert len(onsets) >= 5
        # episodes of episode_steps steps, separated (and preceded) by gaps of min_gap..max_gap background steps
        starts = [-cfg.episode_steps] + onsets
        gaps = [t - (prev + cfg.episode_steps) for prev, t in zip(starts[:-1], starts[1:], strict=True)]
        assert min(gaps) >= 7 and max(gaps) <= 30
        assert 400 - (onsets[-1] + cfg.episode_steps) < cfg.max_gap + cfg.episode_steps
        last_end: dict[int, float] = {}
        for t in onsets:
            r = int(b.regime[s, t])
            assert b.regime[s, t:t + 3].eq(r).all() and (t + 3 == 400 or b.regime[s, t + 3] == -1)
            # noiseless values of an episode are the stream's pattern
            seen = observed[s, t + 1:t + 3]
            assert torch.equal(b.values[s, t + 1:t + 3][seen], b.patterns[s, r].expand(2, 5)[seen])
            expected = b.times[s, t] - last_end[r] if r in last_end else math.inf
            assert float(b.since_last[s, t]) == pytest.approx(expected)
            last_end[r] = float(b.times[s, t + 2])
    assert torch.isnan(b.since_last[~b.onset]).all()


def test_needles_follow_their_config():
    cfg = NeedleConfig(n_key_channels=3, n_value_channels=2, n_pairs=3, n_queries=6, min_delay=5, max_delay=50,
                       dt_min=0.5, dt_max=1.0)
    b = make_needles(cfg, seed=2, n_streams=30)
    assert b.values.shape == (30, 53, 6) and cfg.length == 53
    assert b.query.sum(1).eq(6).all()
    steps = b.delay_steps[b.query]
    assert steps.min() >= 5 and steps.max() <= 50
    assert steps.unique().numel() > 20  # delays spread over the range
    s, t = b.query.nonzero(as_tuple=True)
    j = b.pair[s, t]
    assert torch.equal(t - j, steps)
    # a query shows exactly the key of its pair; the target is that pair's value, which the stream showed at j
    assert torch.equal(b.values[s, t, :3], b.values[s, j, :3])
    assert torch.isnan(b.values[s, t, 3:]).all()
    assert torch.equal(b.target[s, t], b.values[s, j, 3:5]) and torch.equal(b.target[s, t], b.pair_values[s, j])
    assert torch.allclose(b.delay[s, t], b.times[s, t] - b.times[s, j])
    filler = ~b.query.clone()
    filler[:, :3] = False
    assert torch.isnan(b.values[filler][:, :5]).all() and not torch.isnan(b.values[filler][:, 5]).any()


@pytest.mark.parametrize("make_bad", [
    lambda: RegimeConfig(n_cue_channels=6),
    lambda: RegimeConfig(min_gap=10, max_gap=5),
    lambda: RegimeConfig(missing_rate=1.0),
    lambda: RegimeConfig(dt_min=0.0),
    lambda: NeedleConfig(n_pairs=8, min_delay=4),
    lambda: NeedleConfig(min_delay=5, max_delay=6, n_queries=3),
    lambda: ProbeModelConfig(models=("gdn2", "lstm")),
    lambda: ProbeTrainConfig(seeds=()),
    lambda: ProbeEvalConfig(since_bins=(0.0, 10.0, 5.0)),
    lambda: run_task("regimes", RegimeConfig(episode_steps=6), ProbeModelConfig(horizon=3), ProbeTrainConfig(),
                     ProbeEvalConfig()),
    lambda: run_task("needle", RegimeConfig(), ProbeModelConfig(), ProbeTrainConfig(), ProbeEvalConfig()),
])
def test_bad_configs_are_named(make_bad):
    with pytest.raises(ValueError, match="expected"):
        make_bad()


# ---------------------------------------------------------------------------------------------------------------
# scores


class _Oracle(torch.nn.Module):
    """Forecasts the true pattern at every onset and reconstructs the true value at every query."""

    def __init__(self, config: EncoderConfig, forecast=None, reconstruction=None):
        super().__init__()
        self.config = config
        self.forecast, self.reconstruction = forecast, reconstruction

    def forward(self, values, times):
        return {"forecast": self.forecast, "reconstruction": self.reconstruction}


def test_regime_score_is_zero_for_the_truth_and_binned_by_time_since_last_seen():
    cfg = RegimeConfig(length=200, min_gap=5, max_gap=40, noise_std=0.0)
    b = make_regimes(cfg, 0, 16)
    enc = EncoderConfig(n_channels=6, horizon=3)
    clean = torch.where(b.regime[..., None] >= 0, b.patterns.gather(1, b.regime.clamp(min=0)[..., None].expand(
        -1, -1, 6)), 0.0)
    truth = torch.stack([clean.roll(-h, dims=1) for h in (1, 2, 3)], dim=2)[..., None].expand(-1, -1, -1, -1, 3)
    ev = ProbeEvalConfig(since_bins=(0.0, 50.0, 1000.0))
    bins, counts, metrics = _score_regimes(_Oracle(enc, forecast=truth), b, cfg, ev)
    assert bins == ["[0, 50)", "[50, 1000)", "first"]
    since = b.since_last[b.onset]
    assert counts == [int((since < 50).sum()), int(((since >= 50) & (since < 1000)).sum()), int(since.isinf().sum())]
    assert metrics["mae"] == [0.0, 0.0, 0.0]
    _, _, worse = _score_regimes(_Oracle(enc, forecast=truth + 0.5), b, cfg, ev)
    assert worse["mae"] == pytest.approx([0.5, 0.5, 0.5])


def test_needle_score_is_perfect_for_the_truth_and_chance_for_zeros():
    cfg = NeedleConfig(n_pairs=4, max_delay=60)
    b = make_needles(cfg, 0, 64)
    recon = torch.zeros(64, cfg.length, cfg.n_channels)
    recon[..., 4:5] = torch.nan_to_num(b.target)
    ev = ProbeEvalConfig(delay_bins=(0.0, 30.0, 100.0))
    bins, counts, m = _score_needle(_Oracle(EncoderConfig(n_channels=6), reconstruction=recon), b, cfg, ev)
    assert sum(counts) == 64 * cfg.n_queries and m["mse"] == [0.0, 0.0] and m["accuracy"] == [1.0, 1.0]
    _, _, zero = _score_needle(_Oracle(EncoderConfig(n_channels=6), reconstruction=torch.zeros_like(recon)), b, cfg,
                               ev)
    assert all(0.1 < a < 0.5 for a in zero["accuracy"]) and all(0.7 < e < 1.4 for e in zero["mse"])


# ---------------------------------------------------------------------------------------------------------------
# the GRU baseline


def test_gru_state_equals_encoder_state_per_layer():
    cfg = EncoderConfig(n_channels=4, hidden_size=16, n_layers=2, num_heads=2, head_dim=8)
    layer = StreamEncoder(cfg).init_state(1).layers[0]
    assert encoder_state_floats(cfg) == layer.recurrent.numel() + layer.conv.numel() == 272
    gru = build_model("gru", cfg)
    assert isinstance(gru, GRUEncoder) and gru.state_size == 272
    assert [s.shape for s in gru.init_state(3).layers] == [torch.Size([3, 272])] * 2
    assert build_model("kda", cfg).config.variant == "kda"


def test_gru_forward_equals_step_and_skips_unobserved_steps():
    torch.manual_seed(0)
    gru = GRUEncoder(EncoderConfig(n_channels=3, hidden_size=16, n_layers=2, horizon=2), state_size=12)
    v = torch.randn(3, 9, 3)
    v[0, 4] = math.nan
    v[1, :3] = math.nan
    v[2, 5, 1] = math.nan
    t = torch.cumsum(torch.rand(3, 9, dtype=torch.float64) + 0.5, dim=1)
    full = gru(v, t)
    state = gru.init_state(3)
    for i in range(9):
        before = state
        out = gru.step(v[:, i], t[:, i], state=state)
        state = out["state"]
        assert torch.allclose(out["forecast"], full["forecast"][:, i], atol=1e-5)
        if i == 4:  # nothing observed in row 0: its state is left exactly as it was
            assert all(torch.equal(a[0], b[0]) for a, b in zip(state.layers, before.layers, strict=True))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(state.layers, full["state"].layers, strict=True))
    # two windows carrying state equal one
    first = gru(v[:, :4], t[:, :4])
    second = gru(v[:, 4:], t[:, 4:], state=first["state"])
    assert torch.allclose(second["forecast"], full["forecast"][:, 4:], atol=1e-5)
    with pytest.raises(ValueError, match="inf"):
        gru(torch.full((1, 2, 3), math.inf), t[:1, :2])


# ---------------------------------------------------------------------------------------------------------------
# recipes and the command


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_loads_into_typed_configs(recipe):
    parser = ArgumentParser()
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(probe)
    cfg = parser.instantiate(parser.parse_args(["--config", str(recipe)]))
    assert isinstance(cfg.regimes, RegimeConfig) and isinstance(cfg.needle, NeedleConfig)
    assert isinstance(cfg.model, ProbeModelConfig) and isinstance(cfg.train, ProbeTrainConfig)
    assert isinstance(cfg.evaluation, ProbeEvalConfig)
    assert set(cfg.model.models) == {"gdn2", "kda", "gdn", "gru"}
    assert cfg.model.horizon >= cfg.regimes.episode_steps - 1


def test_recipes_include_tiny_and_docs():
    assert {"tiny", "docs"} <= {p.stem for p in RECIPES}


def test_probe_command_runs_end_to_end(tmp_path):
    out, png = tmp_path / "probes.json", tmp_path / "probes.png"
    main(["probe", "--config", str(Path(RECIPES[0]).parent / "tiny.yaml"), "--train.seeds", "[0, 1]",
          "--json", str(out), "--plot", str(png), "--quiet", "true"])
    record = json.loads(out.read_text())
    assert record["config"]["train"]["seeds"] == [0, 1]
    assert set(record["tasks"]) == {"regimes", "needle"}
    for task, metrics in (("regimes", {"mae"}), ("needle", {"mse", "accuracy"})):
        data = record["tasks"][task]
        assert len(data["bins"]) == len(data["counts"]) and sum(data["counts"]) > 0
        assert set(data["models"]) == {"gdn2", "kda", "gdn", "gru"}
        for res in data["models"].values():
            assert set(res["metrics"]) == metrics and len(res["train_seconds"]) == 2
            for m in res["metrics"].values():
                assert len(m["per_seed"]) == 2 and all(len(r) == len(data["bins"]) for r in m["per_seed"])
                # a bin has a score exactly when it has events
                assert [v is not None for v in m["mean"]] == [c > 0 for c in data["counts"]]
    floats = {m["state_floats_per_layer"] for m in record["models"].values()}
    assert floats == {encoder_state_floats(replace(EncoderConfig(n_channels=6), hidden_size=8, head_dim=4))}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
