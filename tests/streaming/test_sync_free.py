"""No host synchronization per round: the runner's stepping reads nothing back from the device.

On CUDA every read of a device value (``bool(t)``, ``.item()``, ``.tolist()``, ``nonzero``, boolean-mask indexing,
``.cpu()``, a blocking copy from the host) waits for the device. ``OnlineRunner.observe`` validates its frame on
the host (``gdn2ts/streaming/frames.py``), so the encoder and the layer read no values for validation on CUDA
unless ``GDN2TS_CHECK_VALUES=1``, and ``Stepper.run`` (every round of a call: the rows moved to the device, the
steps, the statistics and histories) must not synchronize at all. What happens before (loading states, gathering
them) and after (committing, scattering) happens once per call, whatever the number of rounds. A prefill (many
rounds at once) reads a few sizes back per layer and piece, never per round.

The GPU tests check this with ``torch.cuda.set_sync_debug_mode``; the CPU test checks the same region for the
Python-level calls that synchronize on CUDA, with the value checks switched off as they are on CUDA.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from torch.overrides import TorchFunctionMode, resolve_name

import gdn2ts.layers.gdn2 as layer_module
from gdn2ts.models import EncoderConfig, StreamEncoder
from gdn2ts.ops import validate
from gdn2ts.streaming import CommitPolicy, MemoryStore, OnlineRunner, SQLiteStore
from gdn2ts.streaming.learn import LearnConfig
from gdn2ts.streaming.rounds import Stepper, stepped

from tolerances import assert_close

CHANNELS = ["a", "b"]
COVARIATES = ["hour"]

# Python-level calls that read a device value back on CUDA
READS = {"torch.Tensor.__bool__", "torch.Tensor.item", "torch.Tensor.tolist", "torch.Tensor.__int__",
         "torch.Tensor.__float__", "torch.Tensor.__index__", "torch.Tensor.nonzero", "torch.nonzero",
         "torch.argwhere", "torch.Tensor.argwhere", "torch.Tensor.cpu", "torch.Tensor.numpy", "torch.unique",
         "torch.Tensor.unique", "torch.masked_select", "torch.Tensor.masked_select", "torch.bincount",
         "torch.Tensor.bincount", "torch.Tensor.__repr__", "torch.Tensor.__format__"}
INDEXING = {"torch.Tensor.__getitem__", "torch.Tensor.__setitem__", "torch.Tensor.index_put_",
            "torch.Tensor.index_put"}


def _bool_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


class HostReads(TorchFunctionMode):
    """Records (or refuses) the calls that would synchronize a CUDA device."""

    def __init__(self, refuse: bool = True):
        super().__init__()
        self.refuse, self.seen = refuse, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = resolve_name(func) or repr(func)
        kwargs = kwargs or {}
        if name in READS or (name in INDEXING and _bool_index(args)) or \
                (name == "torch.where" and len(args) + len(kwargs) == 1):
            if self.refuse:
                raise AssertionError(f"{name} reads a device value back (a host sync on CUDA)")
            self.seen.append(name)
        return func(*args, **kwargs)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def encoder(device="cpu"):
    torch.manual_seed(0)
    cfg = EncoderConfig(n_channels=2, n_covariates=1, hidden_size=16, n_layers=2, num_heads=2, head_dim=8, horizon=3)
    return StreamEncoder(cfg).to(device)


def batch(n_streams: int, rows: int, t0: float, seed: int) -> pl.DataFrame:
    """``rows`` rows for each of ``n_streams`` streams after ``t0``, missing values and empty rows included."""
    rng = np.random.default_rng(seed)
    n = n_streams * rows
    times = t0 + np.cumsum(rng.uniform(0.1, 1.0, (n_streams, rows)), axis=1)
    values = rng.standard_normal((n, 2))
    values[rng.random((n, 2)) < 0.3] = np.nan
    return pl.DataFrame({"stream": np.repeat([f"s{i}" for i in range(n_streams)], rows), "time": times.ravel(),
                         "a": values[:, 0], "b": values[:, 1], "hour": np.sin(times.ravel())}
                        ).with_columns(pl.col("a", "b").fill_nan(None))


def copy_store(src, dst) -> None:
    """What a process that stopped without closing its runner left: the database, its log and the records' slab."""
    for suffix in ("", "-wal", "-slab"):
        if Path(f"{src}{suffix}").exists():
            shutil.copyfile(f"{src}{suffix}", f"{dst}{suffix}")


def quantiles(forecast: pl.DataFrame) -> torch.Tensor:
    return torch.from_numpy(forecast.select(pl.selectors.starts_with("q")).to_numpy())


def guard_stepping(monkeypatch, region):
    """Run every ``Stepper.run`` (each observe's and each replayed entry's rounds) inside ``region()``."""
    run = Stepper.run
    calls = []

    def guarded(self, *args, **kwargs):
        with region():
            calls.append(args[1].sizes.size)
            return run(self, *args, **kwargs)

    monkeypatch.setattr(Stepper, "run", guarded)
    return calls


def values_unchecked(monkeypatch):
    """Value checks as on CUDA without GDN2TS_CHECK_VALUES: off."""
    monkeypatch.setattr(validate, "check_values", lambda t: False)
    monkeypatch.setattr(layer_module, "check_values", lambda t: False)


# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("learning", [None, LearnConfig(history=8, context=4, min_context=1)])
def test_stepping_reads_nothing_back(monkeypatch, tmp_path, learning):
    values_unchecked(monkeypatch)
    rounds = guard_stepping(monkeypatch, HostReads)
    db = tmp_path / "s.db"
    runner = OnlineRunner(encoder(), SQLiteStore(db), CHANNELS, COVARIATES, capacity=6, learning=learning,
                          policy=CommitPolicy(snapshot_every=1000))
    for i, (streams, rows) in enumerate([(6, 1), (6, 5), (4, 7), (6, 3)]):
        assert runner.observe(batch(streams, rows, 10.0 * (i + 1), seed=i)).accepted == streams * rows
    # with one more stream the oldest are evicted (their records then reflect calls still in the journal)
    runner.observe(batch(7, 2, 100.0, seed=9).filter(pl.col("stream") != "s0"))
    assert rounds == [1, 5, 7, 3, 2]
    copy_store(db, tmp_path / "copy.db")
    runner.close()
    # the replay steps the same rounds, streams already written riding along from neutral states
    replayed = OnlineRunner(encoder(), SQLiteStore(tmp_path / "copy.db"), CHANNELS, COVARIATES, capacity=7,
                            learning=learning)
    assert replayed.seq == 5 and rounds[5:] == [1, 5, 7, 3, 2]
    replayed.close()


def test_prefill_reads_per_piece_not_per_round(monkeypatch):
    values_unchecked(monkeypatch)
    counts = []
    for rows in (16, 200):
        mode = HostReads(refuse=False)
        guard_stepping(monkeypatch, lambda mode=mode: mode)
        runner = OnlineRunner(encoder(), MemoryStore(), CHANNELS, COVARIATES, capacity=8)
        runner.observe(batch(8, rows, 0.0, seed=rows))
        counts.append(len(mode.seen))
    assert counts[0] == counts[1] > 0


# ------------------------------------------------------------------------------------------------------------------
# on a CUDA device (run by hand: pytest -m gpu tests/streaming/test_sync_free.py)


class SyncDebug:
    """``torch.cuda.set_sync_debug_mode(mode)`` inside the block, as it was after."""

    def __init__(self, mode: str):
        self.mode = mode

    def __enter__(self):
        self.before = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(self.mode)

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(self.before)


def syncs_of(fn) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with SyncDebug("warn"):
            fn()
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.gpu
@pytest.mark.parametrize("learning", [None, LearnConfig(history=8, context=4, min_context=1)])
def test_cuda_stepping_never_synchronizes(monkeypatch, tmp_path, learning):
    """Every round of every stepped call, and of the journal replay, with the sync debug mode at "error"."""
    monkeypatch.delenv("GDN2TS_CHECK_VALUES", raising=False)
    calls = [(6, 1), (6, 5), (4, 7), (300, 3)]
    parts = [batch(s, r, 10.0 * (i + 1), seed=i) for i, (s, r) in enumerate(calls)]
    # the same calls on the CPU, to check that the CUDA run stepped what it should
    cpu = OnlineRunner(encoder(), MemoryStore(), CHANNELS, COVARIATES, capacity=300, learning=learning)
    for part in parts:
        cpu.observe(part)
    runner = OnlineRunner(encoder("cuda"), SQLiteStore(tmp_path / "s.db"), CHANNELS, COVARIATES, capacity=300,
                          learning=learning, policy=CommitPolicy(snapshot_every=1000))
    runner.observe(parts[0])  # unguarded: compiles the kernels
    rounds = guard_stepping(monkeypatch, lambda: SyncDebug("error"))
    for part in parts[1:]:
        runner.observe(part)
    assert rounds == [5, 7, 3]
    ids = [f"s{i}" for i in range(300)]
    assert_close("forecast", quantiles(runner.forecast(ids)), quantiles(cpu.forecast(ids)), torch.float32)
    copy_store(tmp_path / "s.db", tmp_path / "copy.db")
    runner.close()
    replayed = OnlineRunner(encoder("cuda"), SQLiteStore(tmp_path / "copy.db"), CHANNELS, COVARIATES,
                            capacity=300, learning=learning)
    assert replayed.seq == 4 and rounds[3:] == [1, 5, 7, 3]
    replayed.close()


@pytest.mark.gpu
def test_cuda_observe_syncs_per_call_not_per_round(monkeypatch):
    """A whole observe call (load, gather, rounds, commit, scatter): as many syncs for 7 rounds as for 2, and for
    a prefill of 256 rounds as for one of 16."""
    monkeypatch.delenv("GDN2TS_CHECK_VALUES", raising=False)
    runner = OnlineRunner(encoder("cuda"), MemoryStore(), CHANNELS, COVARIATES, capacity=64)
    calls = iter(range(1, 100))

    def observe(rows: int) -> None:
        k = next(calls)
        assert runner.observe(batch(64, rows, 1000.0 * k, seed=k)).accepted == 64 * rows

    # every shape once first (streams resident, kernels compiled for each), then the counted calls
    for rows in (1, 2, 7, 16, 256):
        observe(rows)
    stepped = [syncs_of(lambda r=r: observe(r)) for r in (2, 7)]
    prefilled = [syncs_of(lambda r=r: observe(r)) for r in (16, 256)]
    assert stepped[0] == stepped[1], stepped
    assert prefilled[0] == prefilled[1], prefilled


@pytest.mark.gpu
def test_cuda_prefill_equals_stepping(monkeypatch):
    monkeypatch.delenv("GDN2TS_CHECK_VALUES", raising=False)
    part = batch(50, 120, 0.0, seed=3)
    out = []
    for prefill in (True, False):
        runner = OnlineRunner(encoder("cuda"), MemoryStore(), CHANNELS, COVARIATES, capacity=50)
        if not prefill:
            runner.stepper.plan = stepped
        runner.observe(part)
        out.append(quantiles(runner.forecast([f"s{i}" for i in range(50)])))
    assert_close("forecast", out[0], out[1], torch.float32)
