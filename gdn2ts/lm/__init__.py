"""Language modelling on gdn2ts: the recipes in ``tasks/lm/`` and the model they build
(:class:`~gdn2ts.models.lm.CausalLM` from an :class:`~gdn2ts.models.lm_config.LMConfig`)."""

from gdn2ts.lm.data import PackedBlocks, collate_packed
from gdn2ts.lm.flops import flops_per_token
from gdn2ts.lm.generate import load_lm
from gdn2ts.lm.optim import OptimConfig
from gdn2ts.lm.recipes import RECIPE_DIR, build_model, list_recipes, load_recipe
from gdn2ts.lm.tokenizer import load_tokenizer
from gdn2ts.lm.train_config import TrainConfig
from gdn2ts.lm.train_recipe import DataConfig, TrainRecipe, load_train_recipe
from gdn2ts.models.lm import CausalLM
from gdn2ts.models.lm_config import MIXERS, LMConfig

__all__ = ["MIXERS", "RECIPE_DIR", "CausalLM", "DataConfig", "LMConfig", "OptimConfig", "PackedBlocks", "TrainConfig",
           "TrainRecipe", "build_model", "collate_packed", "flops_per_token", "list_recipes", "load_lm", "load_recipe",
           "load_tokenizer", "load_train_recipe"]
