"""The ``gdn2ts`` command: the example and the CPU benchmark run and report."""

from __future__ import annotations

import json

from gdn2ts.cli import main


def test_example_runs_and_checks(capsys):
    main(["example"])
    out = capsys.readouterr().out
    assert "chunk_gdn2 vs token loop" in out and "step-by-step vs parallel" in out


def test_bench_cpu_writes_json(tmp_path):
    path = tmp_path / "bench.json"
    main(["bench", "cpu", "--batch", "2", "--seq_len", "70", "--heads", "2", "--head_dim", "8", "--repeats", "1",
          "--json", str(path), "--quiet", "true"])
    record = json.loads(path.read_text())
    assert record["shape"] == {"B": 2, "T": 70, "H": 2, "K": 8, "V": 8, "dtype": "float32"}
    assert record["agreement_rel_error"] < 1e-4
    for key in ("forward_ms", "forward_backward_ms"):
        assert set(record[key]) == {"chunked", "token_loop"} and all(v > 0 for v in record[key].values())
    assert record["environment"]["torch"]
