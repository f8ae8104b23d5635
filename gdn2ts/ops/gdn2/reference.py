"""PyTorch implementations of the GDN-2 recurrence: the token-by-token ground truth and the chunked CPU path.

Both take activated gates (``g <= 0`` log-decay, ``b``/``w`` erase/write gates) in FLA's layout and return
``(o, final_state)``. Neither validates its inputs: the public ops in :mod:`gdn2ts.ops` do that.

Shapes (``H`` key heads, ``HV = G * H`` value heads; value head ``j`` reads key head ``j // G``)::

    q, k   [B, T, H, K]          v, w   [B, T, HV, V]
    g, b   [B, T, H, K] or [B, T, HV, K]
    state  [N, HV, K, V]         (N = B, or the number of packed sequences when cu_seqlens is given)

Per value head, one step is (the order matters for agreement with other implementations)::

    S <- Diag(exp(g)) S            decay the key rows
    r  = S^T (b * k)               read what the erase gate selects
    S <- S + k (w * v - r)^T       erase it and write the gated value
    o  = S^T (scale * q)           read the updated state
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gdn2ts.ops.gdn2 import decayed

__all__ = ["recurrent_reference", "chunk_reference", "segmented", "compute_dtype", "state_dtype", "pad_packed",
           "unpad_packed"]

# The CPU path's chunk: with K = V = 32 on two cores, 32 beats 64 (fewer in-chunk products per token); the Triton
# kernels use their own tiling.
CHUNK_SIZE = 32


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 inputs compute in fp64; everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The recurrent state is fp32, or fp64 when the inputs are fp64."""
    return compute_dtype(dtype)


