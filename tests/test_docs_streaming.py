"""docs/streaming.md's walk from your own file to forecasts runs as written: every block marked ``<!-- walk -->``,
in order, in a fresh folder (the small recipe tasks/streaming/tiny.yaml in place of train.yaml, for speed)."""

from __future__ import annotations

import datetime as dt
import re
import shlex
from pathlib import Path

import polars as pl
import pytest
import torch

from gdn2ts.cli import main
from gdn2ts.models.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PAGE = (ROOT / "docs" / "streaming.md").read_text()
WALK = re.findall(r"<!-- walk -->\n```(bash|python)\n(.*?)```", PAGE, flags=re.S)


def _command(line: str) -> list[str]:
    args = shlex.split(line)
    assert args[0] == "gdn2ts", f"the walk's shell lines are gdn2ts commands, got {line!r}"
    args = [str(ROOT / "tasks/streaming/tiny.yaml") if a == "tasks/streaming/train.yaml" else a for a in args[1:]]
    return [str(ROOT / a) if a.startswith("tasks/") else a for a in args]


def test_the_walk_covers_train_stream_forecast_and_reset():
    commands = " ".join(code for kind, code in WALK if kind == "bash")
    for step in ("gdn2ts stream train", "gdn2ts stream --checkpoint", "gdn2ts stream forecast",
                 "gdn2ts stream reset"):
        assert step in commands, step
    assert [kind for kind, _ in WALK].count("python") >= 2 and "WALK_TABLE" not in PAGE


def test_the_walk_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for kind, code in WALK:
            if kind == "python":
                exec(compile(code, "docs/streaming.md walk", "exec"), {})
                continue
            for line in code.splitlines():
                if line.strip() and not line.startswith("#"):
                    main(_command(line))
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "2025-06-08" in out  # the Python step's forecast reaches a week past its observation
    ckpt = load_checkpoint(tmp_path / "air-model" / "model.safetensors")
    assert ckpt.time.kind == "date" and ckpt.encoder.config.horizon == 7
    week = pl.read_csv(tmp_path / "next-week.csv", try_parse_dates=True)
    assert week.schema["origin"] == pl.Date and week["origin"].unique().to_list() == [dt.date(2025, 5, 31)]
    assert set(week["channel"]) == {"pm25", "pm10", "no2"} and week.height == 7 * 3
    assert pl.read_csv(tmp_path / "forecast.csv").height == 7 * 3
    # the last step reset the stream: the store no longer knows it
    with pytest.raises(SystemExit, match="unknown streams \\['warsaw'\\]"):
        main(["stream", "forecast", "--checkpoint", "air-model/model.safetensors", "--store", "air.db",
              "--streams", "[warsaw]"])
