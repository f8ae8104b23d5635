"""The streaming encoder: parallel forward == step by step (missing values, unobserved steps, irregular times),
restarts, exact skipping of unobserved steps, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from gdn2ts.models import EncoderConfig, StreamEncoder


def encoder(variant="gdn2", n_cov=0, seed=0):
    torch.manual_seed(seed)
    cfg = EncoderConfig(n_channels=3, n_covariates=n_cov, hidden_size=16, n_layers=2, num_heads=2, head_dim=8,
                        variant=variant, horizon=4, time_unit=2.0)
    return StreamEncoder(cfg).double()


def data(B=2, T=40, n_cov=0, seed=1):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(B, T, 3, generator=gen, dtype=torch.float64)
    values[torch.rand(B, T, 3, generator=gen) < 0.3] = float("nan")  # missing channels
    values[:, 5] = float("nan")  # a step with nothing observed, in every stream
    values[0, 17:20] = float("nan")
    times = torch.cumsum(torch.rand(B, T, generator=gen, dtype=torch.float64) * 3 + 0.1, dim=1)
    cov = torch.randn(B, T, n_cov, generator=gen, dtype=torch.float64) if n_cov else None
    return values, times, cov


@pytest.mark.parametrize("variant,n_cov", [("gdn2", 0), ("kda", 2), ("gdn", 0)])
def test_parallel_equals_step_by_step(variant, n_cov):
    enc = encoder(variant, n_cov)
    values, times, cov = data(n_cov=n_cov)
    out = enc(values, times, cov)
    state = None
    for t in range(values.shape[1]):
        step = enc.step(values[:, t], times[:, t], None if cov is None else cov[:, t], state)
        state = step["state"]
        for key in ("forecast", "reconstruction"):
            torch.testing.assert_close(step[key], out[key][:, t], atol=1e-9, rtol=1e-8)
    for a, b in zip(state.layers, out["state"].layers, strict=True):
        torch.testing.assert_close(a.recurrent, b.recurrent, atol=1e-9, rtol=1e-8)
        torch.testing.assert_close(a.conv, b.conv, atol=1e-12, rtol=0)
    assert torch.equal(state.last_time, out["state"].last_time)


def test_two_windows_carrying_state_equal_one():
    enc = encoder()
    values, times, _ = data(T=50)
    whole = enc(values, times)
    first = enc(values[:, :23], times[:, :23])
    second = enc(values[:, 23:], times[:, 23:], state=first["state"])
    torch.testing.assert_close(torch.cat([first["forecast"], second["forecast"]], 1), whole["forecast"],
                               atol=1e-9, rtol=1e-8)
    torch.testing.assert_close(second["state"].layers[-1].recurrent, whole["state"].layers[-1].recurrent,
                               atol=1e-9, rtol=1e-8)


def test_unobserved_step_leaves_state_unchanged_and_repeats_the_forecast():
    enc = encoder()
    values, times, _ = data(T=10)
    state = enc(values, times)["state"]
    nothing = torch.full((2, 3), float("nan"), dtype=torch.float64)
    out = enc.step(nothing, times[:, -1] + 5.0, state=state)
    for a, b in zip(out["state"].layers, state.layers, strict=True):
        assert torch.equal(a.recurrent, b.recurrent) and torch.equal(a.conv, b.conv)
    assert torch.equal(out["state"].last_time, state.last_time)
    assert torch.equal(out["forecast"], enc.heads(state.last_output)["forecast"])
    assert not out["observed"].any()


def test_quantiles_are_ordered():
    enc = encoder()
    values, times, _ = data()
    f = enc(values, times)["forecast"]
    assert (f[..., 1:] >= f[..., :-1]).all()


def test_elapsed_time_changes_the_state():
    enc = encoder()
    values, times, _ = data(T=12)
    slow = enc(values, times * 10)["state"].layers[0].recurrent
    fast = enc(values, times)["state"].layers[0].recurrent
    assert not torch.allclose(slow, fast)


def test_gradients_reach_every_parameter():
    enc = encoder()
    values, times, _ = data(T=20)
    out = enc(values, times)
    (out["forecast"].square().mean() + out["reconstruction"].square().mean()).backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


@pytest.mark.parametrize("mutate,pattern", [
    (lambda v, t, c: (v.index_put_((torch.tensor([0]), torch.tensor([3])), torch.tensor(float("inf"),
                                                                                      dtype=v.dtype)), t, c),
     "'values' expected finite values or NaN"),
    (lambda v, t, c: (v[..., :2], t, c), r"'values' expected shape \[B, T, 3\]"),
    (lambda v, t, c: (v, t[:, :5], c), "'timestamps' expected a floating tensor"),
    (lambda v, t, c: (v, t.index_put((torch.tensor([1]), torch.tensor([8])), torch.tensor(0.0,
                                                                                         dtype=t.dtype)), c),
     "row 1, step 8"),
    (lambda v, t, c: (v, t, torch.zeros(2, 10, 1, dtype=v.dtype)), "'covariates' expected None"),
])
def test_bad_input(mutate, pattern):
    enc = encoder()
    values, times, cov = data(T=10)
    v, t, c = mutate(values.clone(), times.clone(), cov)
    with pytest.raises(ValueError, match=pattern):
        enc(v, t, c)


def test_timestamp_before_the_state_is_rejected():
    enc = encoder()
    values, times, _ = data(T=10)
    state = enc(values, times)["state"]
    with pytest.raises(ValueError, match="is not after"):
        enc.step(values[:, 0], times[:, 3], state=state)
    assert math.isfinite(float(state.last_time[0]))


def test_config_validation():
    with pytest.raises(ValueError, match="'quantiles' expected increasing"):
        EncoderConfig(n_channels=2, quantiles=(0.9, 0.1))
    with pytest.raises(ValueError, match="'n_channels' expected a positive int"):
        EncoderConfig(n_channels=0)


def test_predict_false_gives_the_same_state_without_heads():
    enc = encoder()
    values, times, _ = data(T=30)
    values[1, -4:] = float("nan")  # the window ends between observations for one stream
    state = enc(values[:, :7], times[:, :7])["state"]
    full = enc(values[:, 7:], times[:, 7:], state=state)
    lean = enc(values[:, 7:], times[:, 7:], state=state, predict=False)
    assert set(lean) == {"observed", "state"}
    for a, b in zip(flat(full["state"]), flat(lean["state"]), strict=True):
        assert torch.equal(a, b)
    full_step = enc.step(values[:, 7], times[:, 7], state=state)
    lean_step = enc.step(values[:, 7], times[:, 7], state=state, predict=False)
    assert set(lean_step) == {"observed", "state"}
    assert all(torch.equal(a, b) for a, b in zip(flat(full_step["state"]), flat(lean_step["state"]), strict=True))
    empty = enc(values[:, :0], times[:, :0], state=state, predict=False)["state"]
    assert all(torch.equal(a, b) for a, b in zip(flat(empty), flat(state), strict=True))


def flat(state):
    return [t for layer in state.layers for t in layer] + [state.last_time, state.last_output]


def test_without_value_checks_a_bad_value_stays_in_its_stream(monkeypatch):
    """As on CUDA without GDN2TS_CHECK_VALUES=1: nothing read back, nothing raised, the other streams untouched;
    check_inputs still checks."""
    from gdn2ts.ops import validate

    enc = encoder()
    values, times, _ = data(T=12)
    clean_out = enc(values, times)
    bad_values, bad_times = values.clone(), times.clone()
    bad_values[0, 3, 1] = float("inf")
    bad_times[1, 6] = bad_times[1, 2]  # stream 1 goes back in time
    bad_values[1, 6] = 0.5
    monkeypatch.setattr(validate, "check_values", lambda t: False)
    out = enc(bad_values, bad_times)
    assert not torch.isfinite(out["forecast"][0, 3:]).all()
    assert torch.isfinite(out["forecast"][1]).all() and torch.isfinite(out["state"].layers[0].recurrent[1]).all()
    # stream by stream: each row is its own stream, so a clean run of stream 1 alone gives its outputs
    alone = enc(bad_values[1:], bad_times[1:])
    torch.testing.assert_close(out["forecast"][1:], alone["forecast"], atol=1e-12, rtol=0)
    torch.testing.assert_close(out["forecast"][1, :6], clean_out["forecast"][1, :6], atol=1e-12, rtol=0)
    state = enc(values, times)["state"]
    step = enc.step(values[:, 0], times[:, 0], state=state)  # before the state's last observation: not checked
    assert torch.isfinite(step["state"].layers[0].recurrent).all()
    assert torch.equal(step["state"].last_time, state.last_time)
    with pytest.raises(ValueError, match="expected finite values or NaN"):
        enc.check_inputs(bad_values, times)
    with pytest.raises(ValueError, match="row 1, step 6"):
        enc.check_inputs(values, bad_times)
    with pytest.raises(ValueError, match="is not after"):
        enc.check_inputs(values[:, :1], times[:, :1], state=state)
    assert enc.check_inputs(values, times) == (2, 12)


@pytest.mark.gpu
def test_cuda_value_checks_follow_the_debug_switch(monkeypatch):
    enc = encoder().float().cuda()
    values, times, _ = data(T=6)
    values, times = values.float().cuda(), times.cuda()
    values[0, 2, 0] = float("inf")
    monkeypatch.delenv("GDN2TS_CHECK_VALUES", raising=False)
    state = enc(values[:, :1].nan_to_num(posinf=0.0), times[:, :1])["state"]
    enc.step(values[:, 1], times[:, 1], state=state, predict=False)  # compiles the step's kernels
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        enc.step(values[:, 2], times[:, 2], state=state, predict=False)  # reads nothing back: no error
    finally:
        torch.cuda.set_sync_debug_mode(before)
    monkeypatch.setenv("GDN2TS_CHECK_VALUES", "1")
    with pytest.raises(ValueError, match="expected finite values or NaN"):
        enc.step(values[:, 2], times[:, 2], state=state)
    with pytest.raises(ValueError, match="is not after"):
        enc.step(values[:, 0].nan_to_num(posinf=0.0), times[:, 0], state=state)
