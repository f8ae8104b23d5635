"""A local lm-evaluation-harness task for the tests: multiple choice over JSON lines in a temporary folder."""

from __future__ import annotations

import json
from pathlib import Path


def write_choice_task(folder: Path, rows: list[dict], name: str = "tiny_choice") -> Path:
    """Write ``rows`` (``{"q", "choices", "label"}``) and a task YAML named ``name`` reading them into ``folder``
    (the harness's ``include_path``); returns the folder."""
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / f'{name}.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    return folder
