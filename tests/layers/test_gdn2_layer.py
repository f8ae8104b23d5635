"""GatedDeltaNet2: parameter count, step == forward, masks, packed sequences, gradients, init and input errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gdn2ts.layers import VARIANTS, GatedDeltaNet2, GDN2Config, GDN2State

from tolerances import assert_close

F64 = torch.float64
PRESETS = tuple(VARIANTS)
# (preset, overrides): every preset with grouped value heads (G = 2), plus the options that change the math
CASES = [(name, {"num_v_heads": 4}) for name in PRESETS] + [
    ("gdn2", {"erase_max": 2.0, "output_gate": "sigmoid"}),
    ("gdn2", {"conv_size": 1}),
    ("kda", {"erase_max": 2.0, "conv_size": 2}),
    # Mamba-2 as its 1.3B recipe lays it out: one B/C group shared by every SSM head (G = 4)
    ("mamba2", {"num_heads": 1, "num_v_heads": 4}),
    # the gate and norm options on the paper's layer
    ("gdn2", {"gate_proj": "full", "output_norm": "group", "num_v_heads": 4, "scale": 0.7, "conv_bias": True}),
    ("gdn2", {"decay_heads": "value", "num_v_heads": 4}),
]
CASE_IDS = [f"{n}-" + "-".join(f"{k}={v}" for k, v in kw.items()) for n, kw in CASES]


def tiny(name: str = "gdn2", **overrides) -> GDN2Config:
    # K != V so that a transposed state or a swapped head dimension cannot pass
    kw = dict(hidden_size=24, num_heads=2, head_k_dim=8, head_v_dim=6, gate_low_rank=4)
    return GDN2Config.variant(name, **{**kw, **overrides})


def make_layer(name: str = "gdn2", seed: int = 0, dtype: torch.dtype = F64, **overrides) -> GatedDeltaNet2:
    torch.manual_seed(seed)
    layer = GatedDeltaNet2(tiny(name, **overrides)).to(dtype)
    with torch.no_grad():
        # the Xavier gain 2^-2.5 keeps gates near their midpoints; larger weights make them vary token to token
        for m in layer.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(4.0)
        # parameters initialized to constants would hide a wrong broadcast; perturb them
        layer.o_norm.weight.add_(0.3 * torch.randn_like(layer.o_norm.weight))
        if layer.config.gate_proj == "low_rank":
            layer.g_proj[1].bias.add_(0.3 * torch.randn_like(layer.g_proj[1].bias))
        if layer.D is not None:
            layer.D.add_(0.3 * torch.randn_like(layer.D))
    return layer


def randn(*shape, dtype=F64):
    return torch.randn(*shape, dtype=dtype)


def rows(state: GDN2State, index) -> GDN2State:
    return GDN2State(state.recurrent[index], state.conv[index])


def close_state(name: str, actual: GDN2State, expected: GDN2State, dtype=F64) -> None:
    assert_close(f"{name} recurrent", actual.recurrent, expected.recurrent, dtype)
    assert_close(f"{name} conv", actual.conv, expected.conv, dtype)


def warm_state(layer: GatedDeltaNet2, batch: int, steps: int = 9) -> GDN2State:
    """A non-zero state, as left by a previous forward."""
    p = layer.q_proj.weight
    _, state = layer(torch.randn(batch, steps, layer.config.hidden_size, dtype=p.dtype))
    return GDN2State(state.recurrent.detach(), state.conv.detach())


# ------------------------------------------------------------------------------------------------------------------
# parameters


def expected_count(name: str, D=2304, H=16, K=128, V=128, r=128) -> int:
    """The parameter count GDN2.md section 2 (and, for the baselines, docs/lm.md's references) implies for a
    preset, written out independently of the layer."""
    cfg = GDN2Config.variant(name, D, H)
    HV = H
    HD = H if cfg.decay_heads == "key" else HV
    n = 3 * D * H * K  # q, k, v (HV = H)
    n += H * V * D  # o_proj
    # output gate: low-rank with a bias (GDN-2, KDA) or full rank without (GDN, Mamba-2's z)
    n += D * r + r * HV * V + HV * V if cfg.gate_proj == "low_rank" else D * HV * V
    n += (2 * H * K + HV * V) * (4 + cfg.conv_bias)  # depthwise conv (Mamba-2's with a bias)
    n += HD  # A_log
    n += V if cfg.output_norm == "head" else HV * V  # norm scale: shared by the heads, or one per channel
    n += {"channel": D * r + r * HD * K + HD * K, "scalar": D * HD + HD}[cfg.decay]  # decay projection, dt_bias
    n += {"channel": D * H * K, "scalar": D * (HV if cfg.tie_erase_write else H), "none": 0}[cfg.erase]
    if not cfg.tie_erase_write:
        n += {"channel": D * HV * V, "scalar": D * HV, "dt": 0}[cfg.write]
    n += HV if cfg.use_d_skip else 0
    return n


def test_parameter_count_paper_width():
    cfg = GDN2Config.variant("gdn2", 2304, 16, head_k_dim=128, head_v_dim=128)
    with torch.device("meta"):
        layer = GatedDeltaNet2(cfg)
    assert sum(p.numel() for p in layer.parameters()) == 29_454_480
    assert expected_count("gdn2") == 29_454_480


@pytest.mark.parametrize("name", PRESETS)
def test_preset_count_and_forward(name):
    with torch.device("meta"):
        layer = GatedDeltaNet2(GDN2Config.variant(name, 2304, 16))
    assert sum(p.numel() for p in layer.parameters()) == expected_count(name)
    small = GatedDeltaNet2(tiny(name))
    y, state = small(torch.randn(2, 7, 24))
    assert y.shape == (2, 7, 24) and torch.isfinite(y).all()
    assert state.recurrent.shape == (2, 2, 8, 6) and state.recurrent.dtype == torch.float32
    assert state.conv.shape == (2, 2 * 16 + 12, 3)


def test_config_resolves_value_heads():
    cfg = tiny()
    assert cfg.num_v_heads == 2 and cfg.conv_channels == 2 * 16 + 12
    assert GDN2Config.variant("gdn", 24, 2, num_v_heads=6).num_v_heads == 6


# ------------------------------------------------------------------------------------------------------------------
# step == forward, two passes == one pass


@pytest.mark.parametrize("T", [1, 5, 70])
@pytest.mark.parametrize("name, overrides", CASES, ids=CASE_IDS)
def test_step_equals_forward(name, overrides, T):
    layer = make_layer(name, **overrides)
    B, warm = 2, 9
    x0, x = randn(B, warm, 24), randn(B, T, 24)
    _, s0 = layer(x0)
    s0 = GDN2State(s0.recurrent.detach(), s0.conv.detach())
    s0_copy = GDN2State(s0.recurrent.clone(), s0.conv.clone())
    with torch.no_grad():
        y, s = layer(x, s0)
        state, ys = s0, []
        for t in range(T):
            y_t, state = layer.step(x[:, t], state)
            ys.append(y_t)
        # two passes carrying state == one pass
        y_full, s_full = layer(torch.cat([x0, x], dim=1))
    assert_close("step outputs", torch.stack(ys, dim=1), y, F64)
    close_state("step final", state, s)
    assert_close("one-pass outputs", y_full[:, warm:], y, F64)
    close_state("one-pass final", s_full, s)
    # the input state is never written
    assert torch.equal(s0.recurrent, s0_copy.recurrent) and torch.equal(s0.conv, s0_copy.conv)


def naive_layer(layer: GatedDeltaNet2, x: torch.Tensor, state: GDN2State) -> tuple[torch.Tensor, GDN2State]:
    """GDN2.md section 2 read literally, token by token (independent of the layer's code, sharing its weights)."""
    cfg = layer.config
    B, T, _ = x.shape
    H, HV, K, V, W = cfg.num_heads, cfg.num_v_heads, cfg.head_k_dim, cfg.head_v_dim, cfg.conv_size
    G, em = HV // H, cfg.erase_max
    HD = H if cfg.decay_heads == "key" else HV
    pre = torch.cat([layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)], -1)  # [B, T, C]
    seq = torch.cat([state.conv.transpose(1, 2), pre], 1)  # [B, W - 1 + T, C]
    taps = layer.conv.weight[:, 0, :].T  # [W, C]
    bias = 0.0 if layer.conv.bias is None else layer.conv.bias
    conv = F.silu(torch.stack([(seq[:, t:t + W] * taps).sum(1) + bias for t in range(T)], 1))
    q, k, v = conv.split([H * K, H * K, HV * V], -1)
    q, k, v = q.reshape(B, T, H, K), k.reshape(B, T, H, K), v.reshape(B, T, HV, V)
    if cfg.qk_norm == "l2":
        q, k = (t / torch.sqrt((t * t).sum(-1, keepdim=True) + 1e-6) for t in (q, k))
    if cfg.decay == "channel":
        dt = F.softplus(layer.f_proj(x).reshape(B, T, HD, K) + layer.dt_bias.reshape(HD, K))
        g = -torch.exp(layer.A_log)[:, None] * dt
    else:
        dt = F.softplus(layer.a_proj(x) + layer.dt_bias)  # [B, T, HD]
        g = (-torch.exp(layer.A_log) * dt)[..., None].repeat(1, 1, 1, K)
    ones_k, ones_v = torch.ones(K, dtype=x.dtype), torch.ones(V, dtype=x.dtype)
    if cfg.erase == "channel":
        b = em * torch.sigmoid(layer.b_proj(x).reshape(B, T, H, K)).repeat_interleave(G, 2)
    elif cfg.erase == "scalar":
        beta = em * torch.sigmoid(layer.b_proj(x))
        b = (beta if cfg.tie_erase_write else beta.repeat_interleave(G, 2))[..., None] * ones_k
    else:
        b = torch.zeros(B, T, HV, K, dtype=x.dtype)
    if cfg.write == "channel":
        w = torch.sigmoid(layer.w_proj(x).reshape(B, T, HV, V))
    elif cfg.write == "scalar":
        w = (beta if cfg.tie_erase_write else torch.sigmoid(layer.w_proj(x)))[..., None] * ones_v
    else:
        w = dt.repeat_interleave(HV // HD, 2)[..., None] * ones_v
    q, k = (t.repeat_interleave(G, 2) for t in (q, k))
    g = g.repeat_interleave(HV // HD, 2)
    scale = K**-0.5 if cfg.scale is None else cfg.scale
    S, outs = state.recurrent.clone(), []
    for t in range(T):
        S = torch.exp(g[:, t])[..., None] * S
        r = torch.einsum("bhkv,bhk->bhv", S, b[:, t] * k[:, t])
        S = S + k[:, t, :, :, None] * (w[:, t] * v[:, t] - r)[:, :, None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t] * scale))
    o = torch.stack(outs, 1)  # [B, T, HV, V]
    if cfg.use_d_skip:
        o = o + layer.D[:, None] * v
    gate = layer.g_proj(x).reshape(B, T, HV, V)
    act = F.silu(gate) if cfg.output_gate == "silu" else torch.sigmoid(gate)
    if cfg.output_norm == "head":
        o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * layer.o_norm.weight * act
    else:
        # Mamba-2: the gate first, then one RMS over the G value heads of each key head, a scale per channel
        o = (o * act).reshape(B, T, H, G * V)
        o = (o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)).reshape(B, T, HV, V)
        o = o * layer.o_norm.weight.reshape(HV, V)
    return layer.o_proj(o.reshape(B, T, HV * V)), GDN2State(S, seq[:, T:].transpose(1, 2))


