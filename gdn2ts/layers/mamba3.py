"""The Mamba-3 token mixer (SISO and MIMO) in plain PyTorch: a chunked parallel scan for ``forward`` and the
token-by-token recurrence for ``step``. There is no Triton kernel for it here.

Per head, with ``alpha_t = exp(dt_t * A_t)``, ``gamma_t = lambda_t * dt_t`` and ``beta_t = (1 - lambda_t) * dt_t *
alpha_t`` (the exponential-trapezoidal rule), the state ``h`` (``[N, P]``) follows::

    h_t = alpha_t h_{t-1} + beta_t sum_r B_{t-1,r} v_{t-1,r}^T + gamma_t sum_r B_{t,r} v_{t,r}^T
    y_{t,r} = h_t^T C_{t,r} + D v_{t,r}

where B and C are RMS-normalized, biased and rotated by cumulative data-dependent angles (the complex-valued
transition written as rotations of B and C), ``v_{t,r} = x_t * mimo_x[r]`` and the ``R`` outputs are gated by
``silu(z * mimo_z[r])`` and mixed by ``mimo_o[r]`` (SISO: ``R = 1`` with unit scales). Shapes: ``x``
``[B, T, hidden]``; :class:`Mamba3State` holds ``recurrent [N, H, state_dim, head_dim]``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from gdn2ts.layers.mamba3_config import Mamba3Config
from gdn2ts.layers.mask import check_token_mask
from gdn2ts.layers.norm import RMSNorm, rms_norm
from gdn2ts.ops.gdn2.reference import compute_dtype, pad_packed, unpad_packed
from gdn2ts.ops.validate import check_cu_seqlens, fail

__all__ = ["Mamba3", "Mamba3State", "mamba3_chunk_scan"]

DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4
TWO_PI = 2 * math.pi


class Mamba3State(NamedTuple):
    """What a Mamba-3 mixer carries between calls, for ``N`` sequences; all in fp32 (fp64 for fp64 activations).

    Example:
        >>> import torch
        >>> s = Mamba3State(torch.zeros(2, 4, 16, 8), torch.zeros(2, 4, 4), torch.zeros(2, 1, 4, 16),
        ...                 torch.zeros(2, 4, 8))
        >>> s.recurrent.shape, s.key.shape
        (torch.Size([2, 4, 16, 8]), torch.Size([2, 1, 4, 16]))
    """

    recurrent: torch.Tensor
    """``[N, H, state_dim, head_dim]`` the SSM state ``h``."""
    angle: torch.Tensor
    """``[N, H, num_angles]`` cumulative rotation angles, in ``[0, 2 pi)``."""
    key: torch.Tensor
    """``[N, R, H, state_dim]`` the previous token's B (normalized, biased, rotated); zeros before the first."""
    value: torch.Tensor
    """``[N, H, head_dim]`` the previous token's x (before the MIMO scales); zeros before the first."""


