"""The LM recipes: the paper's exact parameter counts, every recipe loads and builds, bad configs are named."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from gdn2ts.lm import RECIPE_DIR, build_model, list_recipes, load_recipe
from gdn2ts.models.lm_config import LMConfig

# Block-stack (non-embedding) parameter counts; the first two are the paper's (GDN2.md section 4), the rest are
# the counts docs/lm.md reports for the baselines and the small recipes. The baselines' counts follow from their
# mixers' definitions (``mixer_count`` below, checked in test_baseline_counts_follow_from_their_definitions).
BLOCKS = {
    "gdn2_1.3B": 1_302_638_112,
    "swa_gdn2_1.3B": 1_300_314_384,
    "kda_1.3B": 1_302_638_112,
    "gdn_1.3B": 1_302_666_048,
    "mamba2_1.3B": 1_302_591_168,
    "transformer_1.3B": 1_302_594_048,
    "transformer_swa_1.3B": 1_300_354_560,
    "swa_kda_1.3B": 1_300_314_384,
    "swa_gdn_1.3B": 1_300_328_352,
    "swa_mamba2_1.3B": 1_300_353_120,
    "swa_mamba3_siso_1.3B": 1_300_306_752,
    "swa_mamba3_mimo_1.3B": 1_300_375_872,
    "small_gdn2": 30_999_584,
    "small_kda": 30_999_584,
    "small_gdn": 30_999_616,
    "small_mamba2": 30_996_672,
    "small_erase_only": 30_995_488,
    "small_write_only": 30_995_488,
    "small_swa_gdn2": 31_003_152,
    "mamba3_siso_1.3B": 1_302_622_848,
    "mamba3_mimo_1.3B": 1_302_636_672,
    "small_mamba3_siso": 31_004_800,
    "small_mamba3_mimo": 31_004_800,
}

# The CPU comparison recipes (docs/lm-training.md): 2,048 state floats per layer, block stacks within 0.2 %.
CPU_BLOCKS = {
    "cpu_gdn2": 407_876,
    "cpu_kda": 407_876,
    "cpu_gdn": 407_624,
    "cpu_mamba2": 407_960,
    "cpu_erase_only": 408_132,
    "cpu_write_only": 408_132,
    "cpu_mamba3_siso": 408_208,
}


def test_the_papers_exact_counts():
    assert build_model("gdn2_1.3B", device="meta").num_parameters()["blocks"] == 1_302_638_112
    assert build_model("swa_gdn2_1.3B", device="meta").num_parameters()["blocks"] == 1_300_314_384


def test_every_recipe_is_counted_here():
    assert set(list_recipes()) - {"tiny_gdn2", "tiny_swa_gdn2"} == set(BLOCKS) | set(CPU_BLOCKS)


@pytest.mark.parametrize("name", list_recipes())
def test_recipe_loads_and_builds(name):
    cfg = load_recipe(name)
    assert cfg == load_recipe(RECIPE_DIR / f"{name}.yaml")
    model = build_model(cfg, device="meta")
    count = model.num_parameters()
    if name in BLOCKS:
        assert count["blocks"] == BLOCKS[name]
    assert count["total"] == count["blocks"] + count["embedding"] + count["head"] + count["final_norm"]
    assert count["embedding"] == count["head"] == cfg.vocab_size * cfg.hidden_size  # untied
    if name.endswith("1.3B"):
        assert cfg.state_floats_per_layer == 262_144 and cfg.vocab_size == 32_000 and cfg.hidden_size == 2304
        assert abs(count["blocks"] - 1.3e9) < 4e6
    elif name.startswith("small"):
        assert cfg.state_floats_per_layer == 65_536 and 20e6 < count["blocks"] < 50e6
    elif name.startswith("cpu_"):
        assert cfg.state_floats_per_layer == 2048 and count["blocks"] == CPU_BLOCKS[name]


def mixer_count(name: str, d: int = 2304) -> int:
    """One mixer's parameters at the 1.3B width, written out from each reference's definition (docs/lm.md,
    "Baselines against their references"), independently of the layers' code."""
    if name == "gdn":
        # 16 heads of 128 x 128: q, k, v; per-head decay and beta projections; A_log and dt_bias per head; the
        # bias-free depthwise conv (width 4) over q|k|v; the full-rank bias-free output gate; the per-head norm
        # scale (128, shared); o_proj
        h, k, v = 16, 128, 128
        return 3 * d * h * k + 2 * d * h + 2 * h + 4 * (2 * h * k + h * v) + d * h * v + v + h * v * d
    if name == "kda":
        # as GDN with channel decay (low-rank 2304 -> 128 -> 16 x 128 and a dt_bias per channel) and KDA's
        # low-rank output gate with a bias (2304 -> 128 -> 2048)
        h, k, v, r = 16, 128, 128, 128
        return (3 * d * h * k + d * h + (d * r + r * h * k + h * k) + h + 4 * (2 * h * k + h * v)
                + (d * r + r * h * v + h * v) + v + h * v * d)
    if name == "mamba2":
        # Mamba-2 with 32 heads of 64, d_state 128, one B/C group: in_proj to z, x, B, C and dt; the depthwise
        # conv (width 4) with bias over x|B|C; dt_bias, A_log and D per head; the gated norm's scale per channel;
        # out_proj
        heads, p, n = 32, 64, 128
        inner = heads * p
        return d * (2 * inner + 2 * n + heads) + (inner + 2 * n) * 5 + 3 * heads + inner + inner * d
    if name in ("attention", "swa"):
        return 4 * d * 18 * 128  # q, k, v, o of 18 heads x 128, no bias
    raise ValueError(name)


