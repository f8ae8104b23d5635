"""Training windows: targets are only observations after the forecast's inputs, and fitting learns."""

from __future__ import annotations

import pytest
import torch

from gdn2ts.models import EncoderConfig, StreamEncoder
from gdn2ts.streaming.train import TrainConfig, fit, make_windows, pinball_loss, sample_windows, window_loss

H = 4
CFG = EncoderConfig(n_channels=2, n_covariates=1, hidden_size=16, num_heads=2, head_dim=8, horizon=H)


@pytest.fixture(autouse=True)
def one_thread():
    # tiny matrices: a second intra-op thread only adds hand-offs (and stalls badly on a busy machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _series(S=2, N=120):
    rows = torch.arange(N, dtype=torch.float32)
    values = torch.stack([rows + 1000 * s for s in range(S)])[..., None].expand(S, N, 2).clone()
    values[..., 1] = -values[..., 1]
    times = torch.arange(N, dtype=torch.float64).expand(S, N).clone()
    return values, times, torch.randn(S, N, 1)


def test_targets_are_the_rows_after_each_position_and_never_its_inputs():
    values, times, covs = _series()
    index = sample_windows(120, 2, 64, context=20, horizon=H, generator=torch.Generator().manual_seed(0))
    w = make_windows(values, times, covs, index, context=20, horizon=H)
    # every target is later than the input it is scored for, by 1..H rows
    gap = w.target_times - w.times[..., None]
    assert torch.equal(gap, torch.arange(1, H + 1, dtype=torch.float64).expand_as(gap))
    # the values identify rows: the targets of position t are rows t+1..t+H, none of them among inputs 0..t
    row_in, row_tgt = w.values[..., 0], w.targets[..., 0]
    for t in range(20):
        assert not (row_tgt[:, t][:, :, None] == row_in[:, None, :t + 1]).any()
    # the last position's targets lie beyond the window entirely
    assert (row_tgt[:, -1] > row_in.max(dim=1, keepdim=True).values).all()


def test_windows_never_read_past_the_series_given():
    gen = torch.Generator().manual_seed(1)
    index = sample_windows(50, 3, 2000, context=30, horizon=H, generator=gen)
    assert int((index[:, 1] + 30 + H).max()) <= 50 and int(index[:, 1].min()) >= 0
    assert set(index[:, 0].tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="needs at least 34 rows"):
        sample_windows(33, 1, 1, context=30, horizon=H, generator=gen)
    values, times, _ = _series(1, 50)
    with pytest.raises(ValueError, match="windows expected inside the series"):
        make_windows(values, times, None, torch.tensor([[0, 17]]), context=30, horizon=H)


def test_loss_at_a_position_depends_on_no_later_input():
    torch.manual_seed(0)
    enc = StreamEncoder(CFG)
    values, times, covs = _series(1, 40)
    w = make_windows(values / 100, times, covs, torch.tensor([[0, 3]]), context=24, horizon=H)
    inputs = w.values.clone().requires_grad_()
    out = enc(inputs, w.times, w.covariates)
    t = 10
    valid = torch.zeros(w.targets.shape, dtype=torch.bool)
    valid[:, t] = True
    pinball_loss(out["forecast"], w.targets, CFG.quantiles, valid).backward()
    assert inputs.grad[:, :t + 1].abs().sum() > 0
    assert torch.equal(inputs.grad[:, t + 1:], torch.zeros_like(inputs.grad[:, t + 1:]))


def test_forecast_loss_skips_unobserved_positions_and_unknown_targets():
    torch.manual_seed(0)
    enc = StreamEncoder(CFG)
    values, times, covs = _series(1, 40)
    values = values / 100
    w = make_windows(values, times, covs, torch.tensor([[0, 0]]), context=30, horizon=H)
    base, _ = window_loss(enc, w)
    # a NaN target contributes nothing; an unobserved input row issues no scored forecast
    poisoned = w._replace(targets=w.targets.clone())
    poisoned.targets[0, 5, 0, 0] = float("nan")
    loss, parts = window_loss(enc, poisoned)
    assert torch.isfinite(loss) and parts["reconstruction"] == 0.0
    assert not torch.equal(loss, base)
    holes = w._replace(values=w.values.clone())
    holes.values[0, 7] = float("nan")
    loss, _ = window_loss(enc, holes)
    assert torch.isfinite(loss)


def test_masked_reconstruction_scores_hidden_cells_only():
    torch.manual_seed(0)
    enc = StreamEncoder(CFG)
    values, times, covs = _series(1, 40)
    w = make_windows(values / 100, times, covs, torch.tensor([[0, 0]]), context=30, horizon=H)
    _, parts = window_loss(enc, w, mask_prob=0.0, recon_weight=1.0)
    assert parts["reconstruction"] == 0.0
    total, parts = window_loss(enc, w, mask_prob=0.5, recon_weight=1.0, generator=torch.Generator().manual_seed(0))
    assert parts["reconstruction"] > 0
    assert float(total.detach()) == pytest.approx(parts["forecast"] + parts["reconstruction"], rel=1e-5)


def test_fit_learns_a_seasonal_series():
    torch.manual_seed(0)
    enc = StreamEncoder(EncoderConfig(n_channels=1, hidden_size=16, num_heads=2, head_dim=8, horizon=H))
    t = torch.arange(400, dtype=torch.float64)
    values = torch.sin(2 * torch.pi * t / 12).float()[None, :, None] + 0.05 * torch.randn(1, 400, 1)
    history = fit(enc, values, t[None], None, TrainConfig(context=24, batch_size=4, steps=30, lr=1e-2))
    first = sum(h["forecast"] for h in history[:5]) / 5
    last = sum(h["forecast"] for h in history[-5:]) / 5
    assert len(history) == 30 and last < 0.6 * first
    assert not enc.training


def test_train_config_validation():
    with pytest.raises(ValueError, match="'context' expected a positive int"):
        TrainConfig(context=0)
    with pytest.raises(ValueError, match="'mask_prob' expected a fraction"):
        TrainConfig(mask_prob=1.0)
    with pytest.raises(ValueError, match="expected values"):
        fit(StreamEncoder(CFG), torch.zeros(3, 2), torch.zeros(3), None)
