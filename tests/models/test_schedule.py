"""One warmup-cosine schedule for every trainer: each user's learning rates, step by step, equal (to the bit) the
formula it wrote out before it took the shared one."""

from __future__ import annotations

import math

import pytest
import torch

from gdn2ts.apps.probes import ProbeTrainConfig
from gdn2ts.lm.eval.mqar_run import MQARTrainConfig
from gdn2ts.lm.optim import OptimConfig, build_scheduler
from gdn2ts.models import EncoderConfig, StreamEncoder
from gdn2ts.models.schedule import WarmupCosine, encoder_schedule
from gdn2ts.streaming.train import TrainConfig, fit

# the formulas as each trainer wrote them before the shared schedule


def lm_factor(step, warmup, total, min_ratio):
    if step < warmup:
        return (step + 1) / warmup
    span = total - 1 - warmup
    progress = min(1.0, (step - warmup) / span) if span > 0 else 0.0
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def mqar_lr(step, t):
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(1, t.steps - 1 - t.warmup_steps)
    frac = min(1.0, (step - t.warmup_steps) / span)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def probes_lr(step, t):
    warm = max(1, t.steps // 20)
    if step < warm:
        return t.lr * (step + 1) / warm
    progress = (step - warm) / max(1, t.steps - warm)
    return t.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def stream_factor(step, steps):
    warm = max(1, steps // 20)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def _scheduler_lrs(sched, opt, steps):
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize(("lr", "warmup", "total", "min_ratio"),
                         [(4e-4, 2000, 2500, 0.1), (1e-3, 4, 20, 0.1), (3e-4, 0, 7, 0.05), (4e-4, 5, 5, 0.1),
                          (4e-4, 9, 3, 0.1), (4e-4, 0, 1, 0.1), (4e-4, 1, 2, 0.0)])
def test_lm_scheduler_keeps_its_rates(lr, warmup, total, min_ratio):
    cfg = OptimConfig(lr=lr, warmup_steps=warmup, min_lr_ratio=min_ratio)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    lrs = _scheduler_lrs(build_scheduler(opt, cfg, total), opt, total)
    assert lrs == [lr * lm_factor(s, warmup, total, min_ratio) for s in range(total)]


@pytest.mark.parametrize("kwargs", [{}, {"steps": 100, "lr": 1.0, "warmup_steps": 10}, {"steps": 3, "warmup_steps": 1},
                                    {"steps": 5, "warmup_steps": 0, "min_lr_ratio": 0.3},
                                    {"steps": 4, "warmup_steps": 4}, {"steps": 3, "warmup_steps": 8},
                                    {"steps": 1, "warmup_steps": 0}])
def test_mqar_keeps_its_rates(kwargs):
    t = MQARTrainConfig(**kwargs)
    lr = t.schedule()
    assert [lr(s) for s in range(t.steps)] == [mqar_lr(s, t) for s in range(t.steps)]


@pytest.mark.parametrize("kwargs", [{}, {"steps": 1}, {"steps": 2}, {"steps": 20}, {"steps": 41, "lr": 1e-2}])
def test_probes_keep_their_rates(kwargs):
    t = ProbeTrainConfig(**kwargs)
    lr = encoder_schedule(t.steps, peak=t.lr)  # as run_task builds it
    assert [lr(s) for s in range(t.steps)] == [probes_lr(s, t) for s in range(t.steps)]


@pytest.mark.parametrize("steps", [1, 2, 19, 20, 21, 600])
def test_stream_training_keeps_its_factors(steps):
    f = encoder_schedule(steps)
    assert [f(s) for s in range(steps)] == [stream_factor(s, steps) for s in range(steps)]


def test_fit_steps_at_the_old_rates(monkeypatch):
    seen = []
    step = torch.optim.AdamW.step

    def record(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    torch.manual_seed(0)
    enc = StreamEncoder(EncoderConfig(n_channels=1, hidden_size=8, head_dim=4, horizon=2))
    t = torch.arange(40.0).double()[None]
    config = TrainConfig(context=8, batch_size=2, steps=22)
    fit(enc, torch.sin(t / 3).float()[..., None], t, None, config, quiet=True)
    assert seen == [config.lr * stream_factor(s, config.steps) for s in range(config.steps)]


def test_floor_step_and_validation():
    f = WarmupCosine(2, 10, 0.2, peak=3.0, floor_step=6)
    assert f(6) == pytest.approx(0.6) and f(9) == pytest.approx(0.6)  # at the floor from floor_step on
    with pytest.raises(ValueError, match="'total_steps' expected an int >= 1"):
        WarmupCosine(0, 0, 0.1)
    with pytest.raises(ValueError, match="'warmup_steps' expected an int >= 0"):
        WarmupCosine(-1, 5, 0.1)