def _to_value_heads(x: torch.Tensor, num_v_heads: int) -> torch.Tensor:
    """[B, T, Hx, K] -> [B, T, HV, K], repeating key-head tensors over their group of value heads."""
    heads = x.shape[2]
    if heads == num_v_heads:
        return x
    return x.repeat_interleave(num_v_heads // heads, dim=2)


def pad_packed(x: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed ``[1, total, ...]`` -> zero-padded ``[N, L, ...]`` plus the gather index ``[N, L]`` (-1 for padding).

    Zero padding of q, k, v, g, b, w is an identity step of the recurrence (g = 0 keeps the state, k = 0 writes
    nothing), so final states of padded rows equal those at each sequence's end.
    """
    offsets = cu_seqlens.to(device=x.device, dtype=torch.long)
    lengths = offsets[1:] - offsets[:-1]
    n = lengths.numel()
    max_len = int(lengths.max().item()) if n else 0
    pos = torch.arange(max_len, device=x.device)
    valid = pos[None, :] < lengths[:, None]
    index = torch.where(valid, offsets[:-1, None] + pos[None, :], torch.full_like(valid, -1, dtype=torch.long))
    flat = x[0]
    padded = flat.new_zeros((n, max_len) + tuple(flat.shape[1:]))
    padded = padded.index_put((valid.nonzero(as_tuple=True)), flat[index[valid]])
    return padded, index


def unpad_packed(padded: torch.Tensor, index: torch.Tensor, total: int) -> torch.Tensor:
    """Inverse of :func:`pad_packed`: ``[N, L, ...]`` -> ``[1, total, ...]``."""
    valid = index >= 0
    out = padded.new_zeros((total,) + tuple(padded.shape[2:]))
    out = out.index_put((index[valid],), padded[valid])
    return out.unsqueeze(0)


def _run_padded(fn, q, k, v, g, b, w, scale, initial_state, output_final_state, cu_seqlens):
    """Run ``fn`` on a packed varlen batch by padding it to ``[N, L]`` with identity steps."""
    total = q.shape[1]
    q_, index = pad_packed(q, cu_seqlens)
    k_, v_, g_, b_, w_ = (pad_packed(t, cu_seqlens)[0] for t in (k, v, g, b, w))
    o, state = fn(q_, k_, v_, g_, b_, w_, scale, initial_state, output_final_state, None)
    return unpad_packed(o, index, total), state


def recurrent_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ground truth: the recurrence token by token, in fp32 (fp64 for fp64 inputs). Differentiable.

    Example:
        >>> import torch
        >>> B, T, H, K, V = 1, 5, 2, 4, 3
        >>> q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
        >>> v = torch.randn(B, T, H, V)
        >>> g, b, w = -torch.rand(B, T, H, K), torch.rand(B, T, H, K), torch.rand(B, T, H, V)
        >>> o, s = recurrent_reference(q, k, v, g, b, w, output_final_state=True)
        >>> o.shape, s.shape
        (torch.Size([1, 5, 2, 3]), torch.Size([1, 2, 4, 3]))
    """
    if cu_seqlens is not None:
        return _run_padded(recurrent_reference, q, k, v, g, b, w, scale, initial_state, output_final_state,
                           cu_seqlens)
    out_dtype = v.dtype
    dt = compute_dtype(q.dtype)
    B, T, _, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    scale = K**-0.5 if scale is None else scale
    q, k, g, b = (_to_value_heads(t, HV).to(dt) for t in (q, k, g, b))
    v, w = v.to(dt), w.to(dt)
    S = q.new_zeros(B, HV, K, V) if initial_state is None else initial_state.to(dt)
    outs = []
    for t in range(T):
        S = S * g[:, t].exp()[..., None]
        r = torch.einsum("nhk,nhkv->nhv", b[:, t] * k[:, t], S)
        u = w[:, t] * v[:, t] - r
        S = S + k[:, t, :, :, None] * u[:, :, None, :]
        outs.append(torch.einsum("nhk,nhkv->nhv", q[:, t] * scale, S))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, HV, V)
    return o.to(out_dtype), (S if output_final_state else None)


def _mm(a: torch.Tensor, b: torch.Tensor, ta: bool = False, tb: bool = False) -> torch.Tensor:
    """``a @ b`` (optionally transposing either) over any leading dims as one ``bmm``: on the CPU, ``matmul`` on
    transposed views with more than three dims copies its operands first."""
    a3, b3 = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    a3, b3 = (a3.transpose(1, 2) if ta else a3), (b3.transpose(1, 2) if tb else b3)
    return torch.bmm(a3, b3).view(*a.shape[:-2], a3.shape[1], b3.shape[2])


def _chunk_forward(q, k, v, g, b, w, h0, force_blocked):
    """Chunked forward on prepared chunk-major tensors ``[N, B, HV, C, D]`` (q already scaled).

    Chunk-major order keeps each chunk's slice contiguous for the sequential state passing. Returns o
    ``[N, B, HV, C, V]``, the final state and what the backward needs.
    """
    N, B, HV, C, K = q.shape
    V = v.shape[-1]
    M = N * B * HV
    flat = (M, C, K)
    G = g.cumsum(dim=-2)
    gamma = G.exp()
    bk = b * k
    p = decayed.plan(G.view(flat), force_blocked)
    gm, lefts_up, k_down = decayed.gram(p, [bk.view(flat), q.view(flat)], k.view(flat))
    L = gm[:, :C].tril(-1)
    L.diagonal(dim1=-2, dim2=-1).fill_(1.0)  # L = I + strict_lower(erase Gram)
    # One triangular solve for L^-1 itself; the four systems of forward and backward become matrix products.
    eye = torch.eye(C, dtype=q.dtype, device=q.device).expand(M, C, C)
    Linv = torch.linalg.solve_triangular(L, eye, upper=False, unitriangular=True)
    A_qk = gm[:, C:].tril().view(N, B, HV, C, C)
    Y = torch.bmm(Linv, (gamma * bk).view(flat))
    U = torch.bmm(Linv, (w * v).view(M, C, V))
    Y, U = Y.view(N, B, HV, C, K), U.view(N, B, HV, C, V)
    G_last = G[..., -1:, :]
    tail = (G_last - G).exp()  # exp(G_C - G_r) <= 1
    k_tail = tail * k
    decay_chunk = G_last.exp().transpose(-1, -2)  # [N, B, HV, K, 1]

    S = h0
    entry_states, residuals = [], []
    for n in range(N):
        R_n = U[n] - _mm(Y[n], S)
        entry_states.append(S)
        residuals.append(R_n)
        S = torch.addcmul(_mm(k_tail[n], R_n, ta=True), decay_chunk[n], S)
    S0 = torch.stack(entry_states)  # [N, B, HV, K, V]
    R = torch.stack(residuals)  # [N, B, HV, C, V]
    gq = gamma * q
    o = _mm(gq, S0).add_(_mm(A_qk, R))
    saved = (q, k, v, b, w, bk, gq, k_tail, G, gamma, Linv, A_qk, Y, U, tail, decay_chunk, S0, R, lefts_up, k_down)
    return o, S, (saved, p)


def _chunk_backward(saved, p, do, dS):
    """Hand-written backward of :func:`_chunk_forward`; returns dq (scaled q), dk, dv, dg, db, dw, dh0."""
    q, k, v, b, w, bk, gq, k_tail, G, gamma, Linv, A_qk, Y, U, tail, decay_chunk, S0, R, lefts_up, k_down = saved
    N, B, HV, C, K = q.shape
    V = v.shape[-1]
    M = N * B * HV
    flat = (M, C, K)

    # State passing, backwards over chunks: dS is the gradient of the state entering the next chunk.
    dR_out = _mm(A_qk, do, ta=True)  # [N, B, HV, C, V]
    dS_out = _mm(gq, do, ta=True)  # [N, B, HV, K, V]
    dR_list, dS_next_list = [None] * N, [None] * N
    for n in range(N - 1, -1, -1):
        dS_next_list[n] = dS
        dR_n = _mm(k_tail[n], dS).add_(dR_out[n])
        dS = torch.addcmul(dS_out[n], decay_chunk[n], dS).sub_(_mm(Y[n], dR_n, ta=True))
        dR_list[n] = dR_n
    dh0 = dS
    dR = torch.stack(dR_list)
    dS_next = torch.stack(dS_next_list)  # [N, B, HV, K, V]

    # Everything else is batched over chunks.
    dgq = _mm(do, S0, tb=True)  # [N, B, HV, C, K]
    dA_qk = _mm(do, R, tb=True).view(M, C, C)
    dk_tail = _mm(R, dS_next, tb=True)  # [N, B, HV, C, K]
    d_decay_chunk = (dS_next * S0).sum(-1)  # [N, B, HV, K]
    Linv_T = Linv.transpose(-1, -2)
    dE = torch.bmm(Linv_T, _mm(dR, S0, tb=True).view(flat)).neg_()
    dZ = torch.bmm(Linv_T, dR.view(M, C, V))
    dA_kk = torch.bmm(dE, Y.view(flat).transpose(1, 2)).baddbmm_(dZ, U.view(M, C, V).transpose(1, 2))
    dA_kk.tril_(-1).neg_()
    dE, dZ = dE.view(dgq.shape), dZ.view(dR.shape)

    # Gradients of the Grams. Only strictly-lower entries depend on the decay; the diagonal of the output Gram
    # (q_r . k_r) is handled apart so that its equal and opposite decay terms never have to cancel.
    kf, bkf, qf = k.view(flat), bk.view(flat), q.view(flat)
    diag = dA_qk.diagonal(dim1=-2, dim2=-1)[..., None]  # [M, C, 1]
    dA_qk = dA_qk.tril(-1)
    dbk_g, dq_g = decayed.lower(p, [dA_kk, dA_qk], kf, k_down)  # [M, C, K] each: d(bk), dq
    lefts_up = None if lefts_up is None else [lefts_up[:, :C], lefts_up[:, C:]]
    dk_g = decayed.upper(p, [dA_kk, dA_qk], [bkf, qf], lefts_up)  # [M, C, K]
    # (fused multiply-adds in place: on the CPU these passes are memory-bound, and fresh buffers cost page faults)
    dG = (bk * dE).addcmul_(q, dgq).mul_(gamma).view(flat)
    dG.addcmul_(bkf, dbk_g).addcmul_(qf, dq_g).addcmul_(kf, dk_g, value=-1.0)

    dbk = dbk_g.addcmul_(gamma.view(flat), dE.view(flat)).view(dE.shape)
    dq = dq_g.addcmul_(diag, kf).view(dgq.shape).addcmul_(gamma, dgq)
    dk = dk_g.addcmul_(diag, qf).view(dgq.shape).addcmul_(tail, dk_tail).addcmul_(dbk, b)
    db = dbk * k
    dv = dZ * w
    dw = dZ * v

    # dG collects terms through exp(G_r) (G_r = g_0 + ... + g_r): dg is its reverse cumulative sum. The tail
    # factors exp(G_C - G_r) depend on g_{r+1..C-1} only and the chunk decay exp(G_C) on every g of the chunk, so
    # they are added in g-space directly (no large terms cancelling).
    dg = dG.view(dE.shape).flip(-2).cumsum(-2).flip(-2)
    t = k_tail * dk_tail
    dg[..., 1:, :] += t[..., :-1, :].cumsum(-2)  # sum over r < j, without subtracting t_j
    dg += (decay_chunk.squeeze(-1) * d_decay_chunk)[..., None, :]
    return dq, dk, dv, dg, db, dw, dh0


class _ChunkGDN2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, b, w, h0, force_blocked):
        o, S, (saved, p) = _chunk_forward(q, k, v, g, b, w, h0, force_blocked)
        ctx.save_for_backward(*saved)
        ctx.plan = p
        return o, S

    @staticmethod
    def backward(ctx, do, dS):
        saved = ctx.saved_tensors
        if dS is None:
            dS = torch.zeros_like(saved[16][0])
        # a backward called inside an autocast region must not push the hand-written products to 16 bits either
        with torch.autocast(do.device.type, enabled=False):
            grads = _chunk_backward(saved, ctx.plan, do.to(saved[0].dtype).contiguous(), dS.to(saved[0].dtype))
        return (*grads, None)


