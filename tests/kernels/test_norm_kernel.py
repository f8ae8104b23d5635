"""The gated RMSNorm kernels (``gdn2ts.kernels.norm``) against the PyTorch form in fp64, forward and the gradients of
``x``, ``gate`` and ``weight``: under the interpreter on tiny shapes (CPU, fp32/fp16) and on the GPU at the layer's
shape (bf16, marked ``gpu``). Every buffer the launches allocate starts as NaN (conftest)."""

from __future__ import annotations

import pytest
import torch

from gdn2ts.layers.norm import GatedRMSNorm, gated_rms_norm

from kernel_cases import DEVICE
from tolerances import assert_close


def case(shape, dtype, seed, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    x, gate, dy = (torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(3))
    weight = 1 + 0.3 * torch.randn(shape[-1], generator=gen, dtype=torch.float64)
    return [t.to(device, dtype) for t in (x, gate, weight, dy)]


def grads(x, gate, weight, dy, activation, backend):
    leaves = [t.detach().requires_grad_() for t in (x, gate, weight)]
    y = gated_rms_norm(*leaves, 1e-5, activation, backend=backend)
    y.backward(dy)
    return y, *(t.grad for t in leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation", ["silu", "sigmoid"])
@pytest.mark.parametrize("shape", [(2, 37, 2, 16), (1, 3, 20)])
def test_kernels_match_fp64(dtype, activation, shape):
    """Rows past a 64-row block's end and channels that are not a power of two."""
    x, gate, weight, dy = case(shape, dtype, seed=len(shape) + shape[1])
    got = grads(x, gate, weight, dy, activation, "triton")
    want = grads(*(t.double() for t in (x, gate, weight, dy)), activation, "torch")
    for name, a, e in zip(("y", "dx", "dgate", "dweight"), got, want, strict=True):
        assert a.dtype == dtype, name
        assert_close(name, a, e, dtype)


def test_module_takes_the_kernels_on_request():
    norm = GatedRMSNorm(16, eps=1e-5, activation="silu").to(DEVICE)
    x, gate, _, _ = case((2, 5, 3, 16), torch.float32, seed=3)
    assert_close("y", norm(x, gate, backend="triton"), norm(x.double(), gate.double(), backend="torch").float(),
                 torch.float32)
    with pytest.raises(ValueError, match="argument 'gate' expected shape"):
        gated_rms_norm(x, gate[..., :8], norm.weight, 1e-5)


@pytest.mark.gpu
def test_gpu_layer_shape_bf16():
    """The mixer's shape: 16K tokens x 16 value heads of 128, bf16, against fp64."""
    x, gate, weight, dy = case((8, 2048, 16, 128), torch.bfloat16, seed=0, device="cuda")
    got = grads(x, gate, weight, dy, "silu", "auto")
    want = grads(*(t.double() for t in (x, gate, weight, dy)), "silu", "torch")
    for name, a, e in zip(("y", "dx", "dgate", "dweight"), got, want, strict=True):
        assert_close(name, a.float(), e, torch.bfloat16)
