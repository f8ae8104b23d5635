"""Shared by the kernel tests: the buffers the launchers allocate through ``gdn2ts.kernels.buffers`` (the chunked
backward, the activation launches, the gated norm) start as NaN in every test here (``POISON``), so an element a
kernel should write and does not fails the comparison instead of passing on stale memory."""

from __future__ import annotations

import pytest

from gdn2ts.kernels import buffers


@pytest.fixture(autouse=True)
def poison_backward_buffers(monkeypatch):
    monkeypatch.setattr(buffers, "POISON", True)