@pytest.mark.parametrize("name, overrides", CASES, ids=CASE_IDS)
def test_forward_matches_the_spec_read_literally(name, overrides):
    layer = make_layer(name, **overrides)
    s0 = warm_state(layer, 2)
    x = randn(2, 7, 24)
    with torch.no_grad():
        y, s = layer(x, s0)
        y_ref, s_ref = naive_layer(layer, x, s0)
    assert_close("outputs", y, y_ref, F64)
    close_state("final", s, s_ref)


def test_step_equals_forward_fp32():
    layer = make_layer("gdn2", dtype=torch.float32)
    x = torch.randn(3, 20, 24)
    with torch.no_grad():
        y, s = layer(x)
    state = layer.init_state(3)
    ys = []
    for t in range(20):
        y_t, state = layer.step(x[:, t], state)
        ys.append(y_t)
    assert_close("fp32 step outputs", torch.stack(ys, 1), y, torch.float32)
    close_state("fp32 step final", state, s, torch.float32)


def test_autocast_bf16_runs_with_fp32_state():
    layer = make_layer("gdn2", dtype=torch.float32)
    x = torch.randn(2, 6, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s = layer(x)
        y_t, s_t = layer.step(x[:, 0], s)
    assert y.dtype == torch.bfloat16 and s.conv.dtype == torch.bfloat16 and s.recurrent.dtype == torch.float32
    assert s_t.recurrent.dtype == torch.float32 and torch.isfinite(y_t).all()
    y.float().pow(2).sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_step_is_inference_only_and_keeps_masked_rows():
    layer = make_layer("gdn2", dtype=torch.float32)
    s0 = warm_state(layer, 3)
    x_t = torch.randn(3, 24)
    # grad mode on and parameters requiring grad: step still runs, and its outputs carry no graph
    y_all, s_all = layer.step(x_t, s0)
    assert not y_all.requires_grad and not s_all.recurrent.requires_grad
    mask = torch.tensor([True, False, True])
    y, s = layer.step(x_t, s0, mask=mask)
    assert torch.equal(y[1], torch.zeros(24))
    assert torch.equal(s.recurrent[1], s0.recurrent[1]) and torch.equal(s.conv[1], s0.conv[1])
    keep = mask.nonzero()[:, 0]
    assert_close("masked step rows", y[keep], y_all[keep], torch.float32)
    close_state("masked step states", rows(s, keep), rows(s_all, keep), torch.float32)


# ------------------------------------------------------------------------------------------------------------------
# attention_mask and cu_seqlens


MASK_CASES = [("gdn2", {"num_v_heads": 4}), ("mamba2", {"num_v_heads": 4}), ("kda", {"conv_size": 1})]


@pytest.mark.parametrize("name, overrides", MASK_CASES, ids=[n for n, _ in MASK_CASES])
def test_attention_mask_equals_valid_tokens_only(name, overrides):
    layer = make_layer(name, **overrides)
    masks = torch.tensor([
        [1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1, 1, 1],  # holes in the middle
        [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1],  # left padding
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # nothing observed
        [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # one token: the new conv tail still holds part of the old one
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    ])
    B, T = masks.shape
    s0 = warm_state(layer, B)
    x = randn(B, T, 24)
    with torch.no_grad():
        y, s = layer(x, s0, attention_mask=masks)
        y_bool, s_bool = layer(x, s0, attention_mask=masks.bool())
    assert torch.equal(y, y_bool) and torch.equal(s.recurrent, s_bool.recurrent)
    for i in range(B):
        valid = masks[i].bool()
        assert torch.equal(y[i, ~valid], torch.zeros_like(y[i, ~valid]))
        if not valid.any():
            assert torch.equal(s.recurrent[i], s0.recurrent[i]) and torch.equal(s.conv[i], s0.conv[i])
            continue
        with torch.no_grad():
            y_ref, s_ref = layer(x[i:i + 1, valid], rows(s0, slice(i, i + 1)))
        assert_close(f"row {i} outputs", y[i, valid], y_ref[0], F64)
        close_state(f"row {i} final", rows(s, slice(i, i + 1)), s_ref)


def test_nothing_observed_returns_an_equal_unaliased_state():
    layer = make_layer("gdn2")
    s0 = warm_state(layer, 2)
    x = randn(2, 4, 24)
    for y, s in (layer(x[:, :0], s0), layer(x, s0, attention_mask=torch.zeros(2, 4, dtype=torch.bool))):
        assert torch.equal(y, torch.zeros_like(y))
        assert torch.equal(s.recurrent, s0.recurrent) and torch.equal(s.conv, s0.conv)
        assert s.recurrent.data_ptr() != s0.recurrent.data_ptr() and s.conv.data_ptr() != s0.conv.data_ptr()


def test_attention_mask_gradients_skip_masked_tokens():
    layer = make_layer("gdn2")
    x = randn(2, 6, 24).requires_grad_()
    mask = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    y, s = layer(x, attention_mask=mask)
    (y.pow(2).sum() + s.recurrent.pow(2).sum()).backward()
    assert torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask]))
    assert (x.grad[mask].abs().sum(-1) > 0).all()


