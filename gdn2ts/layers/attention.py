"""Causal softmax attention with rotary positions, full or sliding-window, and a KV cache for one-token steps.

Shapes: ``x`` ``[B, T, hidden]``; ``H`` query heads and ``HKV`` key/value heads of ``head_dim``; the cache is
``AttentionState(k [N, HKV, L, head_dim], v [N, HKV, L, head_dim], pos [], mask [N, L] or None)``: the rotated
keys and the values of the last ``L`` tokens (``L <= window`` with a window), the number of tokens seen, and which
of the cached tokens are skipped (left padding of a batch of prompts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from gdn2ts.layers.flex import flex_attend, packed_block_mask, window_block_mask
from gdn2ts.layers.mask import check_token_mask
from gdn2ts.ops.validate import check_cu_seqlens, fail

__all__ = ["Attention", "AttentionConfig", "AttentionState", "apply_rope"]


_BACKENDS = ("auto", "flex", "sdpa")
# the shortest call that "auto" sends to FlexAttention (its block size: below it there is no block to skip)
_FLEX_MIN_TOKENS = 128


def _cfail(field: str, expected: str, got: object) -> None:
    raise ValueError(f"AttentionConfig: field '{field}' expected {expected}, got {got!r}")


@dataclass(frozen=True)
class AttentionConfig:
    """Shape of one :class:`Attention` layer.

    Example:
        >>> cfg = AttentionConfig(hidden_size=64, num_heads=4, head_dim=16, window=8)
        >>> cfg.num_kv_heads, cfg.window
        (4, 8)
    """

    hidden_size: int
    """Width of the residual stream: the layer maps ``[B, T, hidden_size]`` to ``[B, T, hidden_size]``."""
    num_heads: int
    """Query heads ``H``."""
    head_dim: int = 128
    """Dimension per head (even: rotary positions rotate pairs of channels)."""
    num_kv_heads: int | None = None
    """Key/value heads ``HKV`` (None: ``num_heads``); ``H`` must be a multiple (grouped-query attention)."""
    window: int | None = None
    """Sliding window: each token attends to itself and the ``window - 1`` tokens before it, and the cache keeps
    ``window`` tokens. None: full causal attention, the cache grows with the sequence."""
    rope_theta: float = 10000.0
    """Base of the rotary position frequencies ``theta ** (-2i / head_dim)``."""
    backend: str = "auto"
    """Kernel of the masked calls that start from an empty cache (a window shorter than the call, packed
    documents): ``"flex"``, FlexAttention with block masks (``gdn2ts.layers.flex``: blocks outside the window are
    skipped, ``O(T * window)``); ``"sdpa"``, scaled-dot-product attention with a dense ``[T, L]`` mask
    (``O(T * L)``); ``"auto"``, FlexAttention on CUDA for such calls of at least 128 tokens, SDPA otherwise. Calls
    from a cache (one-token steps, chunked prefill: shapes that change call by call) always run SDPA with a mask,
    and plain causal calls SDPA's causal kernel."""

    def __post_init__(self):
        for name in ("hidden_size", "num_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                _cfail(name, "an int >= 1", value)
        if self.head_dim % 2:
            _cfail("head_dim", "an even int (rotary positions rotate channel pairs)", self.head_dim)
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        kv = self.num_kv_heads
        if isinstance(kv, bool) or not isinstance(kv, int) or kv < 1 or self.num_heads % kv:
            _cfail("num_kv_heads", f"None or a divisor of num_heads={self.num_heads}", kv)
        w = self.window
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            _cfail("window", "None (full attention) or an int >= 1", w)
        th = self.rope_theta
        if isinstance(th, bool) or not isinstance(th, (int, float)) or not math.isfinite(th) or th <= 1:
            _cfail("rope_theta", "a finite float > 1", th)
        if self.backend not in _BACKENDS:
            _cfail("backend", f"one of {_BACKENDS}", self.backend)


class AttentionState(NamedTuple):
    """The KV cache of one attention layer for ``N`` sequences that advance together.

    Example:
        >>> import torch
        >>> s = AttentionState(torch.zeros(2, 4, 0, 16), torch.zeros(2, 4, 0, 16), torch.tensor(0))
        >>> s.k.shape, int(s.pos)
        (torch.Size([2, 4, 0, 16]), 0)
    """

    k: torch.Tensor
    """``[N, HKV, L, head_dim]`` rotated keys of the last ``L`` tokens, in the activation dtype."""
    v: torch.Tensor
    """``[N, HKV, L, head_dim]`` values of the same tokens."""
    pos: torch.Tensor
    """``[]`` int64 on the CPU: tokens seen so far (the position of the next token); kept off the accelerator so
    that reading it does not wait for the device."""
    mask: torch.Tensor | None = None
    """``[N, L]`` bool: False for a cached token that no query attends to (a token skipped by the call's
    ``attention_mask``); None: every cached token is attended to."""


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary positions on ``x`` ``[B, T, H, D]`` at ``positions`` ``[T]`` (pairs ``(i, i + D/2)`` rotate by
    ``position * theta ** (-2i / D)``); computed in fp32 (fp64 for fp64 inputs), returned in ``x``'s dtype.

    Example:
        >>> import torch
        >>> x = torch.randn(1, 3, 2, 8)
        >>> y = apply_rope(x, torch.arange(3), 10000.0)
        >>> bool(torch.allclose(y[:, 0], x[:, 0])), bool(torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5))
        (True, True)
    """
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    half = x.shape[-1] // 2
    freq = theta ** (-torch.arange(half, device=x.device, dtype=dt) / half)
    angle = positions.to(dt)[:, None] * freq  # [T, D/2]
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]  # [T, 1, D/2], broadcast over heads
    x1, x2 = x.to(dt).split(half, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(nn.Module):
    """Causal multi-head attention ``[B, T, hidden] -> [B, T, hidden]`` with RoPE, no biases; sliding-window when
    ``config.window`` is set. ``forward`` continues from a cache when given one (chunked prefill); ``step`` is one
    token per row. ``4 * hidden * H * head_dim`` parameters when ``HKV == H``.

    Example:
        >>> import torch
        >>> layer = Attention(AttentionConfig(hidden_size=32, num_heads=2, head_dim=8, window=4))
        >>> x = torch.randn(2, 7, 32)
        >>> y, state = layer(x)
        >>> y_t, state = layer.step(torch.randn(2, 32), state)
        >>> y.shape, y_t.shape, state.k.shape, int(state.pos)
        (torch.Size([2, 7, 32]), torch.Size([2, 32]), torch.Size([2, 2, 4, 8]), 8)
    """

    def __init__(self, config: AttentionConfig):
        super().__init__()
        if not isinstance(config, AttentionConfig):
            raise ValueError(f"Attention: argument 'config' expected an AttentionConfig, got {type(config).__name__}")
        self.config = cfg = config
        D, H, HKV, Dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(D, H * Dh, bias=False)
        self.k_proj = nn.Linear(D, HKV * Dh, bias=False)
        self.v_proj = nn.Linear(D, HKV * Dh, bias=False)
        self.o_proj = nn.Linear(H * Dh, D, bias=False)

    def init_state(self, batch: int, device=None, dtype: torch.dtype | None = None) -> AttentionState:
        """An empty cache (``L = 0``, ``pos = 0``) for ``batch`` sequences; ``dtype``: the activation dtype."""
        cfg, p = self.config, self.q_proj.weight
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        empty = torch.zeros(batch, cfg.num_kv_heads, 0, cfg.head_dim, device=device, dtype=dtype)
        return AttentionState(empty, empty.clone(), torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor, state: AttentionState | None = None, cu_seqlens: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, AttentionState | None]:
        """``x`` ``[B, T, hidden]`` at positions ``state.pos ..`` -> ``(y [B, T, hidden], new_state)``.

        ``state`` (an empty cache when omitted) is not modified; the new cache holds the last ``window`` tokens
        (all tokens without a window). With ``cu_seqlens`` ``[N + 1]``, ``x`` is ``[1, total, hidden]`` holding
        ``N`` packed documents: each attends within itself from position 0, and no cache is returned (None).

        ``attention_mask`` ``[B, T]`` (bool or 0/1) skips the tokens where it is False: no query attends to them,
        now or from the cache (``state.mask`` remembers them), and their output is 0. Positions still count them,
        and attention scores depend only on position differences, so a row whose skipped tokens all come before
        its first kept one (left padding) gets what it gets alone.

        Example:
            >>> import torch
            >>> layer = Attention(AttentionConfig(hidden_size=32, num_heads=2, head_dim=8, window=4)).double()
            >>> x = torch.randn(1, 6, 32).double()
            >>> padded = torch.cat([torch.randn(1, 2, 32).double(), x], 1)
            >>> y, state = layer(padded, attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]]))
            >>> bool(torch.allclose(y[:, 2:], layer(x)[0], atol=1e-12)), state.mask.tolist()
            (True, [[True, True, True, True]])
        """
        op = "Attention.forward"
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.config.hidden_size:
            fail(op, "x", f"a 3-D tensor [B, T, hidden={self.config.hidden_size}]",
                 f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__)
        cfg = self.config
        B, T, _ = x.shape
        H, HKV, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = self.q_proj(x).unflatten(-1, (H, Dh))
        k = self.k_proj(x).unflatten(-1, (HKV, Dh))
        v = self.v_proj(x).unflatten(-1, (HKV, Dh))
        if cu_seqlens is not None:
            if state is not None:
                fail(op, "state", "None when cu_seqlens packs documents (each starts from an empty cache)",
                     type(state).__name__)
            if attention_mask is not None:
                fail(op, "attention_mask", "None when cu_seqlens packs documents (use one of the two)",
                     f"a tensor of shape {tuple(attention_mask.shape)}")
            check_cu_seqlens(op, cu_seqlens, B, T, x.device)
            return self._forward_packed(q, k, v, cu_seqlens), None
        keep = None if attention_mask is None else check_token_mask(op, "attention_mask", attention_mask, (B, T),
                                                                     x.device)
        if state is None:
            # an empty cache: nothing to check or concatenate (and no read of a position tensor, which would
            # break a compiled graph at every attention layer)
            start = 0
        else:
            self._check_state(op, state, B, v.dtype, x.device)
            state = AttentionState(*state)
            start = int(state.pos)
        qpos = torch.arange(start, start + T, device=x.device)
        q, k = apply_rope(q, qpos, cfg.rope_theta), apply_rope(k, qpos, cfg.rope_theta)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, Dh]
        if state is None:
            k_all, v_all = k, v
        else:
            k_all, v_all = torch.cat([state.k, k], dim=2), torch.cat([state.v, v], dim=2)
        L = k_all.shape[2]
        # which keys may be attended to, [B, L]; None: all (no skipped token now or in the cache)
        valid = None
        if keep is not None or (state is not None and state.mask is not None):
            old = state.mask if state is not None and state.mask is not None else \
                torch.ones(B, L - T, dtype=torch.bool, device=x.device)
            valid = torch.cat([old, torch.ones(B, T, dtype=torch.bool, device=x.device) if keep is None else keep], 1)
        if valid is None and L == T and (cfg.window is None or cfg.window >= T):
            # nothing cached and no window cut inside this call: the plain causal kernel path
            y = self._attend(q, k_all, v_all, None, True)
        elif valid is None and L == T and self._use_flex(T, x.device):
            # a window cut, no cache: blocks outside the window are skipped
            o = flex_attend(q, k_all, v_all, window_block_mask(T, L, cfg.window, x.device))
            y = self.o_proj(o.transpose(1, 2).flatten(-2))
        else:
            kpos = torch.arange(start + T - L, start + T, device=x.device)
            see = kpos[None, :] <= qpos[:, None]
            if cfg.window is not None:
                see &= kpos[None, :] > qpos[:, None] - cfg.window
            if valid is not None:
                # the kept keys only; every query also sees itself, so that a skipped query keeps one key (no NaN
                # from an empty softmax) before its output is zeroed below
                see = ((see & valid[:, None, :]) | (kpos[None, :] == qpos[:, None]))[:, None]  # [B, 1, T, L]
            y = self._attend(q, k_all, v_all, see, False)
        if keep is not None:
            y = torch.where(keep[..., None], y, 0.0)
        if cfg.window is not None and L > cfg.window:
            k_all, v_all = k_all[:, :, L - cfg.window:], v_all[:, :, L - cfg.window:]
            valid = None if valid is None else valid[:, L - cfg.window:]
        new = AttentionState(k_all, v_all, torch.tensor(start + T, dtype=torch.long), valid)
        return y, new

    def _forward_packed(self, q, k, v, cu_seqlens) -> torch.Tensor:
        """``q`` ``[1, T, H, Dh]``, ``k``, ``v`` ``[1, T, HKV, Dh]`` of packed documents -> ``y`` ``[1, T, hidden]``."""
        cfg, T = self.config, q.shape[1]
        index = torch.arange(T, device=q.device)
        doc = torch.searchsorted(cu_seqlens[1:].to(index.dtype), index, right=True)
        pos = index - cu_seqlens.to(index.dtype)[doc]
        q, k = apply_rope(q, pos, cfg.rope_theta), apply_rope(k, pos, cfg.rope_theta)
        if self._use_flex(T, q.device):
            o = flex_attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                            packed_block_mask(cu_seqlens, T, cfg.window))
            return self.o_proj(o.transpose(1, 2).flatten(-2))
        # within a document, index distance is position distance: one causal (and window) test on indices
        see = (doc[:, None] == doc[None, :]) & (index[None, :] <= index[:, None])
        if cfg.window is not None:
            see &= index[None, :] > index[:, None] - cfg.window
        return self._attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), see, False)

    def _use_flex(self, T: int, device: torch.device) -> bool:
        """Whether a masked call of ``T`` tokens with no cache runs FlexAttention (``AttentionConfig.backend``)."""
        backend = self.config.backend
        return backend == "flex" or (backend == "auto" and device.type == "cuda" and T >= _FLEX_MIN_TOKENS)

    def _attend(self, q, k, v, mask, causal: bool) -> torch.Tensor:
        """``q`` ``[B, H, T, Dh]``, ``k``, ``v`` ``[B, HKV, L, Dh]``, bool ``mask`` ``[T, L]`` or ``[B, 1, T, L]``
        (True: attend) or ``causal`` -> the output projection ``[B, T, hidden]``."""
        groups = self.config.num_heads // self.config.num_kv_heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.o_proj(o.transpose(1, 2).flatten(-2))

    @torch.no_grad()
    def step(self, x_t: torch.Tensor, state: AttentionState | None = None) -> tuple[torch.Tensor, AttentionState]:
        """One token per row: ``x_t`` ``[B, hidden]`` -> ``(y_t [B, hidden], new_state)``. Inference only."""
        if not isinstance(x_t, torch.Tensor) or x_t.dim() != 2:
            fail("Attention.step", "x_t", f"a 2-D tensor [B, hidden={self.config.hidden_size}]",
                 f"shape {tuple(x_t.shape)}" if isinstance(x_t, torch.Tensor) else type(x_t).__name__)
        y, state = self.forward(x_t[:, None], state)
        return y[:, 0], state

    def _check_state(self, op: str, state, N: int, dtype: torch.dtype, device) -> None:
        cfg = self.config
        if not isinstance(state, tuple) or len(state) not in (3, 4):
            fail(op, "state", "an AttentionState(k, v, pos, mask) or None", type(state).__name__)
        k, v, pos = state[:3]
        cap = "" if cfg.window is None else f" with L <= window={cfg.window}"
        text = f"[N={N}, HKV={cfg.num_kv_heads}, L, head_dim={cfg.head_dim}]{cap}"
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                fail(op, f"state.{name}", f"a 4-D tensor {text}", getattr(t, "shape", type(t).__name__))
            L = t.shape[2]
            if (t.shape[0], t.shape[1], t.shape[3]) != (N, cfg.num_kv_heads, cfg.head_dim) or (
                    cfg.window is not None and L > cfg.window) or t.shape != k.shape:
                fail(op, f"state.{name}", f"shape {text} (k and v alike)", f"shape {tuple(t.shape)}")
            if t.dtype != dtype:
                fail(op, f"state.{name}", f"dtype {dtype} (the activation dtype)", t.dtype)
            if t.device != device:
                fail(op, f"state.{name}", f"a tensor on {device} (the device of the input)", t.device)
        if not isinstance(pos, torch.Tensor) or pos.dim() != 0 or pos.dtype != torch.long or pos.is_cuda:
            fail(op, "state.pos", "a 0-D int64 CPU tensor", getattr(pos, "dtype", type(pos).__name__))
        if int(pos) < k.shape[2]:
            fail(op, "state.pos", f"at least the cached length L={k.shape[2]}", int(pos))
        mask = state[3] if len(state) == 4 else None
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
                                 or tuple(mask.shape) != (N, k.shape[2]) or mask.device != device):
            got = f"{mask.dtype} shape {tuple(mask.shape)} on {mask.device}" if isinstance(mask, torch.Tensor) \
                else type(mask).__name__
            fail(op, "state.mask", f"None or a bool tensor [N={N}, L={k.shape[2]}] on {device}", got)
