"""Eviction audits: energy terms sum exactly and follow the layers' actual states, unobserved steps are identity,
agreement with explicit matrices in float64, recall and half-lives, no side effects, bad input, Parquet logs,
summary, plot and the command."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch

from gdn2ts.apps.audit_report import (
    append_audit_log,
    append_parquet,
    audit_summary_text,
    plot_audit,
    summarize_audit,
)
from gdn2ts.cli import main
from gdn2ts.models import EncoderConfig, StreamEncoder
from gdn2ts.streaming.audit import SCHEMAS, audit_encoder


@pytest.fixture(autouse=True)
def one_thread():
    # tiny tensors: one thread avoids oversubscribing the cores that other test processes share
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def encoder(variant="gdn2", head_dim=4, seed=0):
    torch.manual_seed(seed)
    cfg = EncoderConfig(n_channels=2, hidden_size=8, n_layers=2, num_heads=2, head_dim=head_dim, variant=variant,
                        horizon=2, time_unit=1.5)
    return StreamEncoder(cfg).double()


def data(B=2, T=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(B, T, 2, generator=gen, dtype=torch.float64)
    values[torch.rand(B, T, 2, generator=gen) < 0.25] = math.nan
    values[:, 3] = math.nan  # nothing observed
    values[1, 9:11] = math.nan
    values[:, [0, 5, 12]] = torch.randn(B, 3, 2, generator=gen, dtype=torch.float64)  # fully observed
    times = 100.0 + torch.cumsum(torch.rand(B, T, generator=gen, dtype=torch.float64) * 3 + 0.1, dim=1)
    return values, times


def warm_state(enc, seed=2):
    """A non-zero starting state from an earlier window, ending before ``data``'s times."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(2, 6, 2, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        return enc(values, torch.arange(6.0, dtype=torch.float64).expand(2, 6).contiguous())["state"]


def head_energy(state):
    return [s.recurrent.square().sum((-2, -1)) for s in state.layers]  # per layer [B, HV]


def table(frame, *keys):
    """A column of a long table as an array indexed by ``keys`` (their values are dense 0-based ints)."""
    return frame.sort(list(keys))


@pytest.mark.parametrize("variant", ["gdn2", "kda", "gdn", "mamba2"])
def test_energy_terms_sum_exactly_and_follow_the_layers_states(variant):
    enc = encoder(variant)
    values, times = data()
    state = warm_state(enc)
    audit = audit_encoder(enc, values, times, state=state)
    e = audit.energy
    residual = (e["energy_before"] - e["decay_removed"] + e["erase_change"] + e["write_change"]
                - e["energy_after"]).abs().to_numpy()
    assert (residual <= 1e-12 * np.maximum(1.0, e["energy_after"].to_numpy())).all()
    assert (e["decay_removed"].to_numpy() >= -1e-15).all()
    B, T = values.shape[:2]
    before = e.sort("stream", "layer", "head", "step")["energy_before"].to_numpy().reshape(B, 2, 2, T)
    after = e.sort("stream", "layer", "head", "step")["energy_after"].to_numpy().reshape(B, 2, 2, T)
    # the encoder's own step-by-step states, step after step
    for layer, energy in enumerate(head_energy(state)):
        np.testing.assert_allclose(before[:, layer, :, 0], energy.numpy(), rtol=1e-12, atol=1e-14)
    s = state
    for t in range(T):
        s = enc.step(values[:, t], times[:, t], state=s)["state"]
        for layer, energy in enumerate(head_energy(s)):
            np.testing.assert_allclose(after[:, layer, :, t], energy.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(before[..., 1:], after[..., :-1])
    # the per-channel erase changes add up to the erase term
    by_step = (audit.channels.group_by("stream", "layer", "head", "step").agg(pl.col("erase_change").sum())
               .sort("stream", "layer", "head", "step"))
    np.testing.assert_allclose(by_step["erase_change"].to_numpy(),
                               e.sort("stream", "layer", "head", "step")["erase_change"].to_numpy(), atol=1e-13)


def test_unobserved_steps_are_identity():
    enc = encoder()
    values, times = data()
    audit = audit_encoder(enc, values, times, state=warm_state(enc))
    idle = audit.energy.filter(~pl.col("observed"))
    unobserved = torch.isnan(values).all(-1)
    assert bool(unobserved[:, 3].all()) and bool(unobserved[1, 9:11].all())
    assert idle.height == int(unobserved.sum()) * 2 * 2  # layers x heads
    assert (idle["decay_removed"] == 0).all() and (idle["erase_change"] == 0).all()
    assert (idle["write_change"] == 0).all() and (idle["energy_before"] == idle["energy_after"]).all()
    assert (idle["energy_before"] > 0).all()
    idle_channels = audit.channels.join(idle.select("stream", "layer", "head", "step"),
                                        on=["stream", "layer", "head", "step"])
    assert idle_channels.height == idle.height * 4
    assert (idle_channels["erase_mass"] == 0).all() and (idle_channels["erase_change"] == 0).all()


def mixer_inputs(enc, values, times, state):
    """The op inputs of every mixer, captured independently of the audit module."""
    calls = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, kw: calls.append((args, kw)), with_kwargs=True)
             for m in enc.mixers]
    with torch.no_grad():
        enc(values, times, state=state)
    for h in hooks:
        h.remove()
    out = []
    for m, (args, kw) in zip(enc.mixers, calls, strict=True):
        out.append([t.numpy() for t in m.op_inputs(*args, **kw)])
    return out