def test_cu_seqlens_equals_separate_sequences():
    layer = make_layer("gdn2", num_v_heads=4)
    lengths = [5, 0, 70, 2]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)))
    s0 = warm_state(layer, len(lengths))
    x = randn(1, sum(lengths), 24)
    with torch.no_grad():
        y, s = layer(x, s0, cu_seqlens=cu)
        y_nostate, s_nostate = layer(x, cu_seqlens=cu)
    for i, n in enumerate(lengths):
        a, b = int(cu[i]), int(cu[i + 1])
        if n == 0:
            assert torch.equal(s.recurrent[i], s0.recurrent[i]) and torch.equal(s.conv[i], s0.conv[i])
            assert torch.equal(s_nostate.recurrent[i], torch.zeros_like(s0.recurrent[i]))
            continue
        with torch.no_grad():
            y_ref, s_ref = layer(x[:, a:b], rows(s0, slice(i, i + 1)))
            y_ref0, s_ref0 = layer(x[:, a:b])
        assert_close(f"seq {i} outputs", y[:, a:b], y_ref, F64)
        close_state(f"seq {i} final", rows(s, slice(i, i + 1)), s_ref)
        assert_close(f"seq {i} outputs (zero state)", y_nostate[:, a:b], y_ref0, F64)
        close_state(f"seq {i} final (zero state)", rows(s_nostate, slice(i, i + 1)), s_ref0)


