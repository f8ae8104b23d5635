"""The baselines against flash-linear-attention's layers (fla-core 0.6.0): the same weights copied into our
``GatedDeltaNet2`` presets give the same outputs and input gradients, within bf16 noise, on the GPU.

FLA's layers run on CUDA only: even their PyTorch fallbacks (Mamba-2's naive SSD) call FLA's Triton SiLU and gated
norm, which autotune over several configs, and Triton's CPU interpreter cannot autotune. So these tests are marked
``gpu``. FLA is not a dependency of the project; on the GPU machine it comes as wheels (docs/lm.md, "Parity with
FLA's layers", has the command). Without it the tests fail with that message.

Each case builds FLA's layer (its own init), copies its weights into ours, and compares on fresh inputs, both
against our layer in fp64 on the same (rounded) weights: a different definition (gate activation, read-out scale,
norm order, head layout) is far outside the bf16 bound, rounding is inside it.

- training mode, ``B = 2``, ``T = 300`` (chunked paths, several chunks, a ragged last one): outputs and the
  gradient of the input (FLA's GDN backward is left out: on Hopper with Triton < 3.7.1 FLA refuses to run it);
- inference, ``T = 40`` under ``no_grad`` (FLA's fused recurrent kernels for KDA, GDN and GDN-2): FLA's outputs
  against our ``forward`` and against our ``step`` token by token.

FLA's Mamba-3 layer needs ``mamba_ssm``'s kernels (not installable here) and its attention needs flash-attn:
neither is compared (docs/lm.md lists what is and is not).
"""

from __future__ import annotations

import pytest
import torch

from gdn2ts.layers import GatedDeltaNet2, GDN2Config

from tolerances import assert_close, errors

pytestmark = pytest.mark.gpu

WHEELS = ("FLA 0.6.0 is needed: python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl and "
          "PYTHONPATH=/tmp/site (docs/lm.md, 'Parity with FLA's layers')")

# (case id, our preset, layer sizes): the paper's width (d_model 2304, 16 heads of 128) and grouped value heads;
# Mamba-2 at d_model 1024 with expand 2 (FLA sizes it by expand * hidden_size), one and four B/C groups
CASES = {
    "kda": ("kda", dict(hidden=2304, heads=16, v_heads=16, k=128, v=128)),
    "kda-gva": ("kda", dict(hidden=512, heads=4, v_heads=8, k=64, v=64)),
    "gdn": ("gdn", dict(hidden=2304, heads=16, v_heads=16, k=128, v=128)),
    "gdn-gva": ("gdn", dict(hidden=512, heads=4, v_heads=8, k=64, v=64)),
    "gdn2-sigmoid": ("gdn2", dict(hidden=2304, heads=16, v_heads=16, k=128, v=128)),
    "gdn2-sigmoid-gva": ("gdn2", dict(hidden=512, heads=4, v_heads=8, k=64, v=64)),
    "mamba2": ("mamba2", dict(hidden=1024, heads=1, v_heads=32, k=128, v=64)),
    "mamba2-4groups": ("mamba2", dict(hidden=1024, heads=4, v_heads=32, k=128, v=64)),
}
# FLA refuses its gated chunk backward (GDN) on Hopper with Triton >= 3.4, < 3.7.1 (its issue #640)
NO_FLA_BACKWARD = {"gdn", "gdn-gva"}