def test_agrees_with_explicit_matrices_in_float64():
    enc = encoder()
    values, times = data()
    state = warm_state(enc)
    tags = {"early": ("a", 1), "mid": (1, 6), "last": ("b", 15)}
    audit = audit_encoder(enc, values, times, state=state, tags=tags, stream_ids=["a", "b"])
    B, T = values.shape[:2]
    observed = ~torch.isnan(values).all(-1).numpy()
    tn = times.numpy()
    rows = {"a": 0, "b": 1}
    energy = audit.energy.sort("stream", "layer", "head", "step")
    channels = audit.channels.sort("stream", "layer", "head", "step", "channel")
    recall = audit.recall.sort("tag", "layer", "head", "step")
    n_half = 0
    for layer, (_q, k, v, g, b, w) in enumerate(mixer_inputs(enc, values, times, state)):
        for n in range(B):
            for h in range(2):
                S = state.layers[layer].recurrent[n, h].numpy().copy()
                Ss = []
                for t in range(T):
                    kt = k[n, t, h]
                    D = np.diag(np.exp(g[n, t, h]))
                    M = np.eye(4) - np.outer(kt, b[n, t, h] * kt)
                    S1 = D @ S
                    S2 = M @ S1
                    S3 = S2 + np.outer(kt, w[n, t, h] * v[n, t, h])
                    i = ((n * 2 + layer) * 2 + h) * T + t
                    got = energy.row(i, named=True)
                    assert (got["stream"], got["layer"], got["head"], got["step"]) == ("ab"[n], layer, h, t)
                    np.testing.assert_allclose(
                        [got["energy_before"], got["decay_removed"], got["erase_change"], got["write_change"],
                         got["energy_after"]],
                        [np.sum(S**2), np.sum(S**2) - np.sum(S1**2), np.sum(S2**2) - np.sum(S1**2),
                         np.sum(S3**2) - np.sum(S2**2), np.sum(S3**2)], rtol=1e-10, atol=1e-14)
                    r = S1.T @ (b[n, t, h] * kt)
                    np.testing.assert_allclose(channels["erase_mass"].to_numpy()[i * 4:(i + 1) * 4],
                                               kt**2 * (r @ r), rtol=1e-10, atol=1e-15)
                    np.testing.assert_allclose(channels["erase_change"].to_numpy()[i * 4:(i + 1) * 4],
                                               (S2**2).sum(1) - (S1**2).sum(1), rtol=1e-10, atol=1e-14)
                    S = S3
                    Ss.append(S3)
                for name, (stream, step) in tags.items():
                    if rows.get(stream, stream) != n:
                        continue
                    ke, ue = k[n, step, h], w[n, step, h] * v[n, step, h]
                    A = np.outer(ke, ue)
                    want_ret, want_rec = [], []
                    for t in range(step, T):
                        if t > step:
                            A = (np.eye(4) - np.outer(k[n, t, h], b[n, t, h] * k[n, t, h])) @ np.diag(
                                np.exp(g[n, t, h])) @ A
                        norm = (ke @ ke) * (ue @ ue)
                        want_ret.append(ke @ A @ ue / norm)
                        want_rec.append(ke @ Ss[t] @ ue / norm)
                    which = (pl.col("tag") == name) & (pl.col("layer") == layer) & (pl.col("head") == h)
                    sel = recall.filter(which)
                    np.testing.assert_array_equal(sel["step"].to_numpy(), np.arange(step, T))
                    np.testing.assert_allclose(sel["retention"].to_numpy(), want_ret, rtol=1e-9, atol=1e-12)
                    np.testing.assert_allclose(sel["recall"].to_numpy(), want_rec, rtol=1e-9, atol=1e-12)
                    np.testing.assert_allclose(sel["since"].to_numpy(), tn[n, step:] - tn[n, step])
                    below = [t for t in range(step + 1, T) if observed[n, t] and want_ret[t - step] <= 0.5]
                    half = audit.associations.filter(which)["half_life"].item()
                    if below:
                        n_half += 1
                        # log-linear in time between the last observation above half and the first below
                        j = below[0]
                        i = max(t for t in range(step, j) if observed[n, t])
                        r_i, r_j = want_ret[i - step], want_ret[j - step]
                        frac = (np.log(r_i / 0.5) / np.log(r_i / r_j) if r_j > 0 else
                                (r_i - 0.5) / (r_i - r_j))
                        want = tn[n, i] - tn[n, step] + frac * (tn[n, j] - tn[n, i])
                        assert half == pytest.approx(want, rel=1e-9)
                        assert tn[n, i] - tn[n, step] < half <= tn[n, j] - tn[n, step]
                    else:
                        assert half is None
    assert n_half > 0


