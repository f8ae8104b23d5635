"""The LM recipes: the paper's exact parameter counts, every recipe loads and builds, bad configs are named."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from gdn2ts.lm import RECIPE_DIR, build_model, list_recipes, load_recipe
from gdn2ts.models.lm_config import LMConfig

# Block-stack (non-embedding) parameter counts; the first two are the paper's (GDN2.md section 4), the rest are
# the counts docs/lm.md reports for the baselines and the small recipes.
BLOCKS = {
    "gdn2_1.3B": 1_302_638_112,
    "swa_gdn2_1.3B": 1_300_314_384,
    "kda_1.3B": 1_302_638_112,
    "gdn_1.3B": 1_302_693_696,
    "mamba2_1.3B": 1_302_652_512,
    "transformer_1.3B": 1_302_718_464,
    "swa_kda_1.3B": 1_300_314_384,
    "swa_gdn_1.3B": 1_300_342_176,
    "swa_mamba2_1.3B": 1_300_259_376,
    "small_gdn2": 30_999_584,
    "small_kda": 30_999_584,
    "small_gdn": 31_003_712,
    "small_mamba2": 30_999_648,
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
    "cpu_gdn": 407_496,
    "cpu_mamba2": 407_756,
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
