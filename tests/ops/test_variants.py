"""The op configured as KDA, Gated DeltaNet, Mamba-2's SSD and the identity update, each against a small
recurrence written independently here (explicit matrices, no shared code with the library)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gdn2ts.ops import chunk_gdn2, recurrent_gdn2

from tolerances import assert_close

B, T, H, K, V = 2, 70, 2, 6, 5


def rand(*s, seed=0):
    return torch.randn(*s, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def keys(seed):
    return F.normalize(rand(B, T, H, K, seed=seed), dim=-1)


def loop(step, S0, T):
    """Run ``S, o = step(t, S)`` for t < T over every (batch, head); return o [B, T, H, V] and S."""
    S = S0.clone()
    o = torch.zeros(B, T, H, V, dtype=torch.float64)
    for bi in range(B):
        for h in range(H):
            for t in range(T):
                S[bi, h], o[bi, t, h] = step(bi, t, h, S[bi, h])
    return o, S


def test_kda_channel_decay_scalar_beta():
    q, k, v = rand(B, T, H, K, seed=1), keys(2), rand(B, T, H, V, seed=3)
    alpha = torch.sigmoid(rand(B, T, H, K, seed=4) + 2)
    beta = torch.sigmoid(rand(B, T, H, seed=5))
    S0 = rand(B, H, K, V, seed=6)

    def step(bi, t, h, S):
        kt, bt = k[bi, t, h], beta[bi, t, h]
        S = (torch.eye(K, dtype=S.dtype) - bt * torch.outer(kt, kt)) @ torch.diag(alpha[bi, t, h]) @ S \
            + bt * torch.outer(kt, v[bi, t, h])
        return S, S.T @ (q[bi, t, h] * K**-0.5)

    o_ref, s_ref = loop(step, S0, T)
    o, s = chunk_gdn2(q, k, v, alpha.log(), beta[..., None].expand(B, T, H, K), beta[..., None].expand(B, T, H, V),
                      initial_state=S0, output_final_state=True)
    assert_close("o", o, o_ref, torch.float64)
    assert_close("state", s, s_ref, torch.float64)


def test_gated_deltanet_scalar_decay():
    q, k, v = rand(B, T, H, K, seed=11), keys(12), rand(B, T, H, V, seed=13)
    alpha = torch.sigmoid(rand(B, T, H, seed=14) + 2)
    beta = torch.sigmoid(rand(B, T, H, seed=15))
    S0 = rand(B, H, K, V, seed=16)

    def step(bi, t, h, S):
        kt, bt = k[bi, t, h], beta[bi, t, h]
        S = alpha[bi, t, h] * (torch.eye(K, dtype=S.dtype) - bt * torch.outer(kt, kt)) @ S \
            + bt * torch.outer(kt, v[bi, t, h])
        return S, S.T @ (q[bi, t, h] * K**-0.5)

    o_ref, s_ref = loop(step, S0, T)
    g = alpha.log()[..., None].expand(B, T, H, K)
    o, s = chunk_gdn2(q, k, v, g, beta[..., None].expand(B, T, H, K), beta[..., None].expand(B, T, H, V),
                      initial_state=S0, output_final_state=True)
    assert_close("o", o, o_ref, torch.float64)
    assert_close("state", s, s_ref, torch.float64)


def test_mamba2_ssd_recurrence():
    """h_t = exp(dt A) h_{t-1} + dt B_t x_t^T, y_t = h_t^T C_t: k = B, q = C, v = x, b = 0, g = dt A, w = dt."""
    C_, B_, x = rand(B, T, H, K, seed=21), rand(B, T, H, K, seed=22), rand(B, T, H, V, seed=23)
    dt = F.softplus(rand(B, T, H, seed=24) - 1)
    A = -torch.exp(rand(H, seed=25))
    h0 = rand(B, H, K, V, seed=26)

    def step(bi, t, h, S):
        S = torch.exp(dt[bi, t, h] * A[h]) * S + dt[bi, t, h] * torch.outer(B_[bi, t, h], x[bi, t, h])
        return S, S.T @ C_[bi, t, h]

    o_ref, s_ref = loop(step, h0, T)
    g = (dt * A)[..., None].expand(B, T, H, K)
    zeros = torch.zeros(B, T, H, K, dtype=torch.float64)
    o, s = chunk_gdn2(C_, B_, x, g, zeros, dt[..., None].expand(B, T, H, V), scale=1.0, initial_state=h0,
                      output_final_state=True)
    assert_close("o", o, o_ref, torch.float64)
    assert_close("state", s, s_ref, torch.float64)


def test_identity_update_keeps_state_and_reads_it():
    q, k, v = rand(B, T, H, K, seed=31), keys(32), rand(B, T, H, V, seed=33)
    S0 = rand(B, H, K, V, seed=34)
    zk, zv = torch.zeros(B, T, H, K, dtype=torch.float64), torch.zeros(B, T, H, V, dtype=torch.float64)
    for op in (chunk_gdn2, recurrent_gdn2):
        o, s = op(q, k, v, zk, zk, zv, initial_state=S0, output_final_state=True)
        assert torch.equal(s, S0)
        assert_close("o", o, torch.einsum("bthk,bhkv->bthv", q * K**-0.5, S0), torch.float64)