def test_recall_is_one_at_the_event_and_half_life_is_none_when_it_never_falls():
    enc = encoder()
    values, times = data()
    column = torch.zeros(2, 16, dtype=torch.bool)
    column[0, 2], column[1, 15] = True, True
    audit = audit_encoder(enc, values, times, tags=column, stream_ids=["x", "y"])
    assert sorted(audit.associations["tag"].unique().to_list()) == ["x@2", "y@15"]
    at_event = audit.recall.filter(pl.col("since") == 0)
    assert at_event.height == 2 * 2 * 2
    np.testing.assert_allclose(at_event["retention"].to_numpy(), 1.0, rtol=1e-12)
    last = audit.associations.filter(pl.col("tag") == "y@15")
    assert last["half_life"].is_null().all()  # the window ends at the event
    assert (audit.associations["key_norm"] > 0.99).all() and (audit.associations["value_norm"] > 0).all()


def test_audit_changes_neither_model_nor_state():
    enc = encoder()
    values, times = data()
    state = warm_state(enc)
    params = {k: v.clone() for k, v in enc.state_dict().items()}
    saved = [t.clone() for s in state.layers for t in s] + [state.last_time.clone(), state.last_output.clone()]
    before = enc(values, times, state=state)["forecast"]
    audit_encoder(enc, values, times, state=state, tags={"t": (0, 5)})
    with pytest.raises(ValueError, match="is not after"):
        audit_encoder(enc, values, times.flip(1), state=state)  # refused before the forward
    # a failure inside the forward, after the hooks are set, removes them too
    broken = enc.mixers[1]
    broken.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("mixer failed"))
    with pytest.raises(RuntimeError, match="mixer failed"):
        audit_encoder(enc, values, times, state=state)
    del broken.forward
    assert all(torch.equal(v, enc.state_dict()[k]) for k, v in params.items())
    now = [t for s in state.layers for t in s] + [state.last_time, state.last_output]
    assert all(torch.equal(a, b) for a, b in zip(saved, now, strict=True))
    assert all(not m._forward_pre_hooks for m in enc.mixers)
    assert all(p.grad is None for p in enc.parameters())
    torch.testing.assert_close(enc(values, times, state=state)["forecast"], before, rtol=0, atol=0)


def test_bad_input_is_named():
    enc = encoder()
    values, times = data()
    bad_inf = values.clone()
    bad_inf[0, 2, 1] = math.inf
    cases = [
        (dict(values=values[..., :1]), "values"),
        (dict(values=bad_inf), "inf"),
        (dict(timestamps=times[:, :5]), "timestamps"),
        (dict(values=values[:, :0], timestamps=times[:, :0]), "at least one step"),
        (dict(tags={"t": ("nope", 2)}, stream_ids=["a", "b"]), "unknown stream 'nope'"),
        (dict(tags={"t": (2, 2)}), "unknown stream 2"),
        (dict(tags={"t": (0, 16)}), "step 16 out of range"),
        (dict(tags={"t": (0, -1)}), "step -1 out of range"),
        (dict(tags={"t": (0, 3)}), "nothing is observed"),
        (dict(tags={"t": 3}), "tag 't'"),
        (dict(tags=torch.zeros(2, 15, dtype=torch.bool)), "tags"),
        (dict(tags=torch.zeros(2, 16)), "tags"),
        (dict(stream_ids=["a"]), "stream_ids"),
        (dict(stream_ids=["a", "a"]), "stream_ids"),
        (dict(encoder=torch.nn.Linear(2, 2)), "encoder"),
    ]
    for overrides, message in cases:
        kwargs = {"encoder": enc, "values": values, "timestamps": times, **overrides}
        with pytest.raises(ValueError, match=message):
            audit_encoder(**kwargs)
    assert all(not m._forward_pre_hooks for m in enc.mixers)