# ------------------------------------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("name", PRESETS)
def test_gradients_reach_every_parameter(name):
    layer = make_layer(name, num_v_heads=4)
    s0 = warm_state(layer, 2)
    s0 = GDN2State(s0.recurrent.requires_grad_(), s0.conv.requires_grad_())
    x = randn(2, 70, 24).requires_grad_()
    y, s = layer(x, s0)
    loss = (y * randn(*y.shape)).sum() + (s.recurrent * randn(*s.recurrent.shape)).sum() + s.conv.sum()
    loss.backward()
    for pname, p in [("x", x), ("state.recurrent", s0.recurrent), ("state.conv", s0.conv),
                     *layer.named_parameters()]:
        assert p.grad is not None, f"{pname}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname}: non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{pname}: zero gradient"


def test_gradcheck_inputs_state_and_decay_parameters():
    layer = make_layer("gdn2", hidden_size=8, head_k_dim=4, head_v_dim=3, gate_low_rank=2)
    s0 = warm_state(layer, 2, steps=3)
    names = ("A_log", "dt_bias", "b_proj.weight")
    params = {n: p for n, p in layer.named_parameters()}

    def fn(x, recurrent, conv, *leaves):
        y, s = torch.func.functional_call(layer, {**params, **dict(zip(names, leaves, strict=True))},
                                          (x, GDN2State(recurrent, conv)))
        return y, s.recurrent, s.conv

    inputs = (randn(2, 5, 8), s0.recurrent, s0.conv, *(params[n].detach() for n in names))
    inputs = tuple(t.clone().requires_grad_() for t in inputs)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------------------------
