"""Decayed products inside a chunk: the three contractions of the chunked GDN-2 form and its backward.

For chunks ``[M, C, K]`` with in-chunk cumulative log-decay ``G`` (``D[r, s, i] = exp(G[r, i] - G[s, i])``)::

    gram(l, x)[r, s]  = sum_i  l[r, i] x[s, i] D[r, s, i]         (only r >= s is meaningful)
    lower(P, x)[r, i] = sum_s  P[r, s]  x[s, i] D[r, s, i]         (P lower triangular)
    upper(P, x)[s, i] = sum_r  P[r, s]  x[r, i] D[r, s, i]         (P lower triangular)

``D`` is never formed by dividing exponentials. Each chunk takes one of two exact forms:

* mid-point (one matmul): ``D = exp(G_r - m) * exp(m - G_s)`` about the per-channel mid-point ``m`` of ``G``.
  Every factor is at most ``exp(spread / 2)``, so it is used only while the in-chunk spread of ``G`` is small
  (``SAFE_SPREAD``); entries with ``r < s`` may then be large but stay finite and are masked or multiplied by 0.
* blocked (any decay): ``SUB x SUB`` diagonal blocks pairwise; an off-diagonal block column j is referenced to
  the last position of block j, so every exponent is <= 0.
"""

from __future__ import annotations

import torch

SUB = 16
SAFE_SPREAD = {torch.float32: 60.0, torch.float64: 600.0}

__all__ = ["Plan", "plan", "gram", "lower", "upper"]


class Plan:
    """Which chunks of a batch ``[M, C, K]`` need the blocked form (computed once, shared by fwd and bwd)."""

    def __init__(self, G: torch.Tensor, force_blocked: bool = False):
        spread = (G.amax(dim=-2) - G.amin(dim=-2)).amax(dim=-1)
        unsafe = torch.ones_like(spread, dtype=torch.bool) if force_blocked else spread > SAFE_SPREAD[G.dtype]
        self.slow = unsafe.nonzero(as_tuple=True)[0]
        self.all_fast = self.slow.numel() == 0
        self.all_slow = self.slow.numel() == G.shape[0]
        # Unsafe chunks run the mid-point form on a zeroed decay (finite, then overwritten).
        G_fast = G if self.all_fast else torch.where(unsafe[:, None, None], torch.zeros_like(G), G)
        mid = 0.5 * (G_fast.amax(dim=-2, keepdim=True) + G_fast.amin(dim=-2, keepdim=True))
        self.up = (G_fast - mid).exp()  # exp(G_r - m)
        self.down = (mid - G_fast).exp()  # exp(m - G_s)
        self.G = G
        C = G.shape[-2]
        self.sub = SUB if C % SUB == 0 else C


def plan(G: torch.Tensor, force_blocked: bool = False) -> Plan:
    return Plan(G, force_blocked)


def _merge(p: Plan, fast: torch.Tensor, slow_fn) -> torch.Tensor:
    if p.all_fast:
        return fast
    slow = slow_fn(p.slow)
    return slow if p.all_slow else fast.index_put((p.slow,), slow)


def gram(p: Plan, lefts: list[torch.Tensor], x: torch.Tensor):
    """Grams of each left with ``x``, stacked along rows: ``[M, len(lefts) * C, C]`` (upper part unspecified).

    Also returns the scaled operands of the mid-point form (``lefts * exp(G - m)`` stacked, ``x * exp(m - G)``),
    which the backward reuses; they are None when every chunk is blocked.
    """
    lefts_up = x_down = fast = None
    if not p.all_slow:
        lefts_up = torch.cat([lf * p.up for lf in lefts], dim=-2)
        x_down = x * p.down
        fast = lefts_up @ x_down.transpose(-1, -2)

    def slow(idx):
        return torch.cat([_gram_blocked(lf[idx], x[idx], p.G[idx], p.sub) for lf in lefts], dim=-2)

    out = _merge(p, fast, slow) if fast is not None else slow(p.slow)
    return out, lefts_up, x_down