def fla_layer(preset: str, s: dict) -> torch.nn.Module:
    try:
        import fla.layers as fl
    except ImportError as e:
        raise AssertionError(WHEELS) from e
    if preset == "kda":
        return fl.KimiDeltaAttention(hidden_size=s["hidden"], head_dim=s["k"], num_heads=s["heads"],
                                     num_v_heads=s["v_heads"], expand_v=s["v"] / s["k"])
    if preset == "gdn":
        return fl.GatedDeltaNet(hidden_size=s["hidden"], head_dim=s["k"], num_heads=s["heads"],
                                num_v_heads=s["v_heads"], expand_v=s["v"] / s["k"])
    if preset == "gdn2":
        return fl.GatedDeltaNet2(hidden_size=s["hidden"], head_dim=s["k"], num_heads=s["heads"],
                                 num_v_heads=s["v_heads"], expand_v=s["v"] / s["k"])
    return fl.Mamba2(num_heads=s["v_heads"], head_dim=s["v"], hidden_size=s["hidden"], state_size=s["k"],
                     expand=s["v_heads"] * s["v"] // s["hidden"], n_groups=s["heads"], backend="triton")


def our_config(preset: str, s: dict) -> GDN2Config:
    # FLA's low-rank projections (KDA's and GDN-2's decay and gate) have rank head_v_dim; FLA's GDN-2 port closes
    # with a sigmoid gate where the paper (and our preset) uses SiLU
    extra = {"output_gate": "sigmoid"} if preset == "gdn2" else {}
    return GDN2Config.variant(preset, s["hidden"], s["heads"], head_k_dim=s["k"], head_v_dim=s["v"],
                              num_v_heads=s["v_heads"], gate_low_rank=s["v"], **extra)


def fla_weights(preset: str, fla: torch.nn.Module, cfg: GDN2Config) -> dict[str, torch.Tensor]:
    """FLA's parameters under our names: one conv over q|k|v (Mamba-2: C|B|x) and Mamba-2's in_proj split."""
    p = dict(fla.named_parameters())
    if preset != "mamba2":
        out = {n: t for n, t in p.items() if "conv1d" not in n}
        out["conv.weight"] = torch.cat([p[f"{c}_conv1d.weight"] for c in "qkv"])
        return out
    inner, bc = cfg.value_dim, cfg.key_dim
    z, x, B, C, dt = p["in_proj.weight"].split([inner, inner, bc, bc, cfg.num_v_heads])
    wx, wB, wC = p["conv1d.weight"].split([inner, bc, bc])
    bx, bB, bC = p["conv1d.bias"].split([inner, bc, bc])
    return {"q_proj.weight": C, "k_proj.weight": B, "v_proj.weight": x, "a_proj.weight": dt, "g_proj.weight": z,
            "conv.weight": torch.cat([wC, wB, wx]), "conv.bias": torch.cat([bC, bB, bx]), "A_log": p["A_log"],
            "dt_bias": p["dt_bias"], "D": p["D"], "o_norm.weight": p["norm.weight"],
            "o_proj.weight": p["out_proj.weight"]}


def build(case: str, dtype: torch.dtype):
    """``(fla, ours, exact)``: FLA's layer in ``dtype``, ours on its weights in ``dtype``, ours in fp64 on the same
    rounded weights."""
    preset, sizes = CASES[case]
    torch.manual_seed(0)
    fla = fla_layer(preset, sizes).to("cuda", dtype)
    cfg = our_config(preset, sizes)
    ours = GatedDeltaNet2(cfg).to("cuda", dtype)
    weights = {n: t.detach() for n, t in fla_weights(preset, fla, cfg).items()}
    ours.load_state_dict(weights, strict=True)
    exact = GatedDeltaNet2(cfg).to("cuda", torch.float64)
    exact.load_state_dict({n: t.double() for n, t in weights.items()}, strict=True)
    return fla, ours, exact


def check(dtype: torch.dtype, *comparisons: tuple[str, torch.Tensor, torch.Tensor]) -> None:
    """``assert_close`` on each ``(name, actual, expected)``, after printing every measured error for the record
    (``pytest -rA`` shows them), so that one failure does not hide the others' numbers."""
    for name, actual, expected in comparisons:
        rms, worst = errors(actual, expected)
        print(f"{name} [{str(dtype).removeprefix('torch.')}]: relative RMS error {rms:.2e}, max error {worst:.2e}")
    for name, actual, expected in comparisons:
        assert_close(name, actual, expected, dtype)


def _x(case: str, B: int, T: int, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(B, T, CASES[case][1]["hidden"], generator=gen, device="cuda", dtype=torch.float64)


def _forward_backward(layer, x, dy):
    x = x.detach().requires_grad_()
    y = layer(x)[0]
    (y.double() * dy).sum().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", list(CASES))
def test_training_forward_and_input_gradient_match_fla(case, dtype):
    fla, ours, exact = build(case, dtype)
    fla.train(), ours.train(), exact.train()
    x = _x(case, 2, 300, seed=1).to(dtype)
    dy = torch.randn(2, 300, x.shape[-1], device="cuda", dtype=torch.float64)
    y_exact, dx_exact = _forward_backward(exact, x.double(), dy)
    y_ours, dx_ours = _forward_backward(ours, x, dy)
    comparisons = [(f"{case} ours y", y_ours, y_exact), (f"{case} ours dx", dx_ours, dx_exact)]
    if case in NO_FLA_BACKWARD:
        with torch.no_grad():
            y_fla = fla(x)[0]
    else:
        y_fla, dx_fla = _forward_backward(fla, x, dy)
        comparisons.append((f"{case} FLA dx", dx_fla, dx_exact))
    check(dtype, (f"{case} FLA y", y_fla, y_exact), *comparisons)


@pytest.mark.parametrize("case", list(CASES))
def test_inference_and_steps_match_fla(case):
    dtype = torch.bfloat16
    fla, ours, exact = build(case, dtype)
    fla.eval(), ours.eval(), exact.eval()
    x = _x(case, 3, 40, seed=2).to(dtype)
    with torch.no_grad():
        y_exact = exact(x.double())[0]
        y_fla = fla(x)[0]
        y_ours = ours(x)[0]
        state, steps = ours.init_state(3), []
        for t in range(x.shape[1]):
            y_t, state = ours.step(x[:, t], state)
            steps.append(y_t)
    check(dtype, (f"{case} FLA y (inference)", y_fla, y_exact), (f"{case} ours y (inference)", y_ours, y_exact),
          (f"{case} ours steps", torch.stack(steps, 1), y_exact))