def _rotate(t: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Turn channel pairs ``(2i, 2i + 1)`` of ``t`` ``[..., R, H, N]`` by ``angle`` ``[..., H, A]`` (``i < A``)."""
    pairs = angle.shape[-1]
    head, tail = t[..., :2 * pairs].unflatten(-1, (pairs, 2)), t[..., 2 * pairs:]
    cos, sin = angle.cos()[..., None, :, :], angle.sin()[..., None, :, :]
    even, odd = head[..., 0], head[..., 1]
    turned = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)
    return torch.cat([turned, tail], dim=-1)


def _per_input(t: torch.Tensor, rank: int) -> torch.Tensor:
    """Repeat each entry of the last axis ``rank`` times (``[..., C] -> [..., C * rank]``); its backward is a
    sum over a view, which is cheaper than ``repeat_interleave``'s."""
    if rank == 1:
        return t
    return t[..., None].expand(*t.shape, rank).flatten(-2)


def mamba3_chunk_scan(q, k, v, log_decay, diag, off, h, chunk_size: int):
    """The Mamba-3 scan over ``T`` tokens in chunks. Returns ``(y [B, T, R, H, P], final h [B, H, N, P])``.

    ``q``, ``k`` ``[B, T, R, H, N]`` (rotated C, B); ``v`` ``[B, T, R, H, P]``; ``log_decay``, ``diag``, ``off``
    ``[B, T, H]``; ``h`` ``[B, H, N, P]`` the state before the first token. Token ``s`` enters the state read at
    ``t >= s`` with weight ``exp(sum_{s < i <= t} log_decay_i)`` times ``diag_s`` when ``t == s`` and ``off_s``
    when ``t > s`` (the trapezoidal rule: ``diag = gamma`` and ``off_s = gamma_s + (1 - lambda_{s+1})
    dt_{s+1}``, the next token's share without its decay); the final state uses ``off`` of the last token.

    Example:
        >>> import torch
        >>> B, T, R, H, N, P = 1, 5, 1, 2, 4, 3
        >>> q, k, v = torch.randn(B, T, R, H, N), torch.randn(B, T, R, H, N), torch.randn(B, T, R, H, P)
        >>> a, w = -torch.rand(B, T, H), torch.rand(B, T, H)
        >>> y, h = mamba3_chunk_scan(q, k, v, a, w, w, torch.zeros(B, H, N, P), chunk_size=2)
        >>> h1 = torch.einsum("bhn,bhp->bhnp", k[:, 0, 0], v[:, 0, 0]) * w[:, 0, :, None, None]
        >>> bool(torch.allclose(y[:, 0, 0], torch.einsum("bhn,bhnp->bhp", q[:, 0, 0], h1), atol=1e-6))
        True
    """
    Bsz, T, R, H, N = q.shape
    if T == 0:
        return v.new_zeros(v.shape), h
    # heads first and the R inputs of a token as R consecutive rows: every product below is one batched matmul
    q, k, v = (t.permute(0, 3, 1, 2, 4).reshape(Bsz, H, T * R, t.shape[-1]) for t in (q, k, v))
    log_decay, diag, off = (t.transpose(1, 2) for t in (log_decay, diag, off))  # [B, H, T]
    ys = []
    # split once rather than slice per chunk: the backward of a slice writes a full-size zero tensor each time
    pieces = zip(*(t.split(chunk_size * R, dim=2) for t in (q, k, v)),
                 *(t.split(chunk_size, dim=-1) for t in (log_decay, diag, off)), strict=True)
    for qc, kc, vc, ac, dc, oc in pieces:
        cum = ac.cumsum(-1)  # [B, H, C]
        C = cum.shape[-1]
        idx = torch.arange(C, device=q.device)
        below, on = idx[:, None] > idx[None, :], idx[:, None] == idx[None, :]
        # decay from s to t, masked above the diagonal before exp so that no positive exponent can overflow
        seg = (cum[..., :, None] - cum[..., None, :]).masked_fill(~(below | on), float("-inf")).exp()
        weight = torch.where(below, oc[:, :, None, :], torch.where(on, dc[:, :, None, :], 0.0))
        mix = _per_input(_per_input(seg * weight, R).transpose(-1, -2), R).transpose(-1, -2)  # [B, H, CR, CR]
        y = ((qc @ kc.transpose(-1, -2)) * mix) @ vc
        y = y + (qc @ h) * _per_input(cum.exp(), R)[..., None]
        to_end = _per_input((cum[..., -1:] - cum).exp() * oc, R)  # [B, H, CR]
        h = cum[..., -1].exp()[..., None, None] * h + (kc * to_end[..., None]).transpose(-1, -2) @ vc
        ys.append(y)
    return torch.cat(ys, dim=2).unflatten(2, (T, R)).permute(0, 2, 3, 1, 4), h


class Mamba3(nn.Module):
    """Mamba-3 mixer ``[B, T, hidden] -> [B, T, hidden]`` with explicit state; no short conv.

    ``forward`` runs whole sequences (training, prefill; dense or packed ``cu_seqlens``) through the chunked
    scan; ``step`` runs one token per row through the recurrence (inference only). Both take and return a
    :class:`Mamba3State`.

    Example:
        >>> import torch
        >>> cfg = Mamba3Config(hidden_size=32, num_heads=2, head_dim=8, state_dim=8, mode="mimo", mimo_rank=2)
        >>> layer = Mamba3(cfg).double()
        >>> x = torch.randn(2, 6, 32, dtype=torch.float64)
        >>> y, _ = layer(x)
        >>> state = layer.init_state(2)
        >>> for t in range(6):
        ...     y_t, state = layer.step(x[:, t], state)
        >>> y.shape, bool(torch.allclose(y_t, y[:, -1], atol=1e-10))
        (torch.Size([2, 6, 32]), True)
    """

    def __init__(self, config: Mamba3Config):
        super().__init__()
        if not isinstance(config, Mamba3Config):
            raise ValueError(f"Mamba3: argument 'config' expected a Mamba3Config, got {type(config).__name__}")
        self.config = cfg = config
        H, P, N, R = cfg.num_heads, cfg.head_dim, cfg.state_dim, cfg.rank
        self.in_proj = nn.Linear(cfg.hidden_size, cfg.in_proj_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(H))
        # QK-norm on B and C (one scale over the state axis), then learned per-head biases
        self.B_norm = RMSNorm(N, cfg.norm_eps)
        self.C_norm = RMSNorm(N, cfg.norm_eps)
        self.B_bias = nn.Parameter(torch.empty(H, R, N))
        self.C_bias = nn.Parameter(torch.empty(H, R, N))
        if cfg.mode == "mimo":
            self.mimo_x = nn.Parameter(torch.empty(H, R, P))
            self.mimo_z = nn.Parameter(torch.empty(H, R, P))
            self.mimo_o = nn.Parameter(torch.empty(H, R, P))
        self.D = nn.Parameter(torch.empty(H))
        self.out_proj = nn.Linear(cfg.inner_dim, cfg.hidden_size, bias=False)
        bc = R * cfg.num_bc_heads * N
        self._sizes = [cfg.inner_dim, cfg.inner_dim, bc, bc, H, H, H, cfg.num_angles]
        # optimizers read this to keep the step-size bias, the skip, the B/C biases and norms out of weight decay
        for p in (self.dt_bias, self.D, self.B_bias, self.C_bias, self.B_norm.weight, self.C_norm.weight):
            p._no_weight_decay = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Projections: PyTorch's Linear default; ``dt_bias = softplus^-1(dt)`` with dt log-uniform in
        [1e-3, 1e-1], clamped >= 1e-4; B/C norm scales, B/C biases and D: ones; MIMO: ``mimo_x = mimo_o = 1/R``,
        ``mimo_z = 1`` (so that the R inputs and outputs start as an average)."""
        for module in (self.in_proj, self.out_proj, self.B_norm, self.C_norm):
            module.reset_parameters()
        with torch.no_grad():
            dt = torch.promote_types(self.dt_bias.dtype, torch.float32)
            step = torch.empty(self.dt_bias.shape, device=self.dt_bias.device, dtype=dt)
            step = step.uniform_(math.log(DT_MIN), math.log(DT_MAX)).exp().clamp(min=DT_FLOOR)
            self.dt_bias.copy_(step + torch.log(-torch.expm1(-step)))
            for p in (self.B_bias, self.C_bias, self.D):
                p.fill_(1.0)
            if self.config.mode == "mimo":
                self.mimo_x.fill_(1.0 / self.config.rank)
                self.mimo_z.fill_(1.0)
                self.mimo_o.fill_(1.0 / self.config.rank)

    def init_state(self, batch: int, device=None, dtype: torch.dtype | None = None) -> Mamba3State:
        """Zero state for ``batch`` sequences; ``dtype`` is the activation dtype (default: the parameters').

        Example:
            >>> layer = Mamba3(Mamba3Config(hidden_size=16, num_heads=2, head_dim=4, state_dim=8))
            >>> [tuple(t.shape) for t in layer.init_state(3)]
            [(3, 2, 8, 4), (3, 2, 2), (3, 1, 2, 8), (3, 2, 4)]
        """
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
            fail("Mamba3.init_state", "batch", "an int >= 0", repr(batch))
        cfg, p = self.config, self.in_proj.weight
        device = p.device if device is None else device
        dt = compute_dtype(p.dtype if dtype is None else dtype)
        H, N, P = cfg.num_heads, cfg.state_dim, cfg.head_dim
        return Mamba3State(*(torch.zeros(shape, device=device, dtype=dt) for shape in (
            (batch, H, N, P), (batch, H, cfg.num_angles), (batch, cfg.rank, H, N), (batch, H, P))))

    # ----------------------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, state: Mamba3State | None = None, cu_seqlens: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Mamba3State]:
        """Whole sequences: ``x`` ``[B, T, hidden]`` (or ``[1, total, hidden]`` with ``cu_seqlens`` ``[N + 1]``
        packing ``N`` sequences, each starting from its own state row) -> ``(y [B, T, hidden], new_state)``;
        differentiable. ``state`` (zeros when omitted) is not modified. ``attention_mask`` ``[B, T]`` (bool or 0/1)
        skips the tokens where it is False exactly, anywhere in a row: the recurrence runs over the kept tokens
        alone (the trapezoid's previous token is the previous kept one), and skipped tokens output 0.

        Example:
            >>> import torch
            >>> layer = Mamba3(Mamba3Config(hidden_size=16, num_heads=2, head_dim=4, state_dim=8)).double()
            >>> a, b = torch.randn(1, 5, 16).double(), torch.randn(1, 3, 16).double()
            >>> y, _ = layer(torch.cat([a, b], 1), cu_seqlens=torch.tensor([0, 5, 8]))
            >>> bool(torch.allclose(y[:, 5:], layer(b)[0], atol=1e-12))
            True
        """
        op = "Mamba3.forward"
        self._check_x(op, "x", x, 3)
        B, T = x.shape[:2]
        if attention_mask is not None:
            if cu_seqlens is not None:
                fail(op, "attention_mask", "None when cu_seqlens is given (use one of the two)",
                     f"a tensor of shape {tuple(attention_mask.shape)} together with cu_seqlens")
            keep = check_token_mask(op, "attention_mask", attention_mask, (B, T), x.device)
            self._check_state(op, state, B, x)
            # each row's kept tokens moved to its front, in order: the scan runs them as a row of that length
            order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices  # [B, T]
            index = order[..., None].expand(B, T, x.shape[-1])
            y_front, new_state = self._run(x.gather(1, index), state, keep.sum(1))
            y = torch.zeros_like(y_front).scatter(1, index, y_front)
            return torch.where(keep[..., None], y, 0.0), new_state
        if cu_seqlens is None:
            self._check_state(op, state, B, x)
            lengths = torch.full((B,), T, device=x.device, dtype=torch.long)
            return self._run(x, state, lengths)
        if B != 1:
            fail(op, "x", "batch size 1 when cu_seqlens packs the sequences ([1, total, hidden])",
                 f"shape {tuple(x.shape)}")
        N = check_cu_seqlens(op, cu_seqlens, B, T, x.device)
        self._check_state(op, state, N, x)
        padded, index = pad_packed(x, cu_seqlens)
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device=x.device, dtype=torch.long)
        y, new_state = self._run(padded, state, lengths)
        return unpad_packed(y, index, T), new_state

    @torch.no_grad()
    def step(self, x_t: torch.Tensor, state: Mamba3State | None = None) -> tuple[torch.Tensor, Mamba3State]:
        """One token per row: ``x_t`` ``[B, hidden]`` -> ``(y_t [B, hidden], new_state)``, by the recurrence
        itself (not the scan). Inference only; ``state`` (zeros when omitted) is not modified."""
        op = "Mamba3.step"
        self._check_x(op, "x_t", x_t, 2)
        B = x_t.shape[0]
        self._check_state(op, state, B, x_t)
        if state is None:
            state = self.init_state(B, device=x_t.device, dtype=x_t.dtype)
        z, x, b, c, dt, log_decay, lam, turn = (t[:, 0] for t in self._prepare(x_t[:, None]))
        angle = torch.remainder(state.angle + turn, TWO_PI)
        k, q = _rotate(b, angle), _rotate(c, angle)
        v, v_prev = self._inputs(x), self._inputs(state.value)
        alpha = log_decay.exp()[:, :, None, None]
        prev = torch.einsum("brhn,brhp->bhnp", state.key, v_prev)
        now = torch.einsum("brhn,brhp->bhnp", k, v)
        h = alpha * (state.recurrent + ((1 - lam) * dt)[:, :, None, None] * prev) + (lam * dt)[:, :, None, None] * now
        y = torch.einsum("brhn,bhnp->brhp", q, h)
        out = self._output(y, v, z)
        return self.out_proj(out.flatten(-2).to(x_t.dtype)), Mamba3State(h, angle, k, x)

    # ----------------------------------------------------------------------------------------------------------

    def _prepare(self, u: torch.Tensor):
        """``u`` ``[B, T, hidden]`` -> per-token ``z``, ``x`` ``[B, T, H, P]``; normalized, biased ``b``, ``c``
        ``[B, T, R, H, N]`` (not yet rotated); ``dt``, ``log_decay``, ``lam`` ``[B, T, H]``; angle increments
        ``[B, T, H, A]``; all in the compute dtype."""
        cfg = self.config
        H, P, N, R, G = cfg.num_heads, cfg.head_dim, cfg.state_dim, cfg.rank, cfg.num_bc_heads
        dtype = compute_dtype(u.dtype)
        parts = [t.to(dtype) for t in self.in_proj(u).split(self._sizes, dim=-1)]
        z, x, b, c, dd_dt, dd_a, trap, theta = parts
        z, x = z.unflatten(-1, (H, P)), x.unflatten(-1, (H, P))
        b = rms_norm(b.unflatten(-1, (R, G, N)), self.B_norm.weight, cfg.norm_eps).repeat_interleave(H // G, dim=-2)
        c = rms_norm(c.unflatten(-1, (R, G, N)), self.C_norm.weight, cfg.norm_eps).repeat_interleave(H // G, dim=-2)
        b = b + self.B_bias.to(dtype).transpose(0, 1)
        c = c + self.C_bias.to(dtype).transpose(0, 1)
        dt = F.softplus(dd_dt + self.dt_bias.to(dtype))
        log_decay = -F.softplus(dd_a).clamp(min=cfg.a_floor) * dt
        lam = torch.sigmoid(trap)
        # one angle per pair, shared by the heads, scaled by each head's step size (bounded to pi per unit dt)
        turn = torch.tanh(theta)[..., None, :] * math.pi * dt[..., None]
        return z, x, b, c, dt, log_decay, lam, turn

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., H, P]`` -> the ``R`` inputs ``[..., R, H, P]`` (``x * mimo_x[r]``; SISO: ``x``)."""
        if self.config.mode == "siso":
            return x.unsqueeze(-3)
        return x.unsqueeze(-3) * self.mimo_x.to(x.dtype).transpose(0, 1)

    def _output(self, y: torch.Tensor, v: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Skip, gate and MIMO mix: ``y``, ``v`` ``[..., R, H, P]``, ``z`` ``[..., H, P]`` -> ``[..., H, P]``."""
        y = y + self.D.to(y.dtype)[:, None] * v
        if self.config.mode == "siso":
            return y.squeeze(-3) * F.silu(z)
        gate = F.silu(z.unsqueeze(-3) * self.mimo_z.to(z.dtype).transpose(0, 1))
        return (y * gate * self.mimo_o.to(y.dtype).transpose(0, 1)).sum(-3)

    def _run(self, u: torch.Tensor, state: Mamba3State | None, lengths: torch.Tensor):
        """``u`` ``[B, T, hidden]`` whose row ``i`` has ``lengths[i]`` leading tokens (the rest is padding, run as
        identity steps) -> ``(y [B, T, hidden], state after each row's last token)``."""
        cfg = self.config
        B, T = u.shape[:2]
        if state is None:
            state = self.init_state(B, device=u.device, dtype=u.dtype)
        z, x, b, c, dt, log_decay, lam, turn = self._prepare(u)
        valid = (torch.arange(T, device=u.device)[None, :] < lengths[:, None])[..., None]  # [B, T, 1]
        log_decay, turn = log_decay * valid, turn * valid[..., None]
        gamma, share = lam * dt * valid, (1 - lam) * dt * valid
        angle = torch.remainder(state.angle[:, None] + turn.cumsum(1), TWO_PI)
        k, q = _rotate(b, angle), _rotate(c, angle)
        v = self._inputs(x)
        # the trapezoid's second term: token s is written again by token s + 1 (with s + 1's step size)
        off = gamma + F.pad(share[:, 1:], (0, 0, 0, 1))
        h0 = state.recurrent
        if T:
            h0 = h0 + share[:, 0, :, None, None] * torch.einsum("brhn,brhp->bhnp", state.key,
                                                                 self._inputs(state.value))
        chunk = max(1, cfg.chunk_size // cfg.rank)
        y, h = mamba3_chunk_scan(q, k, v, log_decay, gamma, off, h0, chunk)
        out = self.out_proj(self._output(y, v, z).flatten(-2).to(u.dtype))
        # each row's carry is its last real token's (rows of length 0 keep theirs)
        last = (lengths - 1).clamp(min=0)
        rows = torch.arange(B, device=u.device)
        empty = (lengths == 0)
        if T:
            key = torch.where(empty[:, None, None, None], state.key, k[rows, last])
            value = torch.where(empty[:, None, None], state.value, x[rows, last])
            angle_out = angle[:, -1]
        else:
            key, value, angle_out = state.key, state.value, state.angle
        return out, Mamba3State(h, angle_out, key, value)

    # ----------------------------------------------------------------------------------------------------------

    def _check_x(self, op: str, name: str, x, ndim: int) -> None:
        hidden, p = self.config.hidden_size, self.in_proj.weight
        want = "[B, T, hidden]" if ndim == 3 else "[B, hidden]"
        if not isinstance(x, torch.Tensor):
            fail(op, name, f"a torch.Tensor {want}", type(x).__name__)
        if x.dim() != ndim or x.shape[-1] != hidden:
            fail(op, name, f"a {ndim}-D tensor {want} with hidden={hidden}", f"shape {tuple(x.shape)}")
        if not x.is_floating_point() or (x.dtype != p.dtype and not torch.is_autocast_enabled(x.device.type)):
            fail(op, name, f"dtype {p.dtype} (the layer's parameter dtype)", x.dtype)
        if x.device != p.device:
            fail(op, name, f"a tensor on {p.device} (the layer's device)", x.device)

    def _check_state(self, op: str, state, N: int, x: torch.Tensor) -> None:
        if state is None:
            return
        if not isinstance(state, Mamba3State):
            fail(op, "state", "a Mamba3State(recurrent, angle, key, value) or None", type(state).__name__)
        want = self.init_state(N, device="meta", dtype=x.dtype)
        dtype = compute_dtype(x.dtype)
        for field, t, ref in zip(Mamba3State._fields, state, want, strict=True):
            name = f"state.{field}"
            if not isinstance(t, torch.Tensor):
                fail(op, name, f"a torch.Tensor of shape {tuple(ref.shape)}", type(t).__name__)
            if tuple(t.shape) != tuple(ref.shape):
                fail(op, name, f"shape {tuple(ref.shape)} (N={N} sequences)", f"shape {tuple(t.shape)}")
            if t.dtype != dtype:
                fail(op, name, f"dtype {dtype} (for {x.dtype} activations)", t.dtype)
            if t.device != x.device:
                fail(op, name, f"a tensor on {x.device} (the device of the input)", t.device)
