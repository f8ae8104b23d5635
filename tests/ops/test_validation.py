"""Bad arguments get a ValueError naming the argument, what was expected and what was given."""

from __future__ import annotations

import pytest
import torch

from gdn2ts.ops import chunk_gdn2, recurrent_gdn2

from inputs import make_inputs

OPS = [chunk_gdn2, recurrent_gdn2]


def args(**over):
    x = make_inputs(B=2, T=5, dtype=torch.float32)
    a = {n: x[n] for n in ("q", "k", "v", "g", "b", "w")}
    a.update(over)
    return a


def call(op, a, **kw):
    with torch.no_grad():
        return op(a["q"], a["k"], a["v"], a["g"], a["b"], a["w"], **kw)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name,value,pattern", [
    ("q", torch.zeros(2, 5, 2), r"'q' expected a 4-D tensor"),
    ("k", torch.zeros(2, 5, 2, 15), r"'k' expected shape \(2, 5, 2, 16\)"),
    ("v", torch.zeros(2, 5, 3, 8), r"'v' expected shape \[B=2, T=5, HV, V\] with HV a multiple of H=2"),
    ("w", torch.zeros(2, 5, 2, 7), r"'w' expected shape \(2, 5, 2, 8\)"),
    ("g", torch.zeros(2, 4, 2, 16), r"'g' expected shape \[B=2, T=5"),
    ("b", torch.zeros(2, 5, 2, 8), r"'b' expected shape"),
    ("q", torch.zeros(2, 5, 2, 16, dtype=torch.int64), r"'q' expected a floating dtype"),
    ("k", torch.zeros(2, 5, 2, 16, dtype=torch.float64), r"'k' expected dtype torch.float32"),
    ("g", torch.zeros(2, 5, 2, 16, device="meta"), r"'g' expected a tensor on cpu"),
    ("b", [1.0], r"'b' expected a torch.Tensor, got list"),
])
def test_bad_sequence_inputs(op, name, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(op, args(**{name: value}))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("state,pattern", [
    (torch.zeros(2, 2, 16, 8, dtype=torch.bfloat16), r"'initial_state' expected dtype torch.float32"),
    (torch.zeros(2, 2, 16, 8, dtype=torch.float64), r"'initial_state' expected dtype torch.float32"),
    (torch.zeros(3, 2, 16, 8), r"'initial_state' expected shape \[N=2, HV=2, K=16, V=8\]"),
    (torch.zeros(2, 2, 8, 16), r"'initial_state' expected shape"),
])
def test_bad_initial_state(op, state, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(op, args(), initial_state=state)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("cu,pattern", [
    (torch.tensor([0, 3, 4]), r"'cu_seqlens' expected offsets from 0 to T=5, got from 0 to 4"),
    (torch.tensor([1, 3, 5]), r"'cu_seqlens' expected offsets from 0 to T=5, got from 1 to 5"),
    (torch.tensor([0, 4, 3, 5]), r"'cu_seqlens' expected non-decreasing offsets"),
    (torch.tensor([0.0, 5.0]), r"'cu_seqlens' expected dtype int32 or int64"),
    (torch.tensor([[0, 5]]), r"'cu_seqlens' expected a 1-D tensor"),
    (torch.tensor([5]), r"'cu_seqlens' expected a 1-D tensor \[N \+ 1\]"),
])
def test_bad_cu_seqlens(op, cu, pattern):
    a = {n: t[:1] for n, t in args().items()}
    with pytest.raises(ValueError, match=pattern):
        call(op, a, cu_seqlens=cu)


@pytest.mark.parametrize("op", OPS)
def test_cu_seqlens_needs_batch_one(op):
    with pytest.raises(ValueError, match=r"'q' expected batch size 1 when cu_seqlens"):
        call(op, args(), cu_seqlens=torch.tensor([0, 5]))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("kw,pattern", [
    (dict(scale=0.0), r"'scale' expected a finite positive number"),
    (dict(scale=float("nan")), r"'scale' expected a finite positive number"),
    (dict(backend="cuda"), r"'backend' expected one of"),
    (dict(use_gate_in_kernel=True), r"'A_log' expected a tensor \[2\]"),
    (dict(use_gate_in_kernel=True, A_log=torch.zeros(3)), r"'A_log' expected a tensor of shape \[2\]"),
    (dict(use_gate_in_kernel=True, A_log=torch.zeros(2), dt_bias=torch.zeros(5)), r"'dt_bias' expected"),
    (dict(use_bw_sigmoid_in_kernel=True, erase_max=3.0), r"'erase_max' expected a value in \(0, 2\]"),
])
def test_bad_options(op, kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(op, args(), **kw)


def test_pool_needs_matching_shape_and_an_initial_state():
    with pytest.raises(ValueError, match=r"'initial_state' expected a state pool"):
        call(recurrent_gdn2, args(), state_indices=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"'initial_state' expected shape \[P \(pool size\), HV=2, K=16, V=8\]"):
        call(recurrent_gdn2, args(), initial_state=torch.zeros(4, 2, 16, 9), state_indices=torch.tensor([0, 1]))
