"""recurrent_gdn2's serving options against the fp64 token loop, on the PyTorch path and on the Triton kernel (under
the interpreter on the CPU): per-token slot tables with accepted-token counts (speculative decoding), the pool left
untouched (``inplace_final_state=False``), states laid out ``[V, K]``, an output buffer and the bounded gate."""

from __future__ import annotations

import pytest
import torch

from gdn2ts.ops import recurrent_gdn2, recurrent_reference
from gdn2ts.ops.gdn2.options import gate

from inputs import make_inputs
from tolerances import assert_close

ARGS = ("q", "k", "v", "g", "b", "w")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [("torch", torch.float64), ("torch", torch.float32), ("triton", torch.float32)]
H, K, V = 2, 8, 8


def seqs(B, T, dtype, seed):
    x = make_inputs(B=B, T=T, H=H, K=K, V=V, dtype=dtype, seed=seed, initial_state=False)
    return [x[n].to(DEVICE) for n in ARGS]


def per_token_truth(args, h0, lengths):
    """fp64 outputs and the state after every token of each of the sequences packed in ``args`` ([1, total])."""
    args = [a.double().cpu() for a in args]
    outs, states, s0 = [], [], 0
    for n, L in enumerate(lengths):
        S, row = h0[n:n + 1].double().cpu(), []
        for t in range(s0, s0 + L):
            o, S = recurrent_reference(*(a[:, t:t + 1] for a in args), None, S, True)
            outs.append(o)
            row.append(S[0])
        states.append(row)
        s0 += L
    return outs, states


def fixed_truth(args, h0):
    """fp64 ``(o, [[state after token j] for each sequence])`` of a fixed-length batch."""
    B, T = args[0].shape[:2]
    a64 = [a.double().cpu() for a in args]
    states, outs = [], []
    for n in range(B):
        S, row, o_n = h0[n:n + 1].double().cpu(), [], []
        for j in range(T):
            o, S = recurrent_reference(*(a[n:n + 1, j:j + 1] for a in a64), None, S, True)
            o_n.append(o)
            row.append(S[0])
        states.append(row)
        outs.append(torch.cat(o_n, 1))
    return torch.cat(outs, 0), states


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_per_token_slots_with_accepted_counts(backend, dtype):
    B, T = 3, 3
    args = seqs(B, T, dtype, seed=1)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    pool = torch.randn(12, H, K, V, dtype=sdt, device=DEVICE)
    before = pool.clone()
    table = torch.tensor([[0, 1, 2, 3], [4, 5, -1, 6], [7, -1, 8, 9]], device=DEVICE)
    accepted = torch.tensor([1, 4, 2], device=DEVICE)
    read = [0, 6, -1]  # table[n, accepted[n] - 1]: the third row starts from zeros
    h0 = torch.stack([before[s] if s >= 0 else torch.zeros_like(before[0]) for s in read])
    with torch.no_grad():
        o, out = recurrent_gdn2(*args, initial_state=pool, state_indices=table, num_accepted_tokens=accepted,
                                backend=backend)
    assert out is pool
    o_ref, states = fixed_truth(args, h0)
    assert_close("o", o.cpu(), o_ref, dtype)
    written = set()
    for n in range(B):
        for j in range(T):
            slot = int(table[n, j])
            if slot >= 0:
                written.add(slot)
                assert_close(f"slot {slot}", pool[slot].cpu(), states[n][j], dtype)
    for slot in set(range(12)) - written:  # slots of columns past T, of -1 tokens and unused ones stay
        assert torch.equal(pool[slot], before[slot]), slot


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_per_token_states_returned_packed_and_pool_untouched(backend, dtype):
    cu = torch.tensor([0, 2, 2, 5], device=DEVICE)
    args = seqs(1, 5, dtype, seed=2)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    pool = torch.randn(8, H, K, V, dtype=sdt, device=DEVICE)
    before = pool.clone()
    table = torch.tensor([[5, 1, 2], [-1, -1, -1], [3, 4, 0]], device=DEVICE)
    with torch.no_grad():
        o, every = recurrent_gdn2(*args, initial_state=pool, cu_seqlens=cu, state_indices=table,
                                  inplace_final_state=False, backend=backend)
    assert torch.equal(pool, before)
    assert every.shape == (5, H, K, V)
    h0 = torch.stack([before[5], torch.zeros_like(before[0]), before[3]])
    outs, states = per_token_truth(args, h0, [2, 0, 3])
    assert_close("o", o.cpu(), torch.cat(outs, 1), dtype)
    assert_close("states", every.cpu(), torch.stack([s for row in states for s in row]), dtype)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_pool_read_only_returns_final_states(backend, dtype):
    args = seqs(3, 2, dtype, seed=3)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    pool = torch.randn(5, H, K, V, dtype=sdt, device=DEVICE)
    before = pool.clone()
    idx = torch.tensor([4, -1, 1], device=DEVICE)
    with torch.no_grad():
        o, s = recurrent_gdn2(*args, initial_state=pool, state_indices=idx, inplace_final_state=False,
                              backend=backend)
    assert torch.equal(pool, before)
    h0 = torch.stack([before[4], torch.zeros_like(before[0]), before[1]])
    o_ref, states = fixed_truth(args, h0)
    assert_close("o", o.cpu(), o_ref, dtype)
    assert_close("final", s.cpu(), torch.stack([row[-1] for row in states]), dtype)
    _, none = recurrent_gdn2(*args, initial_state=pool, state_indices=idx, inplace_final_state=False,
                             output_final_state=False, backend=backend)
    assert none is None


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_states_laid_out_v_first(backend, dtype):
    args = seqs(2, 3, dtype, seed=4)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    h0 = torch.randn(2, H, K, V, dtype=sdt, device=DEVICE)
    o_kv, s_kv = recurrent_gdn2(*args, initial_state=h0, backend=backend)
    o_vk, s_vk = recurrent_gdn2(*args, initial_state=h0.transpose(-1, -2).contiguous(), state_v_first=True,
                                backend=backend)
    assert s_vk.shape == (2, H, V, K)
    assert_close("o", o_vk.cpu(), o_kv.double().cpu(), dtype)
    assert_close("state", s_vk.transpose(-1, -2).cpu(), s_kv.double().cpu(), dtype)
    # a [V, K] pool, written in place
    pool = torch.randn(4, H, V, K, dtype=sdt, device=DEVICE)
    start = pool[[3, 0]].transpose(-1, -2).clone()
    o_p, _ = recurrent_gdn2(*args, initial_state=pool, state_indices=torch.tensor([3, 0], device=DEVICE),
                            state_v_first=True, backend=backend)
    o_ref, s_ref = recurrent_gdn2(*args, initial_state=start, backend=backend)
    assert_close("pool o", o_p.cpu(), o_ref.double().cpu(), dtype)
    assert_close("pool", pool[[3, 0]].transpose(-1, -2).cpu(), s_ref.double().cpu(), dtype)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_output_buffer(backend, dtype):
    args = seqs(2, 2, dtype, seed=5)
    buf = torch.full_like(args[2], float("nan"))
    o, _ = recurrent_gdn2(*args, out=buf, backend=backend)
    assert o is buf
    o_ref, _ = recurrent_gdn2(*args, backend=backend)
    assert torch.equal(buf, o_ref)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("with_A_log", [True, False])
