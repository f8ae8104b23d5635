"""OnlineRunner.learned_through: the newest forecast origin learned from, per stream, as learn moves it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gdn2ts.models import EncoderConfig, StreamEncoder
from gdn2ts.streaming import MemoryStore, OnlineRunner
from gdn2ts.streaming.learn import LearnConfig
from gdn2ts.streaming.runner import UnknownStreamError

H = 3


def runner(learning=True):
    torch.manual_seed(0)
    enc = StreamEncoder(EncoderConfig(n_channels=1, hidden_size=8, num_heads=1, head_dim=4, horizon=H)).double()
    cfg = LearnConfig(history=16, context=8, min_context=0, target_tolerance=0.0) if learning else None
    return OnlineRunner(enc, MemoryStore(), ["x"], learning=cfg)


def rows(stream, times):
    return [{"stream": stream, "time": float(t), "x": math.sin(t)} for t in times]


def test_learned_through_follows_the_newest_matured_origin():
    r = runner()
    r.observe(rows("a", range(1, 3)) + rows("b", range(1, 8)))
    assert r.learned_through(["a", "b"]).tolist() == [-math.inf, -math.inf]
    r.learn(["a", "b"])
    # a: nothing has matured (origin 1 needs rows up to 4); b: origins up to 7 - 3 = 4
    assert r.learned_through(["a", "b"]).tolist() == [-math.inf, 4.0]
    r.observe(rows("a", range(3, 10)))
    r.learn(["a"])
    got = r.learned_through(["b", "a"])
    assert got.dtype == np.float64 and got.tolist() == [4.0, 6.0]
    # every origin learned from has its whole horizon observed
    assert got[1] + H <= 9.0


def test_learned_through_refusals():
    r = runner()
    r.observe(rows("a", [1.0]))
    with pytest.raises(UnknownStreamError, match="'zz'"):
        r.learned_through(["zz"])
    with pytest.raises(ValueError, match="does not learn"):
        runner(learning=False).learned_through(["a"])
