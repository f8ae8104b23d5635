"""Shared by the kernel tests: the buffers that the chunked backward, the activation launches and the gated norm
allocate start as NaN in every test here (``POISON``), so an element a kernel should write and does not fails the
comparison instead of passing on stale memory."""

from __future__ import annotations

import pytest

import gdn2ts.kernels.act as act_module
import gdn2ts.kernels.chunk_bwd as chunk_bwd_module
import gdn2ts.kernels.norm as norm_module


@pytest.fixture(autouse=True)
def poison_backward_buffers(monkeypatch):
    monkeypatch.setattr(chunk_bwd_module, "POISON", True)
    monkeypatch.setattr(act_module, "POISON", True)
    monkeypatch.setattr(norm_module, "POISON", True)