def test_bounded_gate(backend, dtype, with_A_log):
    args = seqs(2, 3, dtype, seed=6)
    gen = torch.Generator().manual_seed(6)
    A_log = torch.rand(H, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE) if with_A_log else None
    dt_bias = torch.randn(H * K, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    o, s = recurrent_gdn2(*args, use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias, lower_bound=-3.0,
                          backend=backend)
    a64 = [a.double().cpu() for a in args]
    g = gate(a64[3], None if A_log is None else A_log.double().cpu(), dt_bias.double().cpu(), -3.0, torch.float64)
    assert bool((g > -3.0).all() and (g < 0).all())
    o_ref, s_ref = recurrent_reference(*a64[:3], g, *a64[4:], None, None, True)
    assert_close("o", o.cpu(), o_ref, dtype)
    assert_close("state", s.cpu(), s_ref, dtype)


@pytest.mark.parametrize("kw,pattern", [
    (dict(num_accepted_tokens=torch.tensor([1, 1])), r"'num_accepted_tokens' expected None unless state_indices"),
    (dict(state_indices=torch.tensor([[0, 1], [2, 3]]), num_accepted_tokens=torch.tensor([1, 3])),
     r"'num_accepted_tokens' expected counts in \[1, 2\]"),
    (dict(state_indices=torch.tensor([[0, 1], [2, 3]]), num_accepted_tokens=torch.tensor([0, 1])),
     r"'num_accepted_tokens' expected counts in \[1, 2\]"),
    (dict(state_indices=torch.tensor([[0, 1], [2, 3]]), num_accepted_tokens=torch.tensor([1])),
     r"'num_accepted_tokens' expected an integer tensor \[N=2\]"),
    (dict(state_indices=torch.tensor([[0], [2]])), r"'state_indices' expected a slot for each of the T=2 tokens"),
    (dict(state_indices=torch.tensor([[0, 1], [1, 3]])), r"'state_indices' expected distinct slots"),
    (dict(state_indices=torch.tensor([[0, 1, 2], [4, 5, 6]])), r"'state_indices' expected slots in \[0, 6\)"),
    (dict(state_indices=torch.zeros(2, 2, 1, dtype=torch.long)), r"'state_indices' expected an integer tensor"),
    (dict(out=torch.zeros(2, 2, H, V + 1)), r"'out' expected a torch.float32 tensor of shape"),
    (dict(out=torch.zeros(2, 2, H, V, dtype=torch.float64)), r"'out' expected a torch.float32 tensor"),
    (dict(lower_bound=-1.0), r"'lower_bound' expected None without use_gate_in_kernel"),
    (dict(lower_bound=0.5, use_gate_in_kernel=True), r"'lower_bound' expected a finite negative number"),
    (dict(use_gate_in_kernel=True), r"'A_log' expected a tensor \[2\] when use_gate_in_kernel=True \(without"),
])
def test_bad_serving_arguments_leave_the_pool_unchanged(kw, pattern):
    args = [a.cpu() for a in seqs(2, 2, torch.float32, seed=7)]
    pool = torch.randn(6, H, K, V)
    before = pool.clone()
    kw = dict(kw)
    if "state_indices" in kw:
        kw["initial_state"] = pool
    with pytest.raises(ValueError, match=pattern):
        recurrent_gdn2(*args, **kw)
    assert torch.equal(pool, before)


def test_v_first_pool_in_the_wrong_layout_is_named():
    q, k, v, g, b, w = (a.cpu() for a in seqs(2, 2, torch.float32, seed=8))
    v, w = v[..., :4], w[..., :4]
    with pytest.raises(ValueError, match=r"'initial_state' expected shape \[P \(pool size\), HV=2, V=4, K=8\]"):
        recurrent_gdn2(q, k, v, g, b, w, initial_state=torch.zeros(6, H, K, 4), state_indices=torch.tensor([0, 1]),
                       state_v_first=True)
