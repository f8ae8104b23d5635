"""Fixtures of the forecasting tests; the data helpers they build on are in ``forecast_frames.py``."""

from __future__ import annotations

import pytest

from forecast_frames import ett_frame


@pytest.fixture
def ett_csv(tmp_path):
    """A 15,000-row ETT-format CSV (enough rows for the ETTh1 protocol's borders)."""
    path = tmp_path / "ETTsynth.csv"
    ett_frame(15_000).write_csv(path)
    return path


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread in these tests: the models are tiny, and on a shared 2-core machine a second thread makes
    them several times slower; restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
