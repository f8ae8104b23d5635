"""Recall probes: the generators are deterministic and produce what their configs say, the scores measure what
they claim, the dense GRU baseline matches the encoder's interface and state size, the curriculum and the
intervals compute what they claim, and ``gdn2ts probe`` runs end to end on the tiny recipe (the models and
controls: tests/apps/test_probes_models.py)."""

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
    MODELS,
    ProbeEvalConfig,
    ProbeModelConfig,
    ProbeTrainConfig,
    _score_needle,
    _score_regimes,
    build_model,
    run_task,
    train_and_score,
)
from gdn2ts.apps.probes_curriculum import CurriculumConfig, reach, task_at
from gdn2ts.apps.probes_data import NeedleConfig, RegimeConfig, make_needles, make_regimes, regime_codes
from gdn2ts.apps.probes_report import probe
from gdn2ts.apps.probes_stats import mean_interval, t_cdf, t_quantile
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


def test_shared_and_quiet_cues():
    cfg = RegimeConfig(length=200, min_gap=5, max_gap=30, shared_cues=True, quiet_cues=True, noise_std=0.0)
    a, b = make_regimes(cfg, 0, 8), make_regimes(cfg, 1, 8)
    codes = torch.from_numpy(regime_codes(cfg)).float()
    # the cue part of every stream's patterns is the one code per regime; the recalled part differs by stream
    for batch in (a, b):
        assert torch.equal(batch.patterns[..., :2], codes.expand(8, -1, -1))
    assert not torch.equal(a.patterns[..., 2:], b.patterns[..., 2:])
    observed = ~torch.isnan(a.values)
    in_episode = a.regime >= 0
    # cues are seen only within episodes (always at onsets), and there they show the regime's code
    assert not observed[~in_episode][:, :2].any() and observed[a.onset][:, :2].all()
    assert observed[in_episode & ~a.onset][:, :2].float().mean() > 0.7
    seen = observed[..., :2] & in_episode[..., None]
    assert torch.equal(a.values[..., :2][seen], codes[a.regime.clamp(min=0)][seen])
    # without the flags the cue channels carry the background between episodes, as before
    plain = make_regimes(replace(cfg, shared_cues=False, quiet_cues=False), 0, 8)
    assert (~torch.isnan(plain.values[..., :2]))[plain.regime < 0].any()


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
    lambda: RegimeConfig(quiet_cues=1),
    lambda: NeedleConfig(n_pairs=8, min_delay=4),
    lambda: NeedleConfig(min_delay=5, max_delay=6, n_queries=3),
    lambda: ProbeModelConfig(models=("gdn2", "lstm")),
    lambda: ProbeTrainConfig(seeds=()),
    lambda: ProbeEvalConfig(since_bins=(0.0, 10.0, 5.0)),
    lambda: run_task("regimes", RegimeConfig(episode_steps=6), ProbeModelConfig(horizon=3), ProbeTrainConfig(),
                     ProbeEvalConfig()),
    lambda: run_task("needle", RegimeConfig(), ProbeModelConfig(), ProbeTrainConfig(), ProbeEvalConfig()),
    lambda: run_task("lookup", NeedleConfig(), ProbeModelConfig(), ProbeTrainConfig(), ProbeEvalConfig()),
    lambda: ProbeTrainConfig(seeds=(0, -1)),
    lambda: ProbeTrainConfig(curriculum={"start": 0.5}),
    lambda: ProbeEvalConfig(level=1.0),
    lambda: CurriculumConfig(start=0.0),
    lambda: CurriculumConfig(start=0.5, ramp=1.5),
    lambda: reach(CurriculumConfig(), 5, 5),
    lambda: task_at(NeedleConfig(), 0.0),
    lambda: task_at(ProbeEvalConfig(), 0.5),
    lambda: t_quantile(1.0, 3),
    lambda: t_cdf(1.0, 0),
    lambda: mean_interval([]),
    lambda: mean_interval([1.0, 2.0], level=95),
    lambda: train_and_score("needle", NeedleConfig(), ProbeModelConfig(models=("gdn2",)), ProbeTrainConfig(),
                            ProbeEvalConfig(), "gru", 0),
])
def test_bad_configs_are_named(make_bad):
    with pytest.raises(ValueError, match="expected"):
        make_bad()


# ---------------------------------------------------------------------------------------------------------------
# curriculum


def test_reach_grows_linearly_over_the_ramp_then_stays_at_one():
    c = CurriculumConfig(start=0.2, ramp=0.4)
    # ramp over 0.4 * 10 = 4 steps: 0.2 + 0.8 * step / 4
    assert [reach(c, s, 10) for s in range(10)] == pytest.approx([0.2, 0.4, 0.6, 0.8] + [1.0] * 6)
    assert [reach(CurriculumConfig(), s, 3) for s in range(3)] == [1.0, 1.0, 1.0]
    assert [reach(CurriculumConfig(start=0.5, ramp=0.0), s, 3) for s in range(3)] == [1.0, 1.0, 1.0]


