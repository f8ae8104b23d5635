"""Evaluation of the language models: held-out perplexity (and bits per byte), the MQAR recall task and its
reproduction harness, RULER-style needle retrieval, and an lm-evaluation-harness adapter (optional extra)."""

from gdn2ts.lm.eval.harness import CausalLMEvalAdapter, load_weights, register_lm_eval
from gdn2ts.lm.eval.mqar import IGNORE_INDEX, MQARConfig, evaluate_mqar, make_mqar, mqar_accuracy
from gdn2ts.lm.eval.mqar_report import MQAR_MIXERS, run_mqar
from gdn2ts.lm.eval.mqar_run import MQAREvalConfig, MQARModelConfig, MQARTrainConfig
from gdn2ts.lm.eval.needle import NeedleConfig, make_needles, needle_accuracy, needle_depth_sweep
from gdn2ts.lm.eval.perplexity import PerplexityResult, perplexity, text_perplexity

__all__ = ["IGNORE_INDEX", "MQAR_MIXERS", "CausalLMEvalAdapter", "MQARConfig", "MQAREvalConfig", "MQARModelConfig",
           "MQARTrainConfig", "NeedleConfig", "PerplexityResult", "evaluate_mqar", "load_weights", "make_mqar",
           "make_needles", "mqar_accuracy", "needle_accuracy", "needle_depth_sweep", "perplexity", "register_lm_eval",
           "run_mqar", "text_perplexity"]
