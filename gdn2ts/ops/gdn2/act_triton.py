"""The op's in-kernel activations on the Triton path, as torch.library custom ops (``gdn2ts::act_fwd`` with its
autograd, ``gdn2ts::act_bwd``): one launch turns the raw q, k, g, b, w into what the chunked kernels read, and one
launch turns the activations' gradients into those of the raw inputs, ``A_log`` and ``dt_bias``
(``gdn2ts.kernels.act``). torch.compile keeps them whole in its graph, as it does the chunked op."""

from __future__ import annotations

import torch

__all__ = ["triton_activate"]

_F32 = torch.float32


def _none_to_empty(ts, like):
    return [like.new_empty(0) if t is None else t for t in ts]


def _fwd_impl(q, k, g, b, w, A_log, dt_bias, l2, gate, bw, erase_max):
    from gdn2ts.kernels.act import act_fwd

    return _none_to_empty(act_fwd(q, k, g, b, w, A_log, dt_bias, l2, gate, bw, erase_max), q)


def _fwd_fake(q, k, g, b, w, A_log, dt_bias, l2, gate, bw, erase_max):
    B, T, H, K = q.shape

    def new(on, shape, dtype):
        return q.new_empty(shape if on else (0,), dtype=dtype)

    return [new(l2, q.shape, q.dtype), new(l2, k.shape, k.dtype), new(l2, (B, T, H), _F32),
            new(l2, (B, T, H), _F32), new(gate, g.shape, _F32), new(bw, b.shape, b.dtype), new(bw, w.shape, w.dtype)]


def _bwd_impl(qn, kn, rq, rk, dqn, dkn, g, dga, A_log, dt_bias, b, dba, w, dwa, l2, gate, bw, erase_max):
    from gdn2ts.kernels.act import act_bwd

    on = (l2,) * 6 + (gate,) * 4 + (bw,) * 4
    args = [t if flag else None for t, flag in
            zip((qn, kn, rq, rk, dqn, dkn, g, dga, A_log, dt_bias, b, dba, w, dwa), on, strict=True)]
    if gate and dt_bias.numel() == 0:
        args[9] = None
    with torch.autocast(qn.device.type, enabled=False):
        return _none_to_empty(act_bwd(*args, erase_max), qn)


def _bwd_fake(qn, kn, rq, rk, dqn, dkn, g, dga, A_log, dt_bias, b, dba, w, dwa, l2, gate, bw, erase_max):
    def like(on, t):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if on else qn.new_empty(0)

    return [like(l2, qn), like(l2, kn), like(gate, g), like(gate, A_log), like(gate and dt_bias.numel() > 0, dt_bias),
            like(bw, b), like(bw, w)]


_fwd = torch.library.custom_op(
    "gdn2ts::act_fwd", _fwd_impl, mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor g, Tensor b, Tensor w, Tensor? A_log, Tensor? dt_bias, bool l2, bool gate, "
           "bool bw, float erase_max) -> Tensor[]")
_fwd.register_fake(_fwd_fake)
_bwd = torch.library.custom_op(
    "gdn2ts::act_bwd", _bwd_impl, mutates_args=(),
    schema="(Tensor qn, Tensor kn, Tensor rq, Tensor rk, Tensor dqn, Tensor dkn, Tensor g, Tensor dga, Tensor A_log, "
           "Tensor dt_bias, Tensor b, Tensor dba, Tensor w, Tensor dwa, bool l2, bool gate, bool bw, "
           "float erase_max) -> Tensor[]")
_bwd.register_fake(_bwd_fake)


def _setup_context(ctx, inputs, output):
    q, k, g, b, w, A_log, dt_bias, l2, gate, bw, erase_max = inputs
    qn, kn, rq, rk = output[:4]
    empty = q.new_empty(0)
    # what the backward reads: the normalized q, k and their rstd (no raw q, k), the raw gate input and logits
    ctx.save_for_backward(qn, kn, rq, rk, g if gate else empty, A_log if gate else empty,
                          dt_bias if gate and dt_bias is not None else empty, b if bw else empty, w if bw else empty)
    ctx.mark_non_differentiable(rq, rk)
    ctx.set_materialize_grads(False)
    ctx.flags = (l2, gate, bw, erase_max)
    ctx.has_dt = dt_bias is not None


def _backward(ctx, grads):
    qn, kn, rq, rk, g, A_log, dt_bias, b, w = ctx.saved_tensors
    l2, gate, bw, erase_max = ctx.flags
    dqn, dkn, _, _, dga, dba, dwa = grads

    def grad(d, like, on):
        return (torch.zeros_like(like) if d is None else d) if on else like.new_empty(0)

    dqn, dkn = grad(dqn, qn, l2), grad(dkn, kn, l2)
    dga = grad(dga, g, gate)
    dba, dwa = grad(dba, b, bw), grad(dwa, w, bw)
    dq, dk, dg, dA, ddt, db, dw = _bwd(qn, kn, rq, rk, dqn, dkn, g, dga, A_log, dt_bias, b, dba, w, dwa, l2, gate, bw,
                                       erase_max)

    def out(t, on):
        return t if on else None

    return (out(dq, l2), out(dk, l2), out(dg, gate), out(db, bw), out(dw, bw), out(dA, gate),
            out(ddt, gate and ctx.has_dt), None, None, None, None)


_fwd.register_autograd(_backward, setup_context=_setup_context)


def triton_activate(q, k, g, b, w, A_log, dt_bias, l2: bool, gate: bool, bw: bool, erase_max: float):
    """``(q, k, g, b, w)`` with the asked activations applied by the Triton pre-pass (differentiable in every raw
    input, ``A_log`` and ``dt_bias``); inputs an option does not touch come back as they were. ``g`` comes in
    fp32 with ``gate``; the others keep their dtypes."""
    if not (l2 or gate or bw):
        return q, k, g, b, w
    qn, kn, _, _, ga, ba, wa = _fwd(q, k, g, b, w, A_log if gate else None, dt_bias if gate else None, l2, gate, bw,
                                    float(erase_max))
    return (qn if l2 else q, kn if l2 else k, ga if gate else g, ba if bw else b, wa if bw else w)