def test_task_at_scales_the_recall_distances():
    needle = NeedleConfig(n_pairs=4, n_queries=8, min_delay=4, max_delay=128)
    assert task_at(needle, 1.0) is needle
    # ceil(0.3 * 128) = 39; at 0.05 the longest delay 7 leaves 4 distinct query steps
    assert (task_at(needle, 0.3).max_delay, task_at(needle, 0.3).n_queries) == (39, 8)
    assert (task_at(needle, 0.05).max_delay, task_at(needle, 0.05).n_queries) == (7, 4)
    assert task_at(needle, 0.01).max_delay == 4
    assert task_at(needle, 0.3).length == 43 and task_at(needle, 0.3).min_delay == 4
    regimes = RegimeConfig(min_gap=8, max_gap=48)
    assert (task_at(regimes, 0.125).min_gap, task_at(regimes, 0.125).max_gap) == (1, 6)
    assert task_at(regimes, 0.5).length == regimes.length


def test_training_batches_follow_the_curriculum(monkeypatch):
    import gdn2ts.apps.probes as probes

    seen = []

    def spy(config, seed, n):
        seen.append((config.max_delay, seed, n))
        return make_needles(config, seed, n)

    monkeypatch.setattr(probes, "make_needles", spy)
    needle = NeedleConfig(n_pairs=2, n_queries=2, min_delay=2, max_delay=40)
    train = ProbeTrainConfig(steps=4, batch=2, seeds=(3,), curriculum=CurriculumConfig(start=0.25, ramp=0.5))
    train_and_score("needle", needle, ProbeModelConfig(models=("gdn",), hidden_size=8, head_dim=4), train,
                    ProbeEvalConfig(n_streams=3, seed=77), "gdn", 3)
    # reach 0.25, 0.625, then 1: the longest delay 10, 25, 40, 40; the held-out streams use the full task
    assert seen == [(10, 3_000_000, 2), (25, 3_000_001, 2), (40, 3_000_002, 2), (40, 3_000_003, 2), (40, 77, 3)]


# ---------------------------------------------------------------------------------------------------------------
# intervals


def test_t_quantiles_are_the_tabulated_ones():
    # two-sided 95 % critical values of Student's t (any statistics table)
    table = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 9: 2.2622, 29: 2.0452}
    for df, value in table.items():
        assert t_quantile(0.975, df) == pytest.approx(value, abs=1e-4)
    assert t_quantile(0.025, 4) == pytest.approx(-2.7764, abs=1e-4)
    assert t_quantile(0.95, 4) == pytest.approx(2.1318, abs=1e-4)
    assert t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy: 1/2 + atan(1)/pi
    assert t_cdf(-1.0, 2) == pytest.approx(0.5 - 0.5 / math.sqrt(3))  # df 2: 1/2 + t / (2 sqrt(2 + t^2))


