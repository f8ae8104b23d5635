"""The Triton chunked path as torch.library custom ops: schema, fake (meta) outputs, autograd registration and
AOT tracing checked by ``torch.library.opcheck``; a fully compiled graph (no graph break) gives the eager
gradients; incoming gradients that are strided views are read correctly. Under the interpreter on CPU tensors in
CI, on CUDA where present."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gdn2ts.ops import chunk_gdn2, chunk_reference
from gdn2ts.ops.gdn2 import chunk_triton as ct

from kernel_cases import DEVICE
from tolerances import assert_close


def inputs(B=1, T=70, H=2, K=16, V=16, seed=0, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=gen)

    q, k = F.normalize(r(B, T, H, K), dim=-1), F.normalize(r(B, T, H, K), dim=-1)
    v, g = r(B, T, H, V), F.logsigmoid(r(B, T, H, K) + 2)
    b, w = torch.sigmoid(r(B, T, H, K)), torch.sigmoid(r(B, T, H, V))
    h0 = r(B, H, K, V)
    return [t.to(DEVICE).requires_grad_(requires_grad) for t in (q, k, v, g, b, w, h0)]


@pytest.mark.parametrize("final", [True, False])
def test_opcheck_training_op(final):
    args = inputs()
    scale = args[0].shape[-1] ** -0.5
    torch.library.opcheck(ct._fwd_train, (*args, scale, final, None, None))


def test_opcheck_packed_and_inference_ops():
    # the backward's buffers start as NaN (conftest): any element of any output (padding rows included) that no
    # kernel writes shows up as a mismatch instead of as stale memory that happens to agree
    q, k, v, g, b, w, _ = inputs(T=70)
    cu = torch.tensor([0, 5, 5, 70], device=DEVICE)
    dest, lo, hi, padded = ct.chunk_layout(cu, 70)

    def pad(x):
        return x.detach().new_zeros(1, padded, *x.shape[2:]).index_copy(1, dest, x.detach())

    packed = [pad(x).requires_grad_() for x in (q, k, v, g, b, w)]
    h0 = torch.randn(3, 2, 16, 16, device=DEVICE, requires_grad=True)
    torch.library.opcheck(ct._fwd_train, (*packed, h0, 0.25, True, lo, hi))
    torch.library.opcheck(ct._fwd_infer, (*[x.detach() for x in packed], None, 0.25, True, lo, hi),
                          test_utils=("test_schema", "test_faketensor"))


def test_compiled_graph_matches_eager_without_graph_breaks():
    torch._dynamo.reset()
    base = inputs()

    def loss(q, k, v, g, b, w, h0):
        o, ht = chunk_gdn2(q, k, v, g, b, w, initial_state=h0, output_final_state=True, backend="triton")
        return (o * o).sum() + (ht * ht).sum()

    def grads(fn):
        args = [t.detach().clone().requires_grad_() for t in base]
        value = fn(*args)
        value.backward()
        return value.detach(), [a.grad for a in args]

    v_eager, g_eager = grads(loss)
    # fullgraph=True fails on any graph break: the op must trace as one node
    v_comp, g_comp = grads(torch.compile(loss, backend="aot_eager", fullgraph=True))
    assert torch.equal(v_eager, v_comp)
    for name, a, c in zip(("dq", "dk", "dv", "dg", "db", "dw", "dh0"), g_eager, g_comp, strict=True):
        assert torch.equal(a, c), name


def test_strided_final_state_gradient():
    """A loss that reads the final state through a transpose hands the backward a strided gradient."""
    args = inputs(T=67)
    weight = torch.randn(1, 2, 16, 16, device=DEVICE)

    def run(fn, **kw):
        xs = [t.detach().clone().requires_grad_() for t in args]
        o, ht = fn(*xs[:6], initial_state=xs[6], output_final_state=True, **kw)
        ((o * o).sum() + (ht.transpose(-1, -2) * weight).sum()).backward()
        return [x.grad for x in xs]

    def reference(q, k, v, g, b, w, initial_state, output_final_state):
        return chunk_reference(q.double(), k.double(), v.double(), g.double(), b.double(), w.double(),
                               q.shape[-1] ** -0.5, initial_state.double(), output_final_state)

    got = run(chunk_gdn2, backend="triton")
    want = run(reference)
    for name, a, c in zip(("dq", "dk", "dv", "dg", "db", "dw", "dh0"), got, want, strict=True):
        assert_close(name, a, c, torch.float32, factor=2.0 if name in ("dg", "db", "dw") else 1.0)


def test_saved_table_describes_what_the_training_forward_keeps():
    """The fake function's one table of kept tensors: its names in the order the op returns them, and the real
    tensors' shapes and dtypes, for fp32 and fp16 inputs."""
    for dtype in (torch.float32, torch.float16):
        q, k, v, g, b, w, h0 = inputs(T=70)
        args = [t.detach().to(dtype) for t in (q, k, v, g, b, w)]
        out = ct._fwd_train(*args, h0.detach(), 0.25, True, None, None)
        table = ct._saved_table(args[0], args[2], args[3])
        assert tuple(table) == ct._SAVED
        for name, t, (shape, dt) in zip(ct._SAVED, out[2:], table.values(), strict=True):
            assert (tuple(t.shape), t.dtype) == (shape, dt), name
