"""The Triton short conv (forward and backward) against the PyTorch path in fp64: under the interpreter on tiny
shapes (CPU, in CI) and on the GPU at the GDN-2 layer's shape (marked ``gpu``). Every output buffer the kernels
write is poisoned with NaN first, so an unwritten element fails."""

from __future__ import annotations

import pytest
import torch

from gdn2ts.kernels.conv import conv_bwd, conv_fwd
from gdn2ts.layers import ShortConv, causal_conv1d
from gdn2ts.ops.conv import causal as conv_module

from kernel_cases import DEVICE
from tolerances import assert_close, errors


def poisoned(*shape, dtype=torch.float32, device=DEVICE):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def inputs(N, L, C, W, dtype=torch.float32, seed=0, device=DEVICE):
    """``x, weight [C, 1, W], tail, dy, dnew_tail`` drawn in fp64 on the CPU, then cast and moved."""
    gen = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    x, weight, tail = r(N, L, C), r(C, 1, W) / W ** 0.5, r(N, C, W - 1)
    dy, dnt = r(N, L, C), r(N, C, W - 1)
    return [t.to(dtype).to(device) for t in (x, weight, tail, dy, dnt)]


def truth(x, weight, tail, dy, dnt, silu=True):
    """``(y, new_tail, dx, dweight, dtail)`` of the PyTorch path in fp64 for the loss ``<y, dy> + <new_tail, dnt>``
    (``tail`` None: zeros, and no dtail)."""
    x, weight, dy, dnt = (t.detach().double().requires_grad_() for t in (x, weight, dy, dnt))
    tail = None if tail is None else tail.detach().double().requires_grad_()
    y, new_tail = causal_conv1d(x, weight, tail, activation="silu" if silu else None, backend="torch")
    ((y * dy).sum() + (new_tail * dnt).sum()).backward()
    return y, new_tail, x.grad, weight.grad, None if tail is None else tail.grad


def run_kernels(x, weight, tail, dy, dnt, silu=True, **tiling):
    """Both launches on NaN-poisoned buffers; returns ``(y, new_tail, dx, dweight [C, 1, W], dtail)``."""
    N, L, C = x.shape
    W = weight.shape[-1]
    w2 = weight.reshape(C, W)
    fwd_tiling = {k: v for k, v in tiling.items() if k != "span_blocks"}
    y, new_tail = conv_fwd(x, w2, tail, silu, out=poisoned(N, L, C, dtype=x.dtype, device=x.device),
                           out_tail=poisoned(N, C, W - 1, dtype=x.dtype, device=x.device), **fwd_tiling)
    dx, dw, dtail = conv_bwd(x, w2, tail, dy, dnt, silu, need_dx=True, need_dtail=tail is not None,
                             out_dx=poisoned(N, L, C, dtype=x.dtype, device=x.device),
                             out_dtail=None if tail is None else poisoned(N, C, W - 1, dtype=tail.dtype,
                                                                          device=x.device), **tiling)
    return y, new_tail, dx, dw.reshape(C, 1, W), dtail


def compare(got, want, dtype, factors=(1, 1, 1, 1, 1)):
    for name, a, e, f in zip(("y", "new_tail", "dx", "dweight", "dtail"), got, want, factors, strict=True):
        if e is None:
            assert a is None, f"{name}: expected no gradient"
        else:
            assert_close(name, a, e, dtype, f)


@pytest.mark.parametrize("W", [1, 2, 4])
@pytest.mark.parametrize("L", [1, 2, 3, 5, 17, 67])
def test_kernels_match_fp64(W, L):
    """fp32, C = 20 (a partial 32-channel block), with a tail and without (zeros)."""
    x, weight, tail, dy, dnt = inputs(2, L, 20, W, seed=10 * W + L)
    for t in (tail, None):
        compare(run_kernels(x, weight, t, dy, dnt), truth(x, weight, t, dy, dnt), torch.float32)


@pytest.mark.parametrize("W,L,N,block_t", [(4, 67, 2, 16), (3, 2, 2, 16), (8, 35, 1, None)])
def test_tiling_many_blocks(W, L, N, block_t):
    """Several channel blocks (the last partial), several time blocks and several backward spans, so halos cross
    block edges and the dweight partials of many programs are added; W = 8, the widest, with its default 8-step
    backward blocks."""
    x, weight, tail, dy, dnt = inputs(N, L, 21, W, seed=W)
    got = run_kernels(x, weight, tail, dy, dnt, block_t=block_t, block_c=16, span_blocks=2)
    compare(got, truth(x, weight, tail, dy, dnt), torch.float32)


def test_without_activation():
    x, weight, tail, dy, dnt = inputs(2, 19, 20, 4, seed=3)
    compare(run_kernels(x, weight, tail, dy, dnt, silu=False), truth(x, weight, tail, dy, dnt, silu=False),
            torch.float32)