def test_mean_interval_by_hand():
    # 1..5: mean 3, sd sqrt(2.5), se sqrt(0.5); t_{0.975, 4} = 2.776445 -> half-width 1.963243
    mean, lo, hi = mean_interval([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (mean, lo, hi) == pytest.approx((3.0, 3 - 1.963243, 3 + 1.963243), abs=1e-6)
    # two seeds 0.5 and 0.7: sd 0.141421, se 0.1, t_{0.975, 1} = 12.706205
    assert mean_interval([0.5, 0.7]) == pytest.approx((0.6, 0.6 - 1.2706205, 0.6 + 1.2706205), abs=1e-6)
    # 90 %: t_{0.95, 4} = 2.131847
    assert mean_interval([1.0, 2.0, 3.0, 4.0, 5.0], level=0.9)[2] == pytest.approx(3 + 2.131847 * 0.5 ** 0.5)
    assert mean_interval([0.25])[0] == 0.25 and math.isnan(mean_interval([0.25])[1])
    assert all(math.isnan(x) for x in mean_interval([1.0, math.nan]))
    assert mean_interval([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)


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


def test_dense_gru_state_equals_encoder_state_per_layer():
    cfg = EncoderConfig(n_channels=4, hidden_size=16, n_layers=2, num_heads=2, head_dim=8)
    layer = StreamEncoder(cfg).init_state(1).layers[0]
    assert encoder_state_floats(cfg) == layer.recurrent.numel() + layer.conv.numel() == 272
    gru = GRUEncoder(cfg, encoder_state_floats(cfg))
    assert gru.state_size == 272
    assert [s.shape for s in gru.init_state(3).layers] == [torch.Size([3, 272])] * 2
    assert build_model("kda", ProbeModelConfig(), n_channels=4).config.variant == "kda"


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
    assert isinstance(cfg.evaluation, ProbeEvalConfig) and isinstance(cfg.train.curriculum, CurriculumConfig)
    assert set(cfg.model.models) == set(MODELS)
    assert cfg.model.horizon >= cfg.regimes.episode_steps - 1


def test_recipes_include_tiny_and_docs():
    assert {"tiny", "docs"} <= {p.stem for p in RECIPES}


def test_probe_command_runs_end_to_end(tmp_path):
    out, png = tmp_path / "probes.json", tmp_path / "probes.png"
    main(["probe", "--config", str(Path(RECIPES[0]).parent / "tiny.yaml"), "--train.seeds", "[0, 1]",
          "--json", str(out), "--plot", str(png), "--quiet", "true"])
    record = json.loads(out.read_text())
    assert record["config"]["train"]["seeds"] == [0, 1] and record["config"]["train"]["curriculum"]["start"] < 1
    assert set(record["tasks"]) == {"regimes", "needle"} and record["cpu_seconds"] > 0 and record["date"]
    for task, metrics in (("regimes", {"mae"}), ("needle", {"mse", "accuracy"})):
        data = record["tasks"][task]
        assert len(data["bins"]) == len(data["counts"]) and sum(data["counts"]) > 0
        assert set(data["models"]) == set(MODELS)
        for res in data["models"].values():
            assert set(res["metrics"]) == metrics and len(res["train_seconds"]) == 2
            for m in res["metrics"].values():
                assert len(m["per_seed"]) == 2 and all(len(r) == len(data["bins"]) for r in m["per_seed"])
                # a bin has a score exactly when it has events, and its interval is the t interval of the seeds
                assert [v is not None for v in m["mean"]] == [c > 0 for c in data["counts"]]
                for j, mu in enumerate(m["mean"]):
                    if mu is not None:
                        expected = mean_interval([row[j] for row in m["per_seed"]])
                        assert (mu, m["low"][j], m["high"][j]) == pytest.approx(expected)
    enc = replace(EncoderConfig(n_channels=6), hidden_size=8, head_dim=4)
    models = record["models"]
    assert {models[n]["state_floats_per_layer"]["needle"] for n in MODELS if models[n]["role"] == "mixer"} == \
        {encoder_state_floats(enc)}
    assert models["memoryless"]["state_floats_per_layer"]["regimes"] == 0
    counts = [m["parameters"]["needle"] for m in models.values()]
    assert max(counts) / min(counts) < 1.05
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_jobs_give_the_same_scores_on_two_processes(tmp_path):
    args = ["probe", "--config", str(Path(RECIPES[0]).parent / "tiny.yaml"), "--model.models", "[gdn2, gru]",
            "--tasks", "[needle]", "--quiet", "true", "--threads", "1"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    main([*args, "--json", str(one)])
    main([*args, "--json", str(two), "--workers", "2"])
    a, b = json.loads(one.read_text())["tasks"], json.loads(two.read_text())["tasks"]
    for name in ("gdn2", "gru"):
        assert a["needle"]["models"][name]["metrics"] == b["needle"]["models"][name]["metrics"]


def test_a_journal_resumes_a_killed_run(tmp_path):
    args = ["probe", "--config", str(Path(RECIPES[0]).parent / "tiny.yaml"), "--model.models", "[gdn, memoryless]",
            "--tasks", "[needle]", "--train.seeds", "[0, 1]", "--quiet", "true"]
    journal = tmp_path / "jobs.jsonl"
    full = probe_record(tmp_path / "full.json", [*args, "--journal", str(journal)])
    lines = journal.read_text().splitlines()
    assert full["resumed_jobs"] == 0 and len(lines) == 4
    # a run killed while writing its third job: two whole lines and a cut one
    journal.write_text("\n".join(lines[:2]) + "\n" + lines[2][:30])
    resumed = probe_record(tmp_path / "resumed.json", [*args, "--journal", str(journal)])
    assert resumed["resumed_jobs"] == 2
    for name in ("gdn", "memoryless"):
        a, b = (r["tasks"]["needle"]["models"][name] for r in (full, resumed))
        assert a["metrics"] == b["metrics"] and a["final_loss"] == b["final_loss"]
    # another configuration does not take the journal's jobs
    other = probe_record(tmp_path / "other.json", [*args, "--journal", str(journal), "--train.steps", "1"])
    assert other["resumed_jobs"] == 0


def probe_record(path, args):
    main([*args, "--json", str(path)])
    return json.loads(path.read_text())
