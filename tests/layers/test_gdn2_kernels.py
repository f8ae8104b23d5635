"""GatedDeltaNet2 on its Triton kernels (``backend="triton"``: the fused projection, the short conv, the op with its
in-kernel activations, the gated norm) against the layer in fp64 on PyTorch: outputs, final states and the
gradients of the input, the initial state and every parameter (``A_log`` and ``dt_bias`` included), for dense,
packed and masked batches. Under the Triton interpreter on CPU tensors in CI (fp32, tiny shapes), on the GPU at
the paper's width (bf16, marked ``gpu``)."""

from __future__ import annotations

import pytest
import torch

from gdn2ts.layers import GatedDeltaNet2, GDN2Config, GDN2State

from tolerances import assert_close

# without a GPU the kernels run under the Triton interpreter on CPU tensors (tests/conftest.py sets it)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def layers(name, dtype, device, seed=0, **overrides):
    """The same weights twice: ``(fast, reference)``, the fast one on the kernels in ``dtype``, the reference on
    PyTorch in fp64 (on the CPU)."""
    kw = dict(hidden_size=32, num_heads=2, head_k_dim=16, head_v_dim=16, gate_low_rank=8)
    cfg = GDN2Config.variant(name, **{**kw, **overrides})
    torch.manual_seed(seed)
    ref = GatedDeltaNet2(cfg, backend="torch").double()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(4.0)  # gates that vary from token to token
        ref.o_norm.weight.add_(0.3 * torch.randn_like(ref.o_norm.weight))
        if cfg.gate_proj == "low_rank":
            ref.g_proj[1].bias.add_(0.3 * torch.randn_like(ref.g_proj[1].bias))
    fast = GatedDeltaNet2(cfg, backend="triton").to(device, dtype)
    fast.load_state_dict({n: t.to(dtype) for n, t in ref.state_dict().items()})
    # the reference starts from the fast layer's (rounded) weights
    ref.load_state_dict({n: t.double().cpu() for n, t in fast.state_dict().items()})
    return fast, ref


def run(layer, x, state, dy, **kw):
    """Output, final state and the gradients of x, the initial state and every parameter for ``<y, dy>`` plus a
    weight on the final states."""
    p = layer.q_proj.weight
    x = x.detach().to(p.device, p.dtype).requires_grad_()
    sdt = torch.float64 if p.dtype == torch.float64 else torch.float32
    st = GDN2State(state.recurrent.detach().to(p.device, sdt).requires_grad_(),
                   state.conv.detach().to(p.device, p.dtype).requires_grad_())
    kw = {n: (t.to(p.device) if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    y, s = layer(x, st, **kw)
    loss = (y.double() * dy.to(p.device)).sum() + s.recurrent.double().sum() + s.conv.double().square().sum()
    loss.backward()
    grads = {"x": x.grad, "state.recurrent": st.recurrent.grad, "state.conv": st.conv.grad}
    grads |= {n: q.grad for n, q in layer.named_parameters()}
    return y, s, grads


def check(fast, ref, B, T, dtype, seed=1, **kw):
    gen = torch.Generator().manual_seed(seed)
    cfg = ref.config
    N = B if "cu_seqlens" not in kw else kw["cu_seqlens"].numel() - 1
    x = torch.randn(B, T, cfg.hidden_size, generator=gen, dtype=torch.float64)
    state = GDN2State(torch.randn(N, cfg.num_v_heads, cfg.head_k_dim, cfg.head_v_dim, generator=gen,
                                  dtype=torch.float64),
                      torch.randn(N, cfg.conv_channels, cfg.conv_size - 1, generator=gen, dtype=torch.float64))
    dy = torch.randn(B, T, cfg.hidden_size, generator=gen, dtype=torch.float64)
    y, s, got = run(fast, x.to(dtype), state, dy, **kw)
    y_ref, s_ref, want = run(ref, x.to(dtype).double(), state, dy, **kw)
    assert_close("y", y.cpu(), y_ref.cpu(), dtype)
    assert_close("final recurrent", s.recurrent.cpu(), s_ref.recurrent.cpu(), dtype)
    assert_close("final conv", s.conv.cpu(), s_ref.conv.cpu(), dtype)
    for n, e in want.items():
        gate_param = n.split(".")[0] in ("A_log", "dt_bias", "b_proj", "w_proj", "f_proj", "a_proj")
        assert_close(f"d{n}", got[n].cpu(), e.cpu(), dtype, 2.0 if gate_param else 1.0)


@pytest.mark.parametrize("name, overrides", [
    ("gdn2", {}), ("gdn2", {"num_v_heads": 4, "erase_max": 2.0, "output_gate": "sigmoid"}), ("kda", {}),
    ("gdn", {}), ("mamba2", {}), ("mamba2", {"num_heads": 1, "num_v_heads": 4}), ("write_only", {}),
])
def test_dense_batch_matches_fp64(name, overrides):
    fast, ref = layers(name, torch.float32, DEVICE, **overrides)
    check(fast, ref, 2, 70, torch.float32)


def test_packed_and_masked_batches_match_fp64():
    """Packed sequences (one shorter than the conv's tail, one empty) and a mask with holes, each against the fp64
    layer on the same call."""
    fast, ref = layers("gdn2", torch.float32, DEVICE, seed=2)
    check(fast, ref, 1, 75, torch.float32, cu_seqlens=torch.tensor([0, 2, 2, 66, 75]))
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[0, 3:7] = False
    mask[1, :2] = False
    check(fast, ref, 2, 40, torch.float32, attention_mask=mask)


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True])
def test_gpu_paper_width_bf16(packed):
    """bf16 at the paper's width (hidden 2304, 16 heads of 128), every gradient, against the fp64 layer."""
    fast, ref = layers("gdn2", torch.bfloat16, "cuda", hidden_size=2304, num_heads=16, head_k_dim=128,
                       head_v_dim=128, gate_low_rank=128)
    with torch.no_grad():
        # weights scaled by 4 at this width saturate every gate: back to the layer's own scale
        for fl, rl in zip(fast.modules(), ref.modules(), strict=True):
            if isinstance(fl, torch.nn.Linear):
                fl.weight.mul_(0.25)
                rl.weight.copy_(fl.weight.double().cpu())
    ref = ref.cuda()
    if packed:
        check(fast, ref, 1, 1500, torch.bfloat16, cu_seqlens=torch.tensor([0, 700, 737, 1500]))
    else:
        check(fast, ref, 2, 600, torch.bfloat16)
