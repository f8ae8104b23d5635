"""Tile loaders and stores shared by the chunked forward and backward kernels (written once for both).

Every tensor of the chunked kernels is a dense ``[B, T, heads, D]`` (or ``[B, T, heads, BT]`` for the in-chunk
matrices) addressed with int64 row offsets: rows ``row0 .. row0 + BR`` of batch row ``i_b`` and head ``i_h``,
columns ``c0 .. c0 + BD``. Rows past ``T`` read as zeros (the cumulative decay ``G`` instead repeats row ``T - 1``:
padding is ``g = 0``, an identity step, so every decay ratio stays <= 1 in a last, partial chunk).
"""

from __future__ import annotations

import triton
import triton.language as tl

BT = 64  # chunk
BC = 16  # sub-block of the in-chunk products
SAFE_SPREAD = 40.0  # largest in-block decay spread for the one-product form of a diagonal block

__all__ = ["BT", "BC", "SAFE_SPREAD", "tile", "tile_f32", "G_tile", "row_f32", "G_row", "put", "block", "put_block",
           "chunk_range"]


@triton.jit
def _offsets(i_b, rows, T, heads, i_h, D: tl.constexpr, cols):
    return ((i_b * T + rows.to(tl.int64)) * heads + i_h)[:, None] * D + cols[None, :]


@triton.jit
def tile(ptr, i_b, row0, T, heads, i_h, D: tl.constexpr, c0, BR: tl.constexpr, BD: tl.constexpr):
    """Rows ``row0 ..`` and columns ``c0 ..`` in the tensor's own dtype, zeros outside."""
    rows = row0 + tl.arange(0, BR)
    cols = c0 + tl.arange(0, BD)
    m = (rows < T)[:, None] & (cols < D)[None, :]
    return tl.load(ptr + _offsets(i_b, rows, T, heads, i_h, D, cols), mask=m, other=0.0)


@triton.jit
def tile_f32(ptr, i_b, row0, T, heads, i_h, D: tl.constexpr, c0, BR: tl.constexpr, BD: tl.constexpr):
    """As :func:`tile`, as fp32."""
    return tile(ptr, i_b, row0, T, heads, i_h, D, c0, BR, BD).to(tl.float32)


@triton.jit
def G_tile(G, i_b, row0, T, heads, i_h, D: tl.constexpr, c0, BR: tl.constexpr, BD: tl.constexpr):
    """Rows of the cumulative decay; rows past T repeat row T - 1."""
    rows = tl.minimum(row0 + tl.arange(0, BR), T - 1)
    cols = c0 + tl.arange(0, BD)
    return tl.load(G + _offsets(i_b, rows, T, heads, i_h, D, cols), mask=(cols < D)[None, :], other=0.0)


@triton.jit
def row_f32(ptr, i_b, row, T, heads, i_h, D: tl.constexpr, BD: tl.constexpr):
    """One row, fp32, zeros past T."""
    o_d = tl.arange(0, BD)
    m = (o_d < D) & (row < T)
    return tl.load(ptr + ((i_b * T + row.to(tl.int64)) * heads + i_h) * D + o_d, mask=m, other=0.0).to(tl.float32)


@triton.jit
def G_row(G, i_b, row, T, heads, i_h, D: tl.constexpr, c0, BD: tl.constexpr):
    """One row of the cumulative decay from column ``c0``; past T it repeats row T - 1."""
    cols = c0 + tl.arange(0, BD)
    row = tl.minimum(row, T - 1)
    return tl.load(G + ((i_b * T + row.to(tl.int64)) * heads + i_h) * D + cols, mask=cols < D, other=0.0)


@triton.jit
def put(ptr, x, i_b, row0, T, heads, i_h, D: tl.constexpr, c0, BR: tl.constexpr, BD: tl.constexpr):
    """Store ``x`` at rows ``row0 ..`` and columns ``c0 ..`` (in the tensor's dtype), nothing outside."""
    rows = row0 + tl.arange(0, BR)
    cols = c0 + tl.arange(0, BD)
    m = (rows < T)[:, None] & (cols < D)[None, :]
    tl.store(ptr + _offsets(i_b, rows, T, heads, i_h, D, cols), x.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def block(ptr, i_b, r0, c0, T, heads, i_h, BT: tl.constexpr, BC: tl.constexpr):
    """Block [BC, BC] at rows ``r0..`` and in-chunk columns ``c0..`` of a ``[B, T, heads, BT]`` buffer, as fp32."""
    o = tl.arange(0, BC)
    rows = r0 + o
    return tl.load(ptr + _offsets(i_b, rows, T, heads, i_h, BT, c0 + o), mask=(rows < T)[:, None],
                   other=0.0).to(tl.float32)


@triton.jit
def put_block(ptr, x, i_b, r0, c0, T, heads, i_h, BT: tl.constexpr, BC: tl.constexpr):
    """Block ``x`` [BC, BC] at rows ``r0..`` and in-chunk columns ``c0..`` of a ``[B, T, heads, BT]`` buffer."""
    o = tl.arange(0, BC)
    rows = r0 + o
    tl.store(ptr + _offsets(i_b, rows, T, heads, i_h, BT, c0 + o), x.to(ptr.dtype.element_ty),
             mask=(rows < T)[:, None])


@triton.jit
def chunk_range(chunk_lo, chunk_hi, i_bh, T, HV: tl.constexpr, BT: tl.constexpr, VARLEN: tl.constexpr):
    """``(batch row, first chunk, end chunk)`` that the sequential passes' program ``i_bh`` (a sequence or batch row
    times ``HV`` plus its value head) runs over: its sequence's chunks ``chunk_lo[n] .. chunk_hi[n]`` of the one
    packed row with ``VARLEN``, else every chunk of batch row ``i_bh // HV``."""
    if VARLEN:
        i_b = i_bh * 0
        lo = tl.load(chunk_lo + i_bh // HV)
        hi = tl.load(chunk_hi + i_bh // HV)
    else:
        i_b = i_bh // HV
        lo = 0
        hi = tl.cdiv(T, BT)
    return i_b, lo, hi