def lower(p: Plan, P: torch.Tensor, x: torch.Tensor, x_down: torch.Tensor | None = None) -> torch.Tensor:
    """Row r collects ``P[r, s] x[s] D[r, s]`` over s, for a stack of lower-triangular blocks.

    ``P`` is ``[M, n * C, C]`` (n blocks stacked along rows), ``x`` ``[M, C, K]``; returns ``[M, n * C, K]``.
    ``x_down`` (``x * exp(m - G)``) may be passed when already computed.
    """
    M, rows, C = P.shape
    n = rows // C
    fast = None
    if not p.all_slow:
        x_down = x * p.down if x_down is None else x_down
        fast = ((P @ x_down).view(M, n, C, -1) * p.up[:, None]).view(M, rows, -1)

    def slow(idx):
        return torch.cat([_apply_blocked(P[idx, i * C:(i + 1) * C], x[idx], p.G[idx], p.sub, transpose=False)
                          for i in range(n)], dim=-2)

    return _merge(p, fast, slow) if fast is not None else slow(p.slow)


def upper(p: Plan, P: torch.Tensor, xs: list[torch.Tensor], xs_up: torch.Tensor | None = None) -> torch.Tensor:
    """Column s collects ``P_i[r, s] x_i[r] D[r, s]`` over r and over the stacked blocks i.

    ``P`` is ``[M, n * C, C]``, ``xs`` n tensors ``[M, C, K]``; returns ``[M, C, K]``. ``xs_up`` (the xs times
    ``exp(G - m)``, stacked along rows) may be passed when already computed.
    """
    C = P.shape[-1]
    fast = None
    if not p.all_slow:
        xs_up = torch.cat([x * p.up for x in xs], dim=-2) if xs_up is None else xs_up
        fast = p.down * (P.transpose(-1, -2) @ xs_up)

    def slow(idx):
        return sum(_apply_blocked(P[idx, i * C:(i + 1) * C], x[idx], p.G[idx], p.sub, transpose=True)
                   for i, x in enumerate(xs))

    return _merge(p, fast, slow) if fast is not None else slow(p.slow)


def _diag_decay(G: torch.Tensor, sub: int) -> torch.Tensor:
    """``[M, n, sub, sub, K]`` decay inside each diagonal block, zero above the diagonal."""
    Gb = G.unflatten(-2, (G.shape[-2] // sub, sub))
    diff = Gb[..., :, None, :] - Gb[..., None, :, :]
    causal = torch.ones(sub, sub, dtype=torch.bool, device=G.device).tril()[..., None]
    return diff.masked_fill(~causal, float("-inf")).exp()


def _gram_blocked(left: torch.Tensor, x: torch.Tensor, G: torch.Tensor, sub: int) -> torch.Tensor:
    C = G.shape[-2]
    n = C // sub
    decay = _diag_decay(G, sub)
    diag = torch.einsum("mark,mask,marsk->mars", left.unflatten(1, (n, sub)), x.unflatten(1, (n, sub)), decay)
    out = left.new_zeros(G.shape[0], C, C)
    for j in range(n):
        cols = slice(j * sub, (j + 1) * sub)
        out[:, cols, cols] = diag[:, j]
        if j < n - 1:
            ref = G[:, (j + 1) * sub - 1:(j + 1) * sub]
            rows = slice((j + 1) * sub, C)
            lo = left[:, rows] * (G[:, rows] - ref).exp()
            hi = x[:, cols] * (ref - G[:, cols]).exp()
            out[:, rows, cols] = lo @ hi.transpose(-1, -2)
    return out


def _apply_blocked(P: torch.Tensor, x: torch.Tensor, G: torch.Tensor, sub: int, transpose: bool) -> torch.Tensor:
    C = G.shape[-2]
    n = C // sub
    decay = _diag_decay(G, sub)
    Pd = torch.stack([P[:, j * sub:(j + 1) * sub, j * sub:(j + 1) * sub] for j in range(n)], dim=1)
    xb = x.unflatten(1, (n, sub))
    if transpose:
        out = torch.einsum("mnrs,mnrsk,mnrk->mnsk", Pd, decay, xb).flatten(1, 2)
    else:
        out = torch.einsum("mnrs,mnrsk,mnsk->mnrk", Pd, decay, xb).flatten(1, 2)
    for j in range(n - 1):
        cols = slice(j * sub, (j + 1) * sub)
        rows = slice((j + 1) * sub, C)
        ref = G[:, (j + 1) * sub - 1:(j + 1) * sub]
        into = (G[:, rows] - ref).exp()  # exp(G_r - ref) <= 1 for later rows
        outof = (ref - G[:, cols]).exp()  # exp(ref - G_s) <= 1 for block j
        if transpose:
            out[:, cols] += outof * (P[:, rows, cols].transpose(-1, -2) @ (x[:, rows] * into))
        else:
            out[:, rows] += into * (P[:, rows, cols] @ (x[:, cols] * outof))
    return out