# init


def test_init():
    torch.manual_seed(1)
    layer = GatedDeltaNet2(GDN2Config.variant("gdn2", 256, 4, head_k_dim=32, head_v_dim=32, gate_low_rank=16))
    assert layer.A_log.min() >= 0 and layer.A_log.max() <= math.log(16)
    dt = F.softplus(layer.dt_bias)
    assert dt.min() >= 1e-4 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    # log-uniform over two decades: both ends are populated
    assert dt.min() < 3e-3 and dt.max() > 3e-2
    linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 10  # q, k, v, b, w, o and two low-rank pairs
    for m in linears:
        fan_out, fan_in = m.weight.shape
        bound = 2**-2.5 * math.sqrt(6 / (fan_in + fan_out))
        assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.9 * bound
        if m.bias is not None:
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
    assert torch.equal(layer.o_norm.weight, torch.ones(32))
    assert layer.A_log._no_weight_decay and layer.dt_bias._no_weight_decay
    # Mamba-2 with one B/C group of 4 heads: a step size, decay rate and D per head, a norm scale per channel
    mamba = GatedDeltaNet2(tiny("mamba2", num_heads=1, num_v_heads=4))
    assert torch.equal(mamba.D.detach(), torch.ones(4)) and mamba.D._no_weight_decay
    assert mamba.dt_bias.shape == (4,) and mamba.A_log.shape == (4,) and mamba.a_proj.out_features == 4
    assert torch.equal(mamba.o_norm.weight.detach(), torch.ones(24)) and mamba.conv.bias.shape == (2 * 8 + 24,)
    assert isinstance(mamba.g_proj, torch.nn.Linear) and mamba.g_proj.bias is None


