"""The GDN-2 token mixer: project, short conv, gates, the GDN-2 op, gated RMSNorm, output projection.

Shapes: ``x`` ``[B, T, hidden]``; ``H`` key heads of ``K``, ``HV = G * H`` value heads of ``V``; the state is
``GDN2State(recurrent [N, HV, K, V] fp32 (fp64 for fp64 activations), conv [N, C, W - 1])`` with
``C = 2 * H * K + HV * V`` and ``W = conv_size``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from gdn2ts.layers.config import GDN2Config
from gdn2ts.layers.conv import ShortConv
from gdn2ts.layers.norm import GatedRMSNorm, GroupGatedRMSNorm
from gdn2ts.ops import chunk_gdn2, l2norm, recurrent_gdn2
from gdn2ts.ops.gdn2.reference import compute_dtype, state_dtype
from gdn2ts.ops.validate import check_cu_seqlens, check_values, fail

__all__ = ["GatedDeltaNet2", "GDN2Inputs", "GDN2State"]

INIT_GAIN = 2**-2.5
LAYER_BACKENDS = ("auto", "torch", "triton")
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4
A_INIT_RANGE = (1.0, 16.0)


class GDN2State(NamedTuple):
    """What a GDN-2 mixer carries between calls, for ``N`` sequences.

    Example:
        >>> import torch
        >>> s = GDN2State(torch.zeros(2, 4, 16, 16), torch.zeros(2, 96, 3))
        >>> s.recurrent.shape, s.conv.shape
        (torch.Size([2, 4, 16, 16]), torch.Size([2, 96, 3]))
    """

    recurrent: torch.Tensor
    """``[N, HV, K, V]`` the op's state, fp32 (fp64 when the layer runs in fp64)."""
    conv: torch.Tensor
    """``[N, C, W - 1]`` the last ``W - 1`` pre-conv q|k|v inputs of each sequence, in the activation dtype."""


class GDN2Inputs(NamedTuple):
    """What the GDN-2 op receives for a window, after every activation (see :meth:`GatedDeltaNet2.op_inputs`).

    In the compute dtype (fp32, fp64 for fp64 activations); a skipped (masked) token holds the identity step,
    zeros everywhere. ``recurrent_reference(*inputs)`` replays the layer's recurrence.
    """

    q: torch.Tensor
    """``[B, T, H, K]`` queries after the short conv (L2-normalized when ``qk_norm == "l2"``)."""
    k: torch.Tensor
    """``[B, T, H, K]`` keys after the short conv (L2-normalized when ``qk_norm == "l2"``)."""
    v: torch.Tensor
    """``[B, T, HV, V]`` values after the short conv."""
    g: torch.Tensor
    """``[B, T, H, K]`` log-decay (``<= 0``), already multiplied by ``decay_scale``."""
    b: torch.Tensor
    """``[B, T, H or HV, K]`` erase gate."""
    w: torch.Tensor
    """``[B, T, HV, V]`` write gate."""


def _linear(n_in: int, n_out: int, bias: bool = False) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=bias)


def _low_rank(n_in: int, rank: int, n_out: int, bias: bool = False) -> nn.Sequential:
    return nn.Sequential(_linear(n_in, rank), _linear(rank, n_out, bias=bias))


