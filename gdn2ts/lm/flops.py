"""Model FLOPs per token of :class:`~gdn2ts.models.lm.CausalLM` training, device peaks, and model FLOPs utilization.

Per trained token (forward + backward = 3 x forward; only matrix products are counted, as MFU conventionally
does: norms, gates, activations, the short conv and the embedding lookup are left out)::

    flops/token = 6 * P_matmul
                + sum over attention layers   of 12 * H_q * D_h * ctx        (QK^T and AV, ctx keys per query)
                + sum over GDN-2-op layers    of  3 * HV * f(K, V, C)         (the chunked GDN-2 op)

- ``P_matmul``: weights of every ``nn.Linear`` in the blocks plus the output head (not the embedding).
- ``ctx``: the mean number of keys a query attends to in a sequence of ``T`` tokens: ``(T + 1) / 2`` for full
  causal attention, the mean of ``min(t, window)`` over ``t = 1..T`` for the sliding window.
- ``f(K, V, C) = 6 K V + 2 C (3 K + 2 V) + C^2 / 3``: the forward FLOPs per token and value head of the chunked
  form with chunk ``C`` (GDN2.md section 3): ``T = E Kbar^T``, ``Y = A E``, ``A_qk`` (``2 C K`` each), ``U = A Z``
  and ``A_qk R`` (``2 C V`` each), ``Y S0``, ``(gamma Q) S0`` and ``Ktail^T R`` (``2 K V`` each), and the
  triangular inverse ``A = (I + T)^-1`` (``C^3 / 3`` per chunk). The GDN-2-op mixers are GDN-2, KDA, GDN,
  Mamba-2 and the two ablations; the Mamba-3 mixers count their projections only (their scan is not counted).

MFU = ``flops/token * tokens/s / (peak FLOP/s * devices)``; the peak is the dense bf16 figure of the device.
"""

from __future__ import annotations

import torch
from torch import nn

from gdn2ts.models.lm_config import ATTENTION_MIXERS, RECURRENT_MIXERS, LMConfig

__all__ = ["PEAK_TFLOPS", "CHUNK", "flops_per_token", "matmul_params", "mfu", "peak_flops"]

# The chunk length of the GDN-2 op's chunked form (GDN2.md section 3).
CHUNK = 64

# Dense bf16 tensor-core peaks in TFLOP/s (vendor datasheets, without sparsity), matched against the CUDA device
# name in this order: the first entry whose words all occur in the name wins.
PEAK_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H100", "PCIe"), 756.0),
    (("H100",), 989.0),
    (("H200",), 989.0),
    (("GH200",), 989.0),
    (("B200",), 2250.0),
    (("A100",), 312.0),
    (("L40S",), 362.0),
    (("A10G",), 70.0),
)


def matmul_params(config: LMConfig) -> int:
    """Weights of every ``nn.Linear`` in the blocks and the output head (built on the meta device).

    Example:
        >>> from gdn2ts.lm import load_recipe
        >>> matmul_params(load_recipe("tiny_gdn2"))
        22016
    """
    with torch.device("meta"):
        from gdn2ts.models.lm import CausalLM

        model = CausalLM(config)
    mods = [m for m in model.blocks.modules() if isinstance(m, nn.Linear)] + [model.lm_head]
    return sum(m.weight.numel() for m in mods)


def _mean_context(seq_len: int, window: int | None) -> float:
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    # t = 1..window-1 see t keys, the remaining seq_len - window + 1 positions see window keys
    return (window * (window - 1) / 2 + (seq_len - window + 1) * window) / seq_len


def flops_per_token(config: LMConfig, seq_len: int, chunk: int = CHUNK) -> float:
    """Training FLOPs (forward + backward) per token of a sequence of ``seq_len`` tokens (formula in the module
    docstring).

    Example:
        >>> from gdn2ts.lm import load_recipe
        >>> cfg = load_recipe("swa_gdn2_1.3B")
        >>> round(flops_per_token(cfg, 2048) / 1e9, 2), round(flops_per_token(cfg, 16384) / 1e9, 2)
        (8.58, 8.8)
    """
    if not isinstance(config, LMConfig):
        raise ValueError(f"flops_per_token: argument 'config' expected an LMConfig, got {type(config).__name__}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"flops_per_token: argument 'seq_len' expected an int >= 1, got {seq_len!r}")
    total = 6.0 * matmul_params(config)
    K, V, C = config.head_k_dim, config.head_v_dim, chunk
    HV = config.num_v_heads or config.num_heads
    recurrent = 3.0 * HV * (6 * K * V + 2 * C * (3 * K + 2 * V) + C * C / 3)
    for name in config.layout:
        if name in ATTENTION_MIXERS:
            ctx = _mean_context(seq_len, config.window if name == "swa" else None)
            total += 12.0 * config.attn_num_heads * config.attn_head_dim * ctx
        elif name in RECURRENT_MIXERS:
            total += recurrent
    return total


def peak_flops(device: torch.device | str | None = None, peak_tflops: float | None = None) -> float | None:
    """The dense bf16 peak FLOP/s of ``device``: ``peak_tflops * 1e12`` when given; a CUDA device's from
    :data:`PEAK_TFLOPS` by its name; None when unknown (a CPU, an unlisted GPU): MFU is then not reported.

    Example:
        >>> peak_flops("cpu"), peak_flops("cpu", peak_tflops=1.5)
        (None, 1500000000000.0)
    """
    if peak_tflops is not None:
        if isinstance(peak_tflops, bool) or not isinstance(peak_tflops, (int, float)) or not peak_tflops > 0:
            raise ValueError(f"peak_flops: argument 'peak_tflops' expected None or a float > 0, got {peak_tflops!r}")
        return float(peak_tflops) * 1e12
    device = torch.device(device if device is not None else "cpu")
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for words, tflops in PEAK_TFLOPS:
        if all(w in name for w in words):
            return tflops * 1e12
    return None


def mfu(flops_per_tok: float, tokens_per_s: float, peak: float | None, devices: int = 1) -> float | None:
    """Model FLOPs utilization: ``flops_per_tok * tokens_per_s / (peak * devices)``; None without a peak.

    Example:
        >>> round(mfu(8.58e9, 38_000, 989e12), 3)  # the paper's hybrid at 2K on one H100
        0.33
    """
    if peak is None:
        return None
    return flops_per_tok * tokens_per_s / (peak * devices)
