"""The streaming benchmark runs end to end on a tiny setting and records what it claims."""

from __future__ import annotations

import json

from gdn2ts.bench.streaming import bench_streaming


def test_bench_streaming_records_both_models(tmp_path):
    out = tmp_path / "bench.json"
    record = bench_streaming(streams=(1, 40), calls=2, single_calls=3, hidden=16, head_dim=8, channels=2,
                             scale=(), json_path=str(out), quiet=True)
    assert json.loads(out.read_text()) == record
    rows = {(r["model"], r["streams"]): r for r in record["results"]}
    assert set(rows) == {("gdn2", 1), ("gru", 1), ("gdn2", 40), ("gru", 40)}
    for r in rows.values():
        assert r["observations"] == r["streams"] * r["calls"] and r["obs_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"]
    # equal state per stream by construction: the GRU's state per layer is the GDN-2 layer's
    assert rows["gdn2", 40]["state_bytes_per_stream"] == rows["gru", 40]["state_bytes_per_stream"]
    assert rows["gdn2", 40]["speedup_over_gru"] > 0


def test_bench_streaming_command(tmp_path, capsys):
    from gdn2ts.cli import main

    out = tmp_path / "b.json"
    main(["bench", "streaming", "--streams", "[3]", "--calls", "2", "--scale", "[[40, 40, 3], [200, 16, 2]]",
          "--batch", "16", "--json", str(out)])
    record = json.loads(out.read_text())
    assert [r["model"] for r in record["results"]] == ["gdn2", "gru"] and record["env"]["threads"] == 1
    printed = capsys.readouterr().out
    assert "online runner, durability on" in printed and "streams through the working set" in printed
    memory, spilled = record["scale"]
    assert (memory["streams"], memory["capacity"], spilled["streams"], spilled["capacity"]) == (40, 40, 200, 16)
    assert [p["calls"] for p in spilled["passes"]] == [13, 13] and spilled["reload_calls"] == 13
    # the spilled case went through the store: its records outnumber the working set, and its memory is its own
    assert spilled["store_mb"] > 0 and spilled["rss_peak_mb"] > 0 and spilled["ratio_to_first"] > 0