def test_baseline_counts_follow_from_their_definitions():
    """Blocks = layers x (mixer + its two pre-norms + a SwiGLU MLP of 3 x d x width). What changed with the faithful
    baselines: GDN's output gate went from low-rank with a bias (2304 -> 128 -> 2048 + 2048: 559,104) to full rank
    (4,718,592), +4,159,488 per layer, so its MLP narrowed 7644 -> 7042 (gdn_1.3B) and 7502 -> 7201
    (swa_gdn_1.3B); Mamba-2 went from 16 B/C groups of 16 heads x 128 with a low-rank gate (19,495,088 per layer)
    to one group of 32 heads x 64 with a full-rank z, a conv bias and a per-channel norm scale (14,832,992), so its
    MLP widened 7649 -> 8323 and 7504 -> 7842. KDA's output gate changed its activation only (same count). The
    full-attention Transformer's width was 7398 (+80,352), not the nearest; 7397 (-44,064) is."""
    d, per_width = 2304, 3 * 2304
    assert mixer_count("kda") == 20_054_160 and mixer_count("gdn") == 23_691_424
    assert mixer_count("mamba2") == 14_832_992
    for name, mixers in (("gdn_1.3B", ["gdn"]), ("kda_1.3B", ["kda"]), ("mamba2_1.3B", ["mamba2"]),
                         ("transformer_1.3B", ["attention"]), ("transformer_swa_1.3B", ["swa"]),
                         ("swa_gdn_1.3B", ["gdn", "swa"]), ("swa_kda_1.3B", ["kda", "swa"]),
                         ("swa_mamba2_1.3B", ["mamba2", "swa"])):
        cfg = load_recipe(name)
        cells = cfg.num_cells
        want = cells * sum(mixer_count(m) + 2 * d + per_width * cfg.intermediate_size for m in mixers)
        assert BLOCKS[name] == want, name
        target = BLOCKS["swa_gdn2_1.3B" if len(mixers) == 2 or name == "transformer_swa_1.3B" else "gdn2_1.3B"]
        # the width is the nearest integer: one more or one less would be farther from the GDN-2 model's count
        step = cells * len(mixers) * per_width
        assert abs(want - target) <= step / 2, name


def test_hybrid_layout_is_the_papers():
    cfg = load_recipe("swa_gdn2_1.3B")
    assert cfg.layout == ("gdn2", "swa") * 9
    model = build_model(cfg, device="meta")
    swa = model.blocks[1].mixer.config
    assert (swa.num_heads, swa.head_dim, swa.window) == (18, 128, 2048)
    assert model.blocks[0].mlp.gate_proj.out_features == 6784


def test_tiny_recipe_runs_on_cpu():
    model = build_model("tiny_swa_gdn2")
    logits, state = model(torch.randint(0, 64, (2, 5)))
    assert logits.shape == (2, 5, 64) and len(state) == 2


@pytest.mark.parametrize("field, value", [
    ("vocab_size", 0), ("hidden_size", -1), ("num_cells", 1.5), ("cell", []), ("cell", ["gdn2", "lstm"]),
    ("intermediate_size", True), ("num_v_heads", 3), ("attn_num_kv_heads", 4), ("attn_head_dim", 15),
    ("window", 0), ("rope_theta", 1.0), ("norm_eps", 0.0), ("init_std", float("nan")), ("head_k_dim", None),
])
def test_bad_config_names_the_field(field, value):
    base = dict(vocab_size=16, hidden_size=32, num_heads=2, head_k_dim=8, head_v_dim=8, attn_num_heads=6)
    with pytest.raises(ValueError, match=f"field '{field}'"):
        LMConfig(**{**base, field: value})


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: 64\n  n_layers: 3\n")
    with pytest.raises(ValueError, match="unknown field.*n_layers"):
        load_recipe(bad)
    bad.write_text("hidden_size: 64\n")
    with pytest.raises(ValueError, match="'model:' section"):
        load_recipe(bad)
    with pytest.raises(ValueError, match="argument 'recipe'.*gdn2_1.3B"):
        load_recipe("gdn3_1.3B")


def test_config_is_frozen_and_lists_become_tuples():
    cfg = LMConfig(cell=["kda", "swa"])
    assert cfg.cell == ("kda", "swa") and hash(cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 3


DOC = (RECIPE_DIR.parents[1] / "docs" / "lm.md").read_text()


def test_docs_tables_state_the_tested_counts():
    rows = dict(re.findall(r"^\| `(\w+(?:\.\w+)?)` \|.*\| ([\d,]+) \|", DOC, flags=re.M))
    assert {name: int(count.replace(",", "")) for name, count in rows.items()} == BLOCKS


def test_docs_example_runs():
    block = re.findall(r"```python\n(.*?)```", DOC, flags=re.S)[0]
    scope: dict = {}
    exec(compile(block, "docs/lm.md example", "exec"), scope)
    torch.testing.assert_close(scope["step_logits"], scope["logits"][:, -1], rtol=0, atol=1e-4)