@pytest.mark.parametrize("W", [2, 4])
def test_bf16(W):
    """bf16 inputs and tail (fp32 weight, as a bf16 model under autocast keeps it), fp32 accumulation."""
    x, weight, tail, dy, dnt = inputs(2, 33, 20, W, dtype=torch.bfloat16, seed=W)
    weight = weight.float()
    compare(run_kernels(x, weight, tail, dy, dnt), truth(x, weight, tail, dy, dnt), torch.bfloat16)


def autograd_run(x, weight, tail, dy, dnt, loss_on=("y", "tail"), **kw):
    x, weight, tail = (t.detach().clone().requires_grad_() for t in (x, weight, tail))
    y, new_tail = causal_conv1d(x, weight, tail, **kw)
    loss = 0
    if "y" in loss_on:
        loss = loss + (y * dy).sum()
    if "tail" in loss_on:
        loss = loss + (new_tail * dnt).sum()
    loss.backward()
    return y, new_tail, x.grad, weight.grad, tail.grad


@pytest.mark.parametrize("loss_on", [("y", "tail"), ("y",), ("tail",)])
def test_autograd_function_matches_torch_path(loss_on):
    """causal_conv1d(backend="triton") against backend="torch", both in fp64 / fp32, every input's gradient, with
    the loss on y, on the new tail only (no dy: the new tail's gradient alone reaches x and the old tail), or both."""
    x, weight, tail, dy, dnt = inputs(2, 6, 20, 4, seed=5)
    got = autograd_run(x, weight, tail, dy, dnt, loss_on, activation="silu", backend="triton")
    want = autograd_run(*(t.double() for t in (x, weight, tail, dy, dnt)), loss_on, activation="silu",
                        backend="torch")
    compare(got, want, torch.float32)


def test_short_conv_module_and_streaming():
    """ShortConv on the kernels returns what it returns on PyTorch; two passes carrying the tail equal one; step
    (the streaming path) agrees; only weight needing a gradient still gives it."""
    torch.manual_seed(0)
    conv = ShortConv(channels=12, width=4).to(DEVICE)
    x = torch.randn(3, 9, 12, device=DEVICE)
    y, tail = conv(x, backend="triton")
    y_ref, tail_ref = conv(x, backend="torch")
    assert_close("y", y, y_ref.double(), torch.float32)
    assert torch.equal(tail, tail_ref)
    y1, t1 = conv(x[:, :4], backend="triton")
    y2, t2 = conv(x[:, 4:], t1, backend="triton")
    assert_close("two passes", torch.cat([y1, y2], 1), y_ref.double(), torch.float32)
    assert torch.equal(t2, tail_ref)
    with torch.no_grad():
        y_t, _ = conv.step(x[:, 4], t1)
    assert_close("step", y_t, y_ref[:, 4].double(), torch.float32)
    y.sum().backward()
    grad = conv.weight.grad.clone()
    conv.weight.grad = None
    y_ref.sum().backward()
    assert_close("dweight", grad, conv.weight.grad.double(), torch.float32)


def test_dispatch_and_errors(monkeypatch):
    """auto takes PyTorch on the CPU and for fp64; the kernels' limits and bad shapes are ValueErrors naming the
    argument."""
    x, weight, tail, _, _ = inputs(2, 5, 6, 4, device="cpu")
    # CPU tensors reach the kernels' own checks only under the interpreter (also on a machine with a GPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def no_kernel(*args):
        raise AssertionError("the Triton path ran")

    monkeypatch.setattr(conv_module, "_triton_conv", no_kernel)
    causal_conv1d(x, weight, tail)  # auto on CPU tensors
    causal_conv1d(x, weight, tail, lengths=torch.tensor([5, 3]), backend="auto")
    cases = [
        (dict(x=x.double(), backend="triton"), "fp64"),
        (dict(weight=torch.randn(6, 1, 9), tail=torch.randn(2, 6, 8), backend="triton"), "width up to 8"),
        (dict(backend="cuda"), "'backend'"),
        (dict(activation="gelu"), "'activation'"),
        (dict(x=x[0]), "'x'"),
        (dict(weight=torch.randn(6, 4)), "'weight'"),
        (dict(tail=torch.randn(2, 6, 2)), "'tail'"),
        (dict(lengths=torch.tensor([5])), "'lengths'"),
        (dict(cu_seqlens=torch.tensor([0, 2, 5])), "batch size 1"),
        (dict(x=x[:1], cu_seqlens=torch.tensor([0, 2, 5]), lengths=torch.tensor([2, 3])), "'lengths'"),
        (dict(x=x[:1], cu_seqlens=torch.tensor([0.0, 5.0])), "'cu_seqlens'"),
    ]
    for kw, needle in cases:
        args = dict(x=x, weight=weight, tail=tail) | kw
        with pytest.raises(ValueError, match=needle):
            causal_conv1d(args.pop("x"), args.pop("weight"), args.pop("tail"), **args)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="only for CUDA tensors"):
        causal_conv1d(x, weight, tail, backend="triton")