class GatedDeltaNet2(nn.Module):
    """Gated DeltaNet-2 mixer ``[B, T, hidden] -> [B, T, hidden]`` with explicit state (GDN2.md section 2).

    ``forward`` runs whole sequences through :func:`~gdn2ts.ops.chunk_gdn2` (training, prefill; dense,
    ``attention_mask`` or packed ``cu_seqlens``); ``step`` runs one token per row through
    :func:`~gdn2ts.ops.recurrent_gdn2` (inference only). Both take and return a :class:`GDN2State`.

    On CUDA the whole mixer runs on few launches: one matrix product for every projection of ``x``, the Triton
    short conv (dense, ragged and packed batches alike), the op with its activations applied in its own Triton
    pre-pass (q/k L2 norm, the decay from ``A_log`` and ``dt_bias``, the erase and write sigmoids), and the Triton
    gated RMSNorm. ``backend`` (``auto``, ``torch`` or ``triton``) picks the kernels of all three. Mamba-2's forms
    add PyTorch work around them: its gates (``w = dt``) are formed before the op, its conv bias and SiLU after the
    conv kernel, and its group norm (``RMSNorm(y * silu(z))``) is PyTorch (``torch.compile`` fuses these).

    Example:
        >>> import torch
        >>> from gdn2ts.layers import GatedDeltaNet2, GDN2Config
        >>> cfg = GDN2Config.variant("gdn2", hidden_size=32, num_heads=2, head_k_dim=8, head_v_dim=8,
        ...                          gate_low_rank=4)
        >>> layer = GatedDeltaNet2(cfg)
        >>> x = torch.randn(2, 10, 32)
        >>> y, state = layer(x)
        >>> y_t, state = layer.step(torch.randn(2, 32), state)
        >>> y.shape, y_t.shape, state.recurrent.shape, state.conv.shape
        (torch.Size([2, 10, 32]), torch.Size([2, 32]), torch.Size([2, 2, 8, 8]), torch.Size([2, 48, 3]))
    """

    def __init__(self, config: GDN2Config, backend: str = "auto"):
        super().__init__()
        if not isinstance(config, GDN2Config):
            raise ValueError(f"GatedDeltaNet2: argument 'config' expected a GDN2Config, got {type(config).__name__}")
        if backend not in LAYER_BACKENDS:
            raise ValueError(f"GatedDeltaNet2: argument 'backend' expected one of {LAYER_BACKENDS}, got {backend!r}")
        self.config = cfg = config
        # which kernels the op, the short conv and the gated norm run: "auto" (Triton for CUDA tensors, PyTorch
        # otherwise), "torch", or "triton" (CUDA, or CPU tensors under TRITON_INTERPRET=1 for tests)
        self.backend = backend
        D, r = cfg.hidden_size, cfg.gate_low_rank
        H, HV, K, V = cfg.num_heads, cfg.num_v_heads, cfg.head_k_dim, cfg.head_v_dim
        self.q_proj = _linear(D, H * K)
        self.k_proj = _linear(D, H * K)
        self.v_proj = _linear(D, HV * V)
        self.conv = ShortConv(cfg.conv_channels, cfg.conv_size, bias=cfg.conv_bias)
        # erase gate b (key axis); a tied beta is per value head because it also serves as the write gate
        if cfg.erase == "channel":
            self.b_proj = _linear(D, H * K)
        elif cfg.erase == "scalar":
            self.b_proj = _linear(D, HV if cfg.tie_erase_write else H)
        # write gate w (value axis); "dt" reuses the decay's step size and "tied" the erase beta
        if cfg.write == "channel":
            self.w_proj = _linear(D, HV * V)
        elif cfg.write == "scalar" and not cfg.tie_erase_write:
            self.w_proj = _linear(D, HV)
        # decay g = -exp(A_log[h]) * softplus(proj(x) + dt_bias), h over the decay's heads (key or value heads)
        HD = cfg.num_decay_heads
        if cfg.decay == "channel":
            self.f_proj = _low_rank(D, r, HD * K)
            self.dt_bias = nn.Parameter(torch.empty(HD * K))
        else:
            self.a_proj = _linear(D, HD)
            self.dt_bias = nn.Parameter(torch.empty(HD))
        self.A_log = nn.Parameter(torch.empty(HD))
        self.D = nn.Parameter(torch.empty(HV)) if cfg.use_d_skip else None
        self.g_proj = _low_rank(D, r, HV * V, bias=True) if cfg.gate_proj == "low_rank" else _linear(D, HV * V)
        if cfg.output_norm == "head":
            self.o_norm = GatedRMSNorm(V, cfg.norm_eps, cfg.output_gate)
        else:
            self.o_norm = GroupGatedRMSNorm(HV * V, HV // H * V, cfg.norm_eps, cfg.output_gate)
        self.o_proj = _linear(HV * V, D)
        # optimizers read this to exclude the decay parameters (and Mamba-2's D) from weight decay
        for p in (self.A_log, self.dt_bias, self.D):
            if p is not None:
                p._no_weight_decay = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Linear: Xavier-uniform with gain ``2 ** -2.5``, zero biases; conv: PyTorch's default; norm and D: ones;
        ``A_log = log U(1, 16)``; ``dt_bias = softplus^-1(dt)``, dt log-uniform in [1e-3, 1e-1], clamped >= 1e-4."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight, gain=INIT_GAIN)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.conv.reset_parameters()
        self.o_norm.reset_parameters()
        with torch.no_grad():
            # draw in at least fp32 so that a bf16 layer gets rounded fp32 values, not bf16 arithmetic
            dt = torch.promote_types(self.A_log.dtype, torch.float32)
            a = torch.empty(self.A_log.shape, device=self.A_log.device, dtype=dt).uniform_(*A_INIT_RANGE)
            self.A_log.copy_(a.log())
            step = torch.empty(self.dt_bias.shape, device=self.dt_bias.device, dtype=dt)
            step = step.uniform_(math.log(DT_MIN), math.log(DT_MAX)).exp().clamp(min=DT_FLOOR)
            # softplus^-1(y) = y + log(1 - exp(-y))
            self.dt_bias.copy_(step + torch.log(-torch.expm1(-step)))
            if self.D is not None:
                self.D.fill_(1.0)

    # ----------------------------------------------------------------------------------------------------------
    # state

    def init_state(self, batch: int, device=None, dtype: torch.dtype | None = None) -> GDN2State:
        """Zero state for ``batch`` sequences; ``dtype`` is the activation dtype (default: the parameters').

        Example:
            >>> import torch
            >>> from gdn2ts.layers import GatedDeltaNet2, GDN2Config
            >>> layer = GatedDeltaNet2(GDN2Config(32, 2, head_k_dim=8, head_v_dim=8, gate_low_rank=4))
            >>> s = layer.init_state(3, dtype=torch.bfloat16)
            >>> s.recurrent.dtype, s.conv.dtype, tuple(s.conv.shape)
            (torch.float32, torch.bfloat16, (3, 48, 3))
        """
        cfg, p = self.config, self.q_proj.weight
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        recurrent = torch.zeros(batch, cfg.num_v_heads, cfg.head_k_dim, cfg.head_v_dim, device=device,
                                dtype=state_dtype(dtype))
        conv = torch.zeros(batch, cfg.conv_channels, cfg.conv_size - 1, device=device, dtype=dtype)
        return GDN2State(recurrent, conv)

    # ----------------------------------------------------------------------------------------------------------
    # public calls

    def forward(
        self,
        x: torch.Tensor,
        state: GDN2State | None = None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        decay_scale: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, GDN2State]:
        """Whole sequences: ``x`` ``[B, T, hidden]`` -> ``(y [B, T, hidden], new_state)``; differentiable.

        Args:
            x: ``[B, T, hidden]``, or ``[1, total, hidden]`` with ``cu_seqlens``.
            state: state of the ``N`` sequences to continue (``N = B``, or the number of packed sequences);
                zeros when omitted. Not modified.
            attention_mask: ``[B, T]`` bool or 0/1; masked tokens are skipped exactly (the state and the conv
                tail pass through them unchanged, and their output is 0). Holes anywhere are allowed.
            cu_seqlens: ``[N + 1]`` offsets of ``N`` sequences packed in ``x`` (``B == 1``); each sequence's conv
                starts from its own tail.
            decay_scale: ``[B, T]`` non-negative multiplier of each token's log-decay: the decay over a step of
                length ``dt`` is ``alpha ** dt`` (irregular sampling); 1 when omitted.

        Example:
            >>> import torch
            >>> from gdn2ts.layers import GatedDeltaNet2, GDN2Config
            >>> layer = GatedDeltaNet2(GDN2Config(32, 2, head_k_dim=8, head_v_dim=8, gate_low_rank=4))
            >>> x = torch.randn(2, 7, 32)
            >>> mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 1, 1]])
            >>> y, s = layer(x, attention_mask=mask)
            >>> y_ref, s_ref = layer(x[1:, mask[1].bool()])
            >>> bool(torch.allclose(y[1, mask[1].bool()], y_ref[0], atol=1e-5)), bool(y[1, 0].eq(0).all())
            (True, True)
        """
        op = "GatedDeltaNet2.forward"
        act = self._check_x(op, "x", x, 3)
        B, T = x.shape[:2]
        if attention_mask is not None and cu_seqlens is not None:
            fail(op, "attention_mask", "None when cu_seqlens is given (use one of the two)",
                 f"a tensor of shape {tuple(attention_mask.shape)} together with cu_seqlens")
        if decay_scale is not None:
            self._check_decay_scale(op, decay_scale, (B, T), x.device)
        if attention_mask is not None:
            mask = self._check_mask(op, "attention_mask", attention_mask, (B, T), x.device)
            self._check_state(op, state, B, act, x.device)
            # nothing masked: the dense path computes the same without packing and unpacking (checked on the CPU
            # only, where reading the mask costs no device synchronization)
            if x.device.type == "cpu" and bool(mask.all()):
                attention_mask = None
        if attention_mask is not None:
            # compact each row's valid tokens (in order) into one packed batch: holes become sequence joins
            cu = F.pad(mask.sum(1).cumsum(0), (1, 0))
            y_packed, new_state = self._forward_packed(x[mask][None], state, cu,
                                                       None if decay_scale is None else decay_scale[mask][None])
            y = y_packed.new_zeros(B, T, y_packed.shape[-1])
            y[mask] = y_packed[0]
            return y, new_state
        if cu_seqlens is not None:
            if B != 1:
                fail(op, "x", "batch size 1 when cu_seqlens packs the sequences ([1, total, hidden])",
                     f"shape {tuple(x.shape)}")
            N = check_cu_seqlens(op, cu_seqlens, B, T, x.device)
            self._check_state(op, state, N, act, x.device)
            return self._forward_packed(x, state, cu_seqlens, decay_scale)
        self._check_state(op, state, B, act, x.device)
        parts = self._project(x)
        qkv, tail = self.conv(parts["qkv"], None if state is None else state.conv, backend=self.backend)
        y, recurrent = self._mix(qkv, parts, None if state is None else state.recurrent, None, chunk_gdn2,
                                 decay_scale)
        return y, GDN2State(recurrent, tail)

    @torch.no_grad()
    def step(
        self, x_t: torch.Tensor, state: GDN2State | None = None, mask: torch.Tensor | None = None,
        decay_scale: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, GDN2State]:
        """One token per row: ``x_t`` ``[B, hidden]`` -> ``(y_t [B, hidden], new_state)``. Inference only.

        Runs under ``torch.no_grad()`` (the recurrent op is forward-only): use :meth:`forward` to train. Rows with
        ``mask[i] == False`` keep their state (recurrent and conv) and output zeros; ``decay_scale`` ``[B]`` scales
        each row's log-decay (as in :meth:`forward`). ``state`` (zeros when
        omitted) is not modified.

        Example:
            >>> import torch
            >>> from gdn2ts.layers import GatedDeltaNet2, GDN2Config
            >>> layer = GatedDeltaNet2(GDN2Config(32, 2, head_k_dim=8, head_v_dim=8, gate_low_rank=4))
            >>> x = torch.randn(3, 4, 32)
            >>> y, _ = layer(x)
            >>> state = layer.init_state(3)
            >>> for t in range(4):
            ...     y_t, state = layer.step(x[:, t], state)
            >>> bool(torch.allclose(y_t, y[:, -1], atol=1e-5))
            True
        """
        op = "GatedDeltaNet2.step"
        act = self._check_x(op, "x_t", x_t, 2)
        B = x_t.shape[0]
        self._check_state(op, state, B, act, x_t.device)
        if mask is not None:
            mask = self._check_mask(op, "mask", mask, (B,), x_t.device)
        if decay_scale is not None:
            self._check_decay_scale(op, decay_scale, (B,), x_t.device)
            decay_scale = decay_scale[:, None]
        if state is None:
            state = self.init_state(B, device=x_t.device, dtype=act)
        parts = self._project(x_t[:, None])
        qkv, tail = self.conv(parts["qkv"], state.conv, backend=self.backend)
        y, recurrent = self._mix(qkv, parts, state.recurrent, None, recurrent_gdn2, decay_scale)
        y = y[:, 0]
        if mask is not None:
            y = torch.where(mask[:, None], y, 0.0)
            recurrent = torch.where(mask[:, None, None, None], recurrent, state.recurrent)
            tail = torch.where(mask[:, None, None], tail, state.conv)
        return y, GDN2State(recurrent, tail)

    @torch.no_grad()
    def op_inputs(
        self, x: torch.Tensor, state: GDN2State | None = None, attention_mask: torch.Tensor | None = None,
        decay_scale: torch.Tensor | None = None,
    ) -> GDN2Inputs:
        """The op's activated inputs for a window, exactly as :meth:`forward` (same arguments) feeds the op.

        ``x`` ``[B, T, hidden]`` -> :class:`GDN2Inputs` (q, k, v, g, b, w). For inspecting what the recurrence
        saw (state audits); nothing is modified and no gradient is kept. Masked tokens get the identity step.

        Example:
            >>> import torch
            >>> from gdn2ts.layers import GatedDeltaNet2, GDN2Config
            >>> from gdn2ts.ops import recurrent_reference
            >>> layer = GatedDeltaNet2(GDN2Config(32, 2, head_k_dim=8, head_v_dim=8, gate_low_rank=4)).double()
            >>> x, mask = torch.randn(2, 6, 32).double(), torch.tensor([[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
            >>> _, state = layer(x, attention_mask=mask)
            >>> inputs = layer.op_inputs(x, attention_mask=mask)
            >>> _, replayed = recurrent_reference(*inputs, output_final_state=True)
            >>> inputs.g.shape, bool(torch.allclose(replayed, state.recurrent, atol=1e-10))
            (torch.Size([2, 6, 2, 8]), True)
        """
        op = "GatedDeltaNet2.op_inputs"
        act = self._check_x(op, "x", x, 3)
        B, T = x.shape[:2]
        if decay_scale is not None:
            self._check_decay_scale(op, decay_scale, (B, T), x.device)
        mask = (torch.ones(B, T, dtype=torch.bool, device=x.device) if attention_mask is None
                else self._check_mask(op, "attention_mask", attention_mask, (B, T), x.device))
        self._check_state(op, state, B, act, x.device)
        cfg = self.config
        H, HV, K, V = cfg.num_heads, cfg.num_v_heads, cfg.head_k_dim, cfg.head_v_dim
        # the conv runs over each row's kept tokens only, as in forward's masked path
        cu = F.pad(mask.sum(1).cumsum(0), (1, 0))
        conv_out, _ = self.conv(self._project(x[mask][None])["qkv"], None if state is None else state.conv,
                                cu_seqlens=cu, backend=self.backend)
        qkv = conv_out.new_zeros(B, T, cfg.conv_channels)
        qkv[mask] = conv_out[0]
        q, k, v = qkv.split([H * K, H * K, HV * V], dim=-1)
        q, k, v = q.unflatten(-1, (H, K)), k.unflatten(-1, (H, K)), v.unflatten(-1, (HV, V))
        dt = compute_dtype(q.dtype)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
        if cfg.qk_norm == "l2":
            q, k = l2norm(q, dt), l2norm(k, dt)
        g, b, w = self._gates(self._project(x), decay_scale)
        keep = mask[:, :, None, None]
        return GDN2Inputs(*(torch.where(keep, t, 0.0).to(dt) for t in (q, k, v, g, b, w)))

    # ----------------------------------------------------------------------------------------------------------
    # internals

    def _project(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x`` ``[..., hidden]`` -> every projection of ``x`` from one matrix product: ``qkv`` (pre-conv
        ``[..., C]``), the erase and write logits ``b`` and ``w``, the decay pre-activation ``f`` (channel decay:
        after both low-rank factors; scalar decay: ``[..., heads]``) and the output gate ``gate`` ``[..., HV * V]``
        (a low-rank gate: both factors, with its bias). The pieces are views of the one product's output."""
        cfg = self.config
        names, weights = ["qkv"], [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]
        for name in ("b_proj", "w_proj", "a_proj"):
            if hasattr(self, name):
                names.append(name[0])
                weights.append(getattr(self, name).weight)
        if cfg.decay == "channel":
            names.append("f_rank")
            weights.append(self.f_proj[0].weight)
        low_rank_gate = cfg.gate_proj == "low_rank"
        names.append("gate_rank" if low_rank_gate else "gate")
        weights.append(self.g_proj[0].weight if low_rank_gate else self.g_proj.weight)
        sizes = [cfg.conv_channels] + [w.shape[0] for w in weights[3:]]
        # one product reads x once (and its backward forms dx in one product too, not one per projection)
        parts = dict(zip(names, F.linear(x, torch.cat(weights)).split(sizes, dim=-1), strict=True))
        if cfg.decay == "channel":
            parts["f"] = self.f_proj[1](parts.pop("f_rank"))
        else:
            parts["f"] = parts.pop("a")
        if low_rank_gate:
            parts["gate"] = self.g_proj[1](parts.pop("gate_rank"))
        return parts

    def _forward_packed(self, x, state, cu_seqlens, decay_scale=None):
        """``x`` ``[1, total, hidden]`` with N sequences: the conv and the op read the packed rows in place (no
        padding, no host synchronization on CUDA)."""
        parts = self._project(x)
        qkv, tail = self.conv(parts["qkv"], None if state is None else state.conv, cu_seqlens=cu_seqlens,
                              backend=self.backend)
        y, recurrent = self._mix(qkv, parts, None if state is None else state.recurrent, cu_seqlens, chunk_gdn2,
                                 decay_scale)
        return y, GDN2State(recurrent, tail)

    def _in_op(self, decay_scale) -> tuple[bool, bool]:
        """Whether the op activates ``(g, (b, w))`` itself from the raw projections (its Triton path does so in one
        pre-pass): not for the forms its options do not express (a decay scaled per token, Mamba-2's write gate, no
        erase gate, a tied gate scaled past 1)."""
        cfg = self.config
        gate = decay_scale is None and cfg.write != "dt"
        bw = cfg.erase != "none" and cfg.write != "dt" and not (cfg.tie_erase_write and cfg.erase_max != 1.0)
        return gate, bw

    def _raw_gates(self, parts: dict[str, torch.Tensor], shape: tuple[int, int], gate: bool, bw: bool):
        """The op's raw ``g`` (``[B, T, HD, K]`` over the decay's heads, broadcast for a scalar decay) and
        ``dt_bias`` (``[HD, K]``) when ``gate``; the logits ``b`` (``[B, T, H or HV, K]``) and ``w``
        (``[B, T, HV, V]``), scalar ones broadcast, when ``bw``; None for the others."""
        cfg = self.config
        H, HV, K, V = cfg.num_heads, cfg.num_v_heads, cfg.head_k_dim, cfg.head_v_dim
        HD = cfg.num_decay_heads
        g = dt_bias = b = w = None
        if gate and cfg.decay == "channel":
            g, dt_bias = parts["f"].unflatten(-1, (HD, K)), self.dt_bias.view(HD, K)
        elif gate:
            g = parts["f"][..., None].expand(*shape, HD, K)
            dt_bias = self.dt_bias[:, None].expand(HD, K).contiguous()
        if bw:
            logits = parts["b"]
            b = logits.unflatten(-1, (H, K)) if cfg.erase == "channel" else \
                logits[..., None].expand(*shape, logits.shape[-1], K)
            if cfg.tie_erase_write:
                w = logits[..., None].expand(*shape, HV, V)
            elif cfg.write == "channel":
                w = parts["w"].unflatten(-1, (HV, V))
            else:
                w = parts["w"][..., None].expand(*shape, HV, V)
        return g, dt_bias, b, w

    def _gates(self, parts: dict[str, torch.Tensor], decay_scale: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projections (:meth:`_project`) -> activated ``g`` ``[B, T, HD, K]`` (HD the decay's heads), ``b``
        ``[B, T, H or HV, K]``, ``w`` ``[B, T, HV, V]``, all in fp32 (fp64 for fp64 inputs), in PyTorch. Scalar
        gates are broadcast views."""
        cfg = self.config
        B, T = parts["qkv"].shape[:2]
        H, HV, K, V = cfg.num_heads, cfg.num_v_heads, cfg.head_k_dim, cfg.head_v_dim
        HD = cfg.num_decay_heads
        dt = compute_dtype(parts["qkv"].dtype)
        rate = self.A_log.to(dt).exp()
        # the decay is formed in fp32: softplus and exp of bf16 values would quantize g where it matters most
        if cfg.decay == "channel":
            step = F.softplus(parts["f"].to(dt).unflatten(-1, (HD, K)) + self.dt_bias.to(dt).view(HD, K))
            g = -rate[:, None] * step
        else:
            step = F.softplus(parts["f"].to(dt) + self.dt_bias.to(dt))  # [B, T, HD]
            g = (-rate * step)[..., None].expand(B, T, HD, K)
        if decay_scale is not None:
            # irregular sampling: over a step of length dt the decay is alpha ** dt
            g = g * decay_scale.to(dt)[:, :, None, None]
        if cfg.erase == "channel":
            b = cfg.erase_max * torch.sigmoid(parts["b"].to(dt).unflatten(-1, (H, K)))
        elif cfg.erase == "scalar":
            beta = cfg.erase_max * torch.sigmoid(parts["b"].to(dt))  # [B, T, H or HV]
            b = beta[..., None].expand(*beta.shape, K)
        else:
            b = parts["qkv"].new_zeros((), dtype=dt).expand(B, T, H, K)
        if cfg.tie_erase_write:
            w = beta[..., None].expand(B, T, HV, V)
        elif cfg.write == "channel":
            w = torch.sigmoid(parts["w"].to(dt).unflatten(-1, (HV, V)))
        elif cfg.write == "scalar":
            w = torch.sigmoid(parts["w"].to(dt))[..., None].expand(B, T, HV, V)
        else:
            # Mamba-2: the input is scaled by the same step size dt that sets the decay
            step = step if HD == HV else step.repeat_interleave(HV // HD, dim=-1)
            w = step[..., None].expand(B, T, HV, V)
        return g, b, w

    def _mix(self, qkv, parts, recurrent, cu_seqlens, op, decay_scale=None):
        """Post-conv ``qkv`` ``[B, T, C]`` and the projections -> ``(y [B, T, hidden], final state)``."""
        cfg = self.config
        H, HV, K, V = cfg.num_heads, cfg.num_v_heads, cfg.head_k_dim, cfg.head_v_dim
        q, k, v = qkv.split([H * K, H * K, HV * V], dim=-1)
        q, k, v = q.unflatten(-1, (H, K)), k.unflatten(-1, (H, K)), v.unflatten(-1, (HV, V))
        gate_in_op, bw_in_op = self._in_op(decay_scale)
        g, dt_bias, b, w = self._raw_gates(parts, qkv.shape[:2], gate_in_op, bw_in_op)
        if not (gate_in_op and bw_in_op):
            g_act, b_act, w_act = self._gates(parts, decay_scale)
            g = g if gate_in_op else g_act
            b, w = (b, w) if bw_in_op else (b_act, w_act)
        o, final = op(q, k, v, g, b, w, scale=cfg.scale, initial_state=recurrent, output_final_state=True,
                      cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=cfg.qk_norm == "l2", use_gate_in_kernel=gate_in_op,
                      A_log=self.A_log if gate_in_op else None, dt_bias=dt_bias, use_bw_sigmoid_in_kernel=bw_in_op,
                      erase_max=cfg.erase_max, backend=self.backend)
        if self.D is not None:
            o = o + self.D.to(o.dtype)[:, None] * v
        if cfg.output_norm == "head":
            o = self.o_norm(o, parts["gate"].unflatten(-1, (HV, V)), backend=self.backend).flatten(-2)
        else:
            o = self.o_norm(o.flatten(-2), parts["gate"])
        return self.o_proj(o), final

    def _act_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype of the projections' outputs (autocast's, when it is on)."""
        kind = x.device.type
        return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype

    def _check_x(self, op: str, name: str, x, ndim: int) -> torch.dtype:
        hidden = self.config.hidden_size
        want = "[B, T, hidden]" if ndim == 3 else "[B, hidden]"
        if not isinstance(x, torch.Tensor):
            fail(op, name, f"a torch.Tensor {want}", type(x).__name__)
        if x.dim() != ndim or x.shape[-1] != hidden:
            fail(op, name, f"a {ndim}-D tensor {want} with hidden={hidden}", f"shape {tuple(x.shape)}")
        p = self.q_proj.weight
        if not x.is_floating_point():
            fail(op, name, f"a floating dtype ({p.dtype}, the layer's)", x.dtype)
        act = self._act_dtype(x)
        if x.dtype != p.dtype and not torch.is_autocast_enabled(x.device.type):
            fail(op, name, f"dtype {p.dtype} (the layer's parameter dtype)", x.dtype)
        if x.device != p.device:
            fail(op, name, f"a tensor on {p.device} (the layer's device)", x.device)
        return act

    def _check_state(self, op: str, state, N: int, act: torch.dtype, device) -> None:
        if state is None:
            return
        cfg = self.config
        if not isinstance(state, tuple) or len(state) != 2:
            fail(op, "state", "a GDN2State(recurrent, conv) or None", type(state).__name__)
        want = {
            "recurrent": ((N, cfg.num_v_heads, cfg.head_k_dim, cfg.head_v_dim), state_dtype(act),
                          f"[N={N}, HV={cfg.num_v_heads}, K={cfg.head_k_dim}, V={cfg.head_v_dim}]"),
            "conv": ((N, cfg.conv_channels, cfg.conv_size - 1), act,
                     f"[N={N}, C={cfg.conv_channels}, W-1={cfg.conv_size - 1}]"),
        }
        for (field, (shape, dtype, text)), t in zip(want.items(), state, strict=True):
            name = f"state.{field}"
            if not isinstance(t, torch.Tensor):
                fail(op, name, f"a torch.Tensor {text}", type(t).__name__)
            if tuple(t.shape) != shape:
                fail(op, name, f"shape {text}", f"shape {tuple(t.shape)}")
            if t.dtype != dtype:
                fail(op, name, f"dtype {dtype} (for {act} activations)", t.dtype)
            if t.device != device:
                fail(op, name, f"a tensor on {device} (the device of the input)", t.device)

    @staticmethod
    def _check_per_token(op: str, name: str, t, shape: tuple, device, what: str) -> str:
        """Type, shape and device of a per-token (``[B, T]``) or per-row (``[B]``) tensor; returns the shape text."""
        text = "[" + ", ".join(f"{k}={n}" for k, n in zip("BT"[:len(shape)], shape, strict=True)) + "]"
        if not isinstance(t, torch.Tensor):
            fail(op, name, f"{what} {text}", type(t).__name__)
        if tuple(t.shape) != shape:
            fail(op, name, f"shape {text}", f"shape {tuple(t.shape)}")
        if t.device != device:
            fail(op, name, f"a tensor on {device} (the device of the input)", t.device)
        return text

    @classmethod
    def _check_decay_scale(cls, op: str, scale, shape: tuple, device) -> None:
        text = cls._check_per_token(op, "decay_scale", scale, shape, device, "a floating tensor")
        if not scale.is_floating_point():
            fail(op, "decay_scale", f"a floating tensor {text}", scale.dtype)
        # reading values synchronizes a CUDA device: checked on the CPU, or when GDN2TS_CHECK_VALUES=1
        if check_values(scale) and (not bool(torch.isfinite(scale).all()) or bool((scale < 0).any())):
            fail(op, "decay_scale", "finite, non-negative values", "negative or non-finite values")

    @classmethod
    def _check_mask(cls, op: str, name: str, mask, shape: tuple, device) -> torch.Tensor:
        """Validate a bool or 0/1 mask of ``shape``; return it as bool."""
        cls._check_per_token(op, name, mask, shape, device, "a bool or 0/1 tensor")
        if mask.dtype == torch.bool:
            return mask
        # (values read back only where check_values allows; unchecked, any non-zero entry counts as True)
        if mask.is_complex() or (check_values(mask) and not bool(((mask == 0) | (mask == 1)).all())):
            fail(op, name, "bool or 0/1 values", f"dtype {mask.dtype} with other values")
        return mask != 0