def chunk_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
    force_blocked: bool = False,
    autograd: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunked (WY) form in PyTorch with a hand-written backward: the CPU path of ``chunk_gdn2``.

    Per chunk of ``C`` tokens with entry state ``S0`` (``G`` the in-chunk cumulative log-decay)::

        T  = strict_lower[(b*k)_r . k_s exp(G_r - G_s)]      L = I + T   (L^-1 formed by one triangular solve)
        Y  = L^-1 (exp(G) * b * k)     U = L^-1 (w * v)      R = U - Y S0      (R holds each step's u)
        O  = (exp(G) * q) S0 + lower[q_r . k_s exp(G_r - G_s)] R
        S1 = Diag(exp(G_C)) S0 + (exp(G_C - G) * k)^T R

    State passing is sequential over chunks; everything else is batched over all chunks. The backward runs the
    same structure in reverse (see ``docs/gdn2.md``). ``force_blocked`` sends every chunk through the blocked
    form of the decayed products and ``autograd=True`` differentiates the forward with autograd instead of the
    hand-written backward (both for tests).

    Example:
        >>> import torch
        >>> q = torch.randn(2, 100, 2, 8)
        >>> k = torch.nn.functional.normalize(torch.randn(2, 100, 2, 8), dim=-1)
        >>> v, w = torch.randn(2, 100, 2, 4), torch.rand(2, 100, 2, 4)
        >>> g, b = -torch.rand(2, 100, 2, 8), torch.rand(2, 100, 2, 8)
        >>> o, s = chunk_reference(q, k, v, g, b, w, output_final_state=True)
        >>> o2, s2 = recurrent_reference(q, k, v, g, b, w, output_final_state=True)
        >>> bool(torch.allclose(o, o2, atol=1e-4)), bool(torch.allclose(s, s2, atol=1e-4))
        (True, True)
    """
    if cu_seqlens is not None:
        def run(*a):
            return chunk_reference(*a, chunk_size=chunk_size, force_blocked=force_blocked, autograd=autograd)
        return _run_padded(run, q, k, v, g, b, w, scale, initial_state, output_final_state, cu_seqlens)
    out_dtype = v.dtype
    dt = compute_dtype(q.dtype)
    B, T, _, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    scale = K**-0.5 if scale is None else scale
    # a sequence shorter than a chunk is one chunk of the next power of two: padding it to the full chunk would
    # spend most of the Gram and triangular-solve work on identity steps
    C = chunk_size if T >= chunk_size else max(1, 1 << (T - 1).bit_length())
    N = -(-T // C)
    pad = N * C - T

    def prep(x: torch.Tensor) -> torch.Tensor:
        # [B, T, HV, D] -> chunk-major [N, B, HV, C, D], zero-padded (an identity step) to whole chunks
        x = _to_value_heads(x, HV).to(dt)
        if pad:
            x = F.pad(x, (0, 0, 0, 0, 0, pad))
        return x.view(B, N, C, HV, x.shape[-1]).permute(1, 0, 3, 2, 4).contiguous()

    q, k, v, g, b, w = (prep(t) for t in (q, k, v, g, b, w))
    q = q * scale
    h0 = q.new_zeros(B, HV, K, V) if initial_state is None else initial_state.to(dt)
    if N == 0:
        return v.new_zeros(B, 0, HV, V), (h0 if output_final_state else None)
    if autograd:
        o, S, _ = _chunk_forward(q, k, v, g, b, w, h0, force_blocked)
    else:
        o, S = _ChunkGDN2.apply(q, k, v, g, b, w, h0, force_blocked)
    o = o.permute(1, 0, 3, 2, 4).reshape(B, N * C, HV, V)[:, :T].to(out_dtype)
    return o, (S if output_final_state else None)


def segmented(fn, q, k, v, g, b, w, scale, initial_state, cu_seqlens, segment: int):
    """``fn`` (either function above) over successive ``segment``-token pieces of each sequence, carrying the state:
    ``(o, final_state, h)`` with ``h`` the state entering each piece, ``[B, NT, HV, K, V]`` (``NT = ceil(T /
    segment)``), or for packed sequences ``[1, sum_n ceil(L_n / segment), HV, K, V]`` in sequence order.

    With a chunked ``fn`` whose chunk divides ``segment`` the pieces cut where its chunks do, so ``o`` and the final
    state are those of one call.

    Example:
        >>> import torch
        >>> q, k, b = torch.randn(1, 5, 1, 4), torch.randn(1, 5, 1, 4), torch.rand(1, 5, 1, 4)
        >>> g = -torch.rand(1, 5, 1, 4)
        >>> v, w = torch.randn(1, 5, 1, 3), torch.rand(1, 5, 1, 3)
        >>> o, s, h = segmented(recurrent_reference, q, k, v, g, b, w, None, None, None, segment=2)
        >>> _, s2 = recurrent_reference(q[:, :4], k[:, :4], v[:, :4], g[:, :4], b[:, :4], w[:, :4],
        ...                             output_final_state=True)
        >>> h.shape, bool(torch.allclose(h[:, 2], s2))
        (torch.Size([1, 3, 1, 4, 3]), True)
    """
    if cu_seqlens is not None:
        total = q.shape[1]
        q_, index = pad_packed(q, cu_seqlens)
        rest = [pad_packed(t, cu_seqlens)[0] for t in (k, v, g, b, w)]
        o, S, h = segmented(fn, q_, *rest, scale, initial_state, None, segment)
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        h = torch.cat([h[n, : -(-L // segment)] for n, L in enumerate(lengths)]).unsqueeze(0)
        return unpad_packed(o, index, total), S, h
    B, T = q.shape[:2]
    HV, K, V = v.shape[2], q.shape[3], v.shape[3]
    S = q.new_zeros(B, HV, K, V, dtype=state_dtype(q.dtype)) if initial_state is None else initial_state
    outs, states = [], []
    for t0 in range(0, T, segment):
        states.append(S)
        piece = slice(t0, t0 + segment)
        o, S = fn(q[:, piece], k[:, piece], v[:, piece], g[:, piece], b[:, piece], w[:, piece], scale, S, True, None)
        outs.append(o)
    o = torch.cat(outs, 1) if outs else v.new_zeros(B, 0, HV, V)
    h = torch.stack(states, 1) if states else S.new_zeros(B, 0, HV, K, V)
    return o, S, h