def ragged_truth(x, weight, tail, dy, dnt, lengths=None, cu=None):
    """What the PyTorch path gives for ragged rows (``lengths``) or packed sequences (``cu``), in fp64."""
    x, weight, dy, dnt = (t.detach().double().requires_grad_() for t in (x, weight, dy, dnt))
    tail = None if tail is None else tail.detach().double().requires_grad_()
    y, new_tail = causal_conv1d(x, weight, tail, lengths, activation="silu", backend="torch", cu_seqlens=cu)
    ((y * dy).sum() + (new_tail * dnt).sum()).backward()
    return y, new_tail, x.grad, weight.grad, None if tail is None else tail.grad


def ragged_kernels(x, weight, tail, dy, dnt, lengths=None, cu=None, **tiling):
    N = tail.shape[0] if tail is not None else (len(cu) - 1 if cu is not None else x.shape[0])
    C, W = weight.shape[0], weight.shape[-1]
    w2 = weight.reshape(C, W)
    fwd_tiling = {k: v for k, v in tiling.items() if k != "span_blocks"}
    y, new_tail = conv_fwd(x, w2, tail, True, out=poisoned(*x.shape, dtype=x.dtype, device=x.device),
                           out_tail=poisoned(N, C, W - 1, dtype=x.dtype, device=x.device), lengths=lengths,
                           cu_seqlens=cu, **fwd_tiling)
    dx, dw, dtail = conv_bwd(x, w2, tail, dy, dnt, True, need_dx=True, need_dtail=tail is not None,
                             out_dx=poisoned(*x.shape, dtype=x.dtype, device=x.device),
                             out_dtail=None if tail is None else poisoned(N, C, W - 1, dtype=tail.dtype,
                                                                          device=x.device),
                             lengths=lengths, cu_seqlens=cu, **tiling)
    return y, new_tail, dx, dw.reshape(C, 1, W), dtail


@pytest.mark.parametrize("W", [1, 2, 4])
@pytest.mark.parametrize("with_tail", [True, False])
def test_packed_sequences_match_fp64(W, with_tail):
    """Packed sequences of lengths 0, 1, 2 (shorter than the tail), 17 and 40: each conv starts from its own tail
    and its new tail reaches into the old one when short; several row blocks and spans, the blocks crossing
    sequence borders; the input rows read in place from a wider, strided tensor."""
    lengths = [17, 0, 1, 2, 40]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE)
    total, N, C = int(cu[-1]), len(lengths), 20
    wide, weight, tail, dy, dnt = inputs(1, total, C + 7, W, seed=W)
    x = wide[..., 3:3 + C]  # a strided view (row stride C + 7)
    weight, dy = weight[:C], dy[..., :C].contiguous()
    tail = inputs(N, 1, C, W, seed=W + 1)[2] if with_tail else None
    dnt = inputs(N, 1, C, W, seed=W + 2)[4]
    got = ragged_kernels(x, weight, tail, dy, dnt, cu=cu, block_t=16, block_c=16, span_blocks=2)
    compare(got, ragged_truth(x, weight, tail, dy, dnt, cu=cu), torch.float32)


@pytest.mark.parametrize("W", [2, 4])
def test_rows_of_different_lengths_match_fp64(W):
    """Padded rows with lengths 0, 2 and 19 of 19: the new tail taken after each row's own length, the rows past it
    computed as the PyTorch path computes them."""
    x, weight, tail, dy, dnt = inputs(3, 19, 20, W, seed=7 + W)
    lengths = torch.tensor([0, 2, 19], device=DEVICE)
    got = ragged_kernels(x, weight, tail, dy, dnt, lengths=lengths, block_t=16, block_c=16, span_blocks=1)
    compare(got, ragged_truth(x, weight, tail, dy, dnt, lengths=lengths), torch.float32)


def test_packed_autograd_fp16():
    """causal_conv1d(cu_seqlens=..., backend="triton") through the autograd Function, fp16, against fp64."""
    cu = torch.tensor([0, 5, 6, 30], device=DEVICE)
    x, weight, _, dy, _ = inputs(1, 30, 24, 4, dtype=torch.float16, seed=2)
    tail, dnt = (t.to(torch.float16) for t in inputs(3, 1, 24, 4, seed=3)[2::2])
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, tail)]
    y, new_tail = causal_conv1d(*leaves, activation="silu", backend="triton", cu_seqlens=cu)
    ((y.float() * dy.float()).sum() + (new_tail.float() * dnt.float()).sum()).backward()
    want = ragged_truth(x, weight, tail, dy, dnt, cu=cu)
    compare((y, new_tail, leaves[0].grad, leaves[1].grad, leaves[2].grad), want, torch.float16)


