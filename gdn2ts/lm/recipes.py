"""The LM recipes: YAML files in ``tasks/lm/`` whose ``model:`` section is an :class:`LMConfig`.

A recipe is named by its file stem (``gdn2_1.3B``) or given as a path. ``tasks/`` sits at the top of a source
checkout; an installed package without it takes paths.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gdn2ts.models.lm import CausalLM
from gdn2ts.models.lm_config import LMConfig

__all__ = ["RECIPE_DIR", "build_model", "list_recipes", "load_recipe"]

RECIPE_DIR = Path(__file__).resolve().parents[2] / "tasks" / "lm"


def list_recipes() -> list[str]:
    """Names (file stems) of the recipes in :data:`RECIPE_DIR`, sorted.

    Example:
        >>> {"gdn2_1.3B", "swa_gdn2_1.3B", "tiny_gdn2"} <= set(list_recipes())
        True
    """
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(recipe: str | Path) -> LMConfig:
    """The :class:`LMConfig` of a recipe name in :data:`RECIPE_DIR` or of a YAML path.

    Example:
        >>> cfg = load_recipe("swa_gdn2_1.3B")
        >>> cfg.cell, cfg.num_cells, cfg.intermediate_size, cfg.window
        (('gdn2', 'swa'), 9, 6784, 2048)
    """
    path = Path(recipe)
    if path.suffix not in (".yaml", ".yml"):
        path = RECIPE_DIR / f"{recipe}.yaml"
        if not path.is_file():
            raise ValueError(f"load_recipe: argument 'recipe' expected a YAML path or one of {list_recipes()}, "
                             f"got {str(recipe)!r}")
    return LMConfig.from_yaml(path)


def build_model(recipe: str | Path | LMConfig, device: str | torch.device | None = None,
                dtype: torch.dtype | None = None) -> CausalLM:
    """A freshly initialized :class:`CausalLM` for a recipe (name, path or config) on ``device``; ``"meta"``
    allocates nothing (parameter counts of the 1.3B recipes).

    Example:
        >>> build_model("gdn2_1.3B", device="meta").num_parameters()["blocks"]
        1302638112
    """
    config = recipe if isinstance(recipe, LMConfig) else load_recipe(recipe)
    with torch.device(device if device is not None else "cpu"):
        model = CausalLM(config)
    return model if dtype is None else model.to(dtype)