def test_parquet_logs_append_with_schema_check(tmp_path):
    enc = encoder()
    values, times = data()
    audit = audit_encoder(enc, values, times, tags={"t": (0, 4)})
    paths = append_audit_log(audit, tmp_path)
    append_audit_log(audit, tmp_path)
    for name, frame in audit.tables().items():
        logged = pl.read_parquet(paths[name])
        assert dict(logged.schema) == SCHEMAS[name] and logged.height == 2 * frame.height
        assert logged.equals(pl.concat([frame, frame]))
    # a file with other columns is refused and left as it was, and so are the other logs
    bad = tmp_path / "audit_recall.parquet"
    pl.DataFrame({"x": [1]}).write_parquet(bad)
    kept = {p: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match="audit_recall.parquet holds columns"):
        append_audit_log(audit, tmp_path)
    with pytest.raises(ValueError, match="holds columns"):
        append_parquet(audit.recall, bad)
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == kept  # no temporary file left either


def test_summary_and_plot(tmp_path):
    enc = encoder()
    values, times = data()
    audit = audit_encoder(enc, values, times, tags={"a": (0, 1), "b": (1, 2)})
    summary = summarize_audit(audit)
    assert summary["layer"].to_list() == [0, 1]
    e = audit.energy.filter(pl.col("observed") & (pl.col("layer") == 1) & (pl.col("energy_before") > 0))
    row = summary.row(1, named=True)
    assert row["decay_removed"] == pytest.approx((e["decay_removed"] / e["energy_before"]).mean())
    assert row["erase_removed"] == pytest.approx((-e["erase_change"] / e["energy_before"]).mean())
    assert row["write_added"] == pytest.approx((e["write_change"] / e["energy_before"]).mean())
    half = audit.associations.filter(pl.col("layer") == 1)["half_life"]
    assert (row["tagged"], row["pairs"], row["fell_to_half"]) == (2, 4, half.is_not_null().sum())
    if half.is_not_null().all():  # nothing censored: the Kaplan-Meier quartiles are order statistics
        ordered = half.sort().to_list()
        assert (row["half_life_q25"], row["median_half_life"], row["half_life_q75"]) == tuple(ordered[:3])
    observed = ~torch.isnan(values).all(-1)
    gaps = np.concatenate([np.diff(times[b][observed[b]].numpy()) for b in range(2)])
    assert row["spacing"] == pytest.approx(np.median(gaps))
    text = audit_summary_text(audit, unit="h", horizon=4.0)
    assert "layer 0: decay removes" in text and "layer 1:" in text and "2 tags" in text
    assert "forgets fastest" in text and "At the forecast horizon, 4 h ahead" in text
    fig = plot_audit(audit, tmp_path / "audit.png", stream="1")
    assert (tmp_path / "audit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes) == 2 * 2 + 2  # a flows panel (and its energy twin) per layer, channels, recall
    with pytest.raises(ValueError, match="unknown stream 'zz'"):
        plot_audit(audit, stream="zz")


def mamba2_encoder(half_lives: list[list[float]]):
    """An encoder whose state forgets at known rates: the Mamba-2 preset (no erase, one decay per head) with the
    decay made constant, ``g = -ln 2 / h`` per time unit for head half-life ``h``. A written association then keeps
    ``0.5 ** (dt / h)`` of itself after a time ``dt``, whatever the inputs."""
    torch.manual_seed(0)
    cfg = EncoderConfig(n_channels=2, hidden_size=8, n_layers=len(half_lives), num_heads=len(half_lives[0]),
                        head_dim=4, variant="mamba2", horizon=2)
    enc = StreamEncoder(cfg).double()
    with torch.no_grad():
        for mixer, hs in zip(enc.mixers, half_lives, strict=True):
            assert mixer.config.erase == "none" and mixer.config.decay == "scalar"
            mixer.a_proj.weight.zero_()
            mixer.dt_bias.zero_()  # softplus(0) = ln 2
            mixer.A_log.copy_(-torch.log(torch.tensor(hs, dtype=torch.float64)))
    return enc


@pytest.mark.parametrize("spacing", ["hourly", "irregular"])
def test_half_lives_recover_known_decay_rates(spacing):
    """Half-lives of 0.5, 1.7 and 3 steps (and 0.8) recovered from hourly and from irregular observations: below
    and above one step, not floored at the first observation."""
    half_lives = [[0.5, 1.7], [3.0, 0.8]]
    enc = mamba2_encoder(half_lives)
    gen = torch.Generator().manual_seed(4)
    T = 40
    values = torch.randn(2, T, 2, generator=gen, dtype=torch.float64)
    if spacing == "hourly":
        times = torch.arange(T, dtype=torch.float64).expand(2, T).contiguous()
    else:
        times = torch.cumsum(torch.rand(2, T, generator=gen, dtype=torch.float64) * 1.4 + 0.3, dim=1)
        values[0, 7:9] = float("nan")  # no observation for a while after the first event
    audit = audit_encoder(enc, values, times, tags={"e0": (0, 6), "e1": (1, 20)})
    got = audit.associations.sort("tag", "layer", "head")
    assert got.height == 8
    for r in got.iter_rows(named=True):
        want = half_lives[r["layer"]][r["head"]]
        assert r["half_life"] == pytest.approx(want, rel=1e-9), r
    # the retention itself is the exponential, 0.5 ** (since / h), at every observation (held between them)
    rec = audit.recall.filter((pl.col("tag") == "e0") & (pl.col("layer") == 0) & (pl.col("head") == 1))
    seen = (~torch.isnan(values[0, 6:]).all(-1)).numpy()
    np.testing.assert_allclose(rec["retention"].to_numpy()[seen], 0.5 ** (rec["since"].to_numpy()[seen] / 1.7),
                               rtol=1e-9)
    summary = summarize_audit(audit)
    assert summary["median_half_life"].to_list() == pytest.approx([0.5, 0.8], rel=1e-9)
    assert summary["fell_to_half"].to_list() == [4, 4]
    text = audit_summary_text(audit, unit="h", horizon=24)
    assert "layer 0 forgets fastest" in text and "layer 1 keeps longest: 0.8 h" in text


def test_half_life_interpolates_between_observations():
    from gdn2ts.streaming.audit import _half_life

    times = np.array([0.0, 1.0, 2.0, 4.0, 5.0])
    observed = np.array([True, True, False, True, True])
    # above half until step 1, below at step 3 (step 2 is unobserved: the state holds): log-linear from 1 to 4
    retention = np.array([1.0, 0.8, 0.8, 0.2, 0.1])
    want = 1.0 + np.log(0.8 / 0.5) / np.log(0.8 / 0.2) * 3.0
    assert _half_life(times, observed, 0, retention) == pytest.approx(want, rel=1e-12)
    # a retention that turns negative (an erase can overshoot): linear across the crossing
    retention = np.array([1.0, 0.8, 0.8, -0.4, 0.1])
    assert _half_life(times, observed, 0, retention) == pytest.approx(1.0 + 0.3 / 1.2 * 3.0, rel=1e-12)
    assert np.isnan(_half_life(times, observed, 0, np.array([1.0, 0.9, 0.9, 0.6, 0.51])))
    # an event later in the window counts from its own time
    assert _half_life(times, observed, 1, np.array([1.0, 1.0, 1.0, 0.5, 0.2])) == pytest.approx(3.0)


def test_censored_pairs_enter_the_quartiles_as_longer_than_their_window():
    from gdn2ts.apps.audit_report import _km_quantiles

    # six pairs: three fell (1, 2, 4), three still above half when their windows ended (0.5, 3, 9)
    durations = np.array([1.0, 2.0, 4.0, 0.5, 3.0, 9.0])
    fell = np.array([True, True, True, False, False, False])
    # at risk 5 at t=1 (0.5 ended first): S = 4/5; at 2: S = 4/5 * 3/4 = 3/5; at 4 (3 ended): S = 3/5 * 1/2
    assert _km_quantiles(durations, fell, (0.25, 0.5, 0.75)) == [2.0, 4.0, None]
    assert _km_quantiles(durations[:3], fell[:3], (0.5,)) == [2.0]


def test_audit_command(tmp_path, capsys):
    out = tmp_path / "fig" / "audit.png"
    main(["audit", "--out", str(out), "--steps", "90", "--train_steps", "2", "--streams", "2",
          "--parquet", str(tmp_path / "logs")])
    text = capsys.readouterr().out
    assert "layer 1: decay removes" in text and out.exists()
    recall = pl.read_parquet(tmp_path / "logs" / "audit_recall.parquet")
    assert recall.height > 0 and recall["tag"].str.contains("regime").all()
    with pytest.raises(SystemExit, match="streams"):
        main(["audit", "--out", str(out), "--streams", "0", "--quiet", "true"])