@pytest.mark.gpu
def test_gpu_packed_layer_shape_bf16():
    """Packed documents at the layer's width (C = 6144, W = 4, bf16): 16K tokens in 8 ragged sequences."""
    lengths = [1000, 3000, 37, 5000, 2047, 4000, 1300, 1000]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")
    x, weight, _, dy, _ = inputs(1, int(cu[-1]), 6144, 4, dtype=torch.bfloat16, seed=4, device="cuda")
    tail, dnt = (t.to(torch.bfloat16) for t in inputs(8, 1, 6144, 4, seed=5, device="cuda")[2::2])
    weight = weight.float()
    got = ragged_kernels(x, weight, tail, dy, dnt, cu=cu)
    want = ragged_truth(x, weight, tail, dy, dnt, cu=cu)
    compare(got, want, torch.bfloat16, factors=(1, 1, 1, 2, 1))


@pytest.mark.gpu
def test_gpu_layer_shape_bf16():
    """The GDN-2 layer's conv at the paper's width: N = 8, L = 2048, C = 2 * 16 * 128 + 16 * 128 = 6144, W = 4,
    bf16, through the autograd Function, against fp64 (relative RMS: y 5e-3, dx and dweight 1e-2)."""
    N, L, C, W = 8, 2048, 6144, 4
    x, weight, tail, dy, dnt = inputs(N, L, C, W, dtype=torch.bfloat16, seed=1)
    weight = weight.float()
    y, new_tail, dx, dw, dtail = autograd_run(x, weight, tail, dy, dnt, activation="silu", backend="auto")
    want = truth(x, weight, tail, dy, dnt)
    bounds = (5e-3, 0.0, 1e-2, 1e-2, 1e-2)
    for name, a, e, bound in zip(("y", "new_tail", "dx", "dweight", "dtail"), (y, new_tail, dx, dw, dtail), want,
                                 bounds, strict=True):
        rms, _ = errors(a, e)
        assert torch.isfinite(a).all() and rms <= bound, f"{name}: relative RMS error {rms:.3e} (bound {bound})"


@pytest.mark.gpu
def test_gpu_offsets_past_int32():
    """N * L * C = 2.2e9 elements (> 2**31): the end of the last sequence, forward and backward, against fp64 on
    that segment (its first W - 1 rows as the tail); the gradient is zero wherever dy does not reach."""
    N, L, C, W, K = 2, 2**17, 8320, 4, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, L, C, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    weight = (torch.randn(C, 1, W, device="cuda", generator=gen) / 2).requires_grad_()
    dy = torch.zeros_like(x)
    dy[-1, -K:] = torch.randn(K, C, device="cuda", generator=gen).to(torch.bfloat16)
    y, new_tail = causal_conv1d(x, weight, activation="silu")
    y.backward(dy)
    seg = x.detach()[-1:, L - K - (W - 1):].double()
    xs, ws = seg[:, W - 1:].clone().requires_grad_(), weight.detach().double().requires_grad_()
    ys, tail_s = causal_conv1d(xs, ws, seg[:, :W - 1].transpose(1, 2), activation="silu", backend="torch")
    ys.backward(dy[-1:, -K:].double())
    assert_close("y", y[-1:, -K:], ys, torch.bfloat16)
    assert torch.equal(new_tail[-1:].double(), tail_s)
    assert_close("dx", x.grad[-1:, -K:], xs.grad, torch.bfloat16)
    assert_close("dweight", weight.grad, ws.grad, torch.bfloat16)
    assert x.grad[0].abs().max().item() == 0 and x.grad[-1, : L - K - (W - 1)].abs().max().item() == 0


@pytest.mark.gpu
def test_gpu_layer_uses_kernels(monkeypatch):
    """GatedDeltaNet2 on CUDA (fp32) gives the same outputs, final conv state and gradients with the kernels as
    with the PyTorch conv (forced by declaring every call unsupported)."""
    from gdn2ts.layers import GatedDeltaNet2, GDN2Config

    torch.manual_seed(0)
    layer = GatedDeltaNet2(GDN2Config.variant("gdn2", hidden_size=128, num_heads=2, head_k_dim=32,
                                              head_v_dim=32)).cuda()
    x = torch.randn(3, 77, 128, device="cuda")

    def run():
        layer.zero_grad()
        y, state = layer(x)
        y.square().sum().backward()
        return y.detach(), state.conv, layer.conv.weight.grad.clone()

    got = run()
    monkeypatch.setattr(conv_module, "_kernel_unsupported", lambda *args: "forced")
    want = run()
    for name, a, e in zip(("y", "conv state", "conv weight grad"), got, want, strict=True):
        assert_close(name, a, e.double(), torch.float32)
