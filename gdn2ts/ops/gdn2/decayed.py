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
        self.G = G
        lo, hi = torch.aminmax(G, dim=-2, keepdim=True)
        spread = (hi - lo).amax(dim=-1).view(-1)
        unsafe = torch.ones_like(spread, dtype=torch.bool) if force_blocked else spread > SAFE_SPREAD[G.dtype]
        self.slow = unsafe.nonzero(as_tuple=True)[0]
        self.all_fast = self.slow.numel() == 0
        self.all_slow = self.slow.numel() == G.shape[0]
        mid = 0.5 * (hi + lo)
        if not self.all_fast:
            # unsafe chunks run the mid-point form on a zeroed decay (finite, then overwritten)
            keep = ~unsafe[:, None, None]
            G, mid = torch.where(keep, G, 0.0), torch.where(keep, mid, 0.0)
        self.up = (G - mid).exp_()  # exp(G_r - m)
        self.down = torch.reciprocal(self.up)  # exp(m - G_s)
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


def lower(p: Plan, Ps: list[torch.Tensor], x: torch.Tensor, x_down: torch.Tensor | None = None):
    """For each lower-triangular ``P`` ``[M, C, C]``: row r collects ``P[r, s] x[s] D[r, s]`` over s.

    ``x`` is ``[M, C, K]``; returns a list of ``[M, C, K]``. ``x_down`` (``x * exp(m - G)``) may be passed when
    already computed.
    """
    fast = [None] * len(Ps)
    if not p.all_slow:
        x_down = x * p.down if x_down is None else x_down
        fast = [torch.bmm(P, x_down).mul_(p.up) for P in Ps]

    def slow(P):
        return lambda idx: _apply_blocked(P[idx], x[idx], p.G[idx], p.sub, transpose=False)

    return [_merge(p, f, slow(P)) if f is not None else slow(P)(p.slow) for P, f in zip(Ps, fast, strict=True)]


def upper(p: Plan, Ps: list[torch.Tensor], xs: list[torch.Tensor], xs_up: list[torch.Tensor] | None = None):
    """Column s collects ``P_i[r, s] x_i[r] D[r, s]`` over r, summed over the pairs ``(P_i, x_i)``.

    Each ``P_i`` is lower triangular ``[M, C, C]``, each ``x_i`` ``[M, C, K]``; returns ``[M, C, K]``. ``xs_up``
    (each x times ``exp(G - m)``) may be passed when already computed.
    """
    fast = None
    if not p.all_slow:
        xs_up = [x * p.up for x in xs] if xs_up is None else xs_up
        fast = torch.bmm(Ps[0].transpose(-1, -2), xs_up[0])
        for P, x_up in zip(Ps[1:], xs_up[1:], strict=True):
            fast.baddbmm_(P.transpose(-1, -2), x_up)
        fast.mul_(p.down)

    def slow(idx):
        return sum(_apply_blocked(P[idx], x[idx], p.G[idx], p.sub, transpose=True) for P, x in zip(Ps, xs,
                                                                                                  strict=True))

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
