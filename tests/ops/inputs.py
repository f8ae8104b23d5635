"""Seeded random inputs for the op tests (q, k normalized or not, gates of several kinds)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

GATES = ("normal", "decay_near_0", "decay_near_1", "binary", "zero_decay", "strong_mixed")


def make_inputs(B=2, T=65, H=2, K=16, V=8, HV=None, dtype=torch.float64, gates="normal", seed=0,
                g_heads=None, initial_state=True, normalize=True):
    """Return dict of q, k, v, g, b, w, h0 (fp64 master copies cast to ``dtype``; h0 in the state dtype)."""
    HV = HV or H
    gh = g_heads or H
    gen = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    def u(*s):
        return torch.rand(*s, generator=gen, dtype=torch.float64)

    q, k = r(B, T, H, K), r(B, T, H, K)
    if normalize:
        k = F.normalize(k, dim=-1)
    v = r(B, T, HV, V)
    g = F.logsigmoid(r(B, T, gh, K) + 2.0)
    b, w = u(B, T, gh, K), u(B, T, HV, V)
    if gates == "decay_near_0":  # alpha = exp(g) between 1e-40 and 1e-4
        g = -(10.0 + 80.0 * u(B, T, gh, K))
    elif gates == "decay_near_1":
        g = -1e-7 * u(B, T, gh, K)
    elif gates == "binary":  # erase and write exactly 0 or 1
        b, w = (u(B, T, gh, K) > 0.5).double(), (u(B, T, HV, V) > 0.5).double()
    elif gates == "zero_decay":
        g = torch.zeros(B, T, gh, K, dtype=torch.float64)
    elif gates == "strong_mixed":  # strong and weak decay side by side, channels and steps mixed
        g = torch.where(u(B, T, gh, K) > 0.7, -(5.0 + 50.0 * u(B, T, gh, K)), -0.01 * u(B, T, gh, K))
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    h0 = r(B, HV, K, V).to(sdt) if initial_state else None
    out = {name: t.to(dtype) for name, t in dict(q=q, k=k, v=v, g=g, b=b, w=w).items()}
    out["h0"] = h0
    return out
