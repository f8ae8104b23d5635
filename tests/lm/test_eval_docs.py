"""docs/lm-eval.md: its Python examples run as written, and its commands name recipes that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGE = (ROOT / "docs" / "lm-eval.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", PAGE, flags=re.S)


def test_page_has_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs(index, monkeypatch):
    monkeypatch.chdir(ROOT)
    exec(compile(BLOCKS[index], f"docs/lm-eval.md example {index + 1}", "exec"), {})


def test_documented_mqar_recipes_exist():
    named = set(re.findall(r"tasks/lm/mqar/(\w+)\.yaml", PAGE))
    assert named >= {"tiny", "paper"}
    assert all((ROOT / "tasks" / "lm" / "mqar" / f"{name}.yaml").is_file() for name in named)