# ------------------------------------------------------------------------------------------------------------------
# errors


def _bad_calls():
    layer = make_layer("gdn2")
    s = layer.init_state(2)
    x = randn(2, 5, 24)
    wrong_rec = GDN2State(torch.zeros(2, 2, 6, 8, dtype=F64), s.conv)
    wrong_conv = GDN2State(s.recurrent, torch.zeros(2, 44, 2, dtype=F64))
    fp32_rec = GDN2State(s.recurrent.float(), s.conv)
    cu = torch.tensor([0, 2, 5])
    return [
        ("x 2-D", lambda: layer(randn(2, 24)), "'x'"),
        ("x hidden", lambda: layer(randn(2, 5, 23)), "'x'"),
        ("x int", lambda: layer(torch.ones(2, 5, 24, dtype=torch.long)), "'x'"),
        ("x fp32 in fp64 layer", lambda: layer(x.float()), "'x'"),
        ("state type", lambda: layer(x, s.recurrent), "'state'"),
        ("state rows", lambda: layer(x, layer.init_state(3)), "'state.recurrent'"),
        ("recurrent shape", lambda: layer(x, wrong_rec), "'state.recurrent'"),
        ("recurrent dtype", lambda: layer(x, fp32_rec), "'state.recurrent'"),
        ("conv shape", lambda: layer(x, wrong_conv), "'state.conv'"),
        ("mask and cu_seqlens", lambda: layer(x[:1], attention_mask=torch.ones(1, 5), cu_seqlens=cu),
         "'attention_mask'"),
        ("mask shape", lambda: layer(x, attention_mask=torch.ones(2, 4)), "'attention_mask'"),
        ("mask values", lambda: layer(x, attention_mask=torch.full((2, 5), 2)), "'attention_mask'"),
        ("cu_seqlens batch", lambda: layer(x, cu_seqlens=cu), "'x'"),
        ("cu_seqlens end", lambda: layer(x[:1], cu_seqlens=torch.tensor([0, 2, 4])), "'cu_seqlens'"),
        ("cu_seqlens dtype", lambda: layer(x[:1], cu_seqlens=torch.tensor([0.0, 5.0])), "'cu_seqlens'"),
        ("cu_seqlens state rows", lambda: layer(x[:1], layer.init_state(3), cu_seqlens=cu),
         "'state.recurrent'"),
        ("step x_t 3-D", lambda: layer.step(x, s), "'x_t'"),
        ("step state rows", lambda: layer.step(x[:, 0], layer.init_state(1)), "'state.recurrent'"),
        ("step mask shape", lambda: layer.step(x[:, 0], s, mask=torch.ones(3, dtype=torch.bool)), "'mask'"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_inputs_raise_value_error(case):
    what, call, arg = _bad_calls()[case]
    with pytest.raises(ValueError, match=arg):
        call()


@pytest.mark.parametrize("kwargs, field", [
    (dict(hidden_size=0), "hidden_size"),
    (dict(num_v_heads=3), "num_v_heads"),
    (dict(erase="rows"), "erase"),
    (dict(write="dt"), "write"),
    (dict(tie_erase_write=True), "tie_erase_write"),
    (dict(erase_max=3.0), "erase_max"),
    (dict(output_gate="relu"), "output_gate"),
    (dict(gate_proj="rank"), "gate_proj"),
    (dict(output_norm="layer"), "output_norm"),
    (dict(decay_heads="both"), "decay_heads"),
    (dict(scale=0.0), "scale"),
    (dict(conv_bias=1), "conv_bias"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(conv_size=0), "conv_size"),
])
def test_bad_config_raises_value_error(kwargs, field):
    with pytest.raises(ValueError, match=f"'{field}'"):
        tiny("gdn2", **kwargs)


def test_bad_variant_and_mamba2_combination():
    with pytest.raises(ValueError, match="'name'"):
        GDN2Config.variant("mamba3", 24, 2)
    with pytest.raises(ValueError, match="'write'"):
        GDN2Config.variant("mamba2", 24, 2, decay="channel")
    with pytest.raises(ValueError, match="'erase_max'"):
        GDN2Config.variant("mamba2", 24, 2, erase_max=2.0)
