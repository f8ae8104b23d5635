"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    exec(compile(BLOCKS[index], f"README.md example {index + 1}", "exec"), {})


def test_readme_states_the_two_ci_commands():
    for marker in ("<!-- ci:install -->", "<!-- ci:test -->"):
        after = README.split(marker, 1)[1]
        assert re.match(r"\s*```bash\n[^\n]+\n```", after), marker
