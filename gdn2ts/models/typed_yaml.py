"""One loader of typed YAML configs: a file read into a (nested, frozen) dataclass by jsonargparse, the parser the
command line uses, so a recipe means the same read by ``load_*`` or given as ``--config`` to a command.

Its users: the stream recipes (:func:`gdn2ts.apps.train_recipe.load_recipe`, the quickstart's) and the LM training
recipes (:func:`gdn2ts.lm.train_recipe.load_train_recipe`).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["load_typed"]


def load_typed(cls, path: str | Path, what: str = "recipe"):
    """An instance of the dataclass ``cls`` from a YAML file, typed and validated by jsonargparse: an unknown key,
    a missing required one or a value of the wrong type is a ``ValueError`` naming it (and the file), as are the
    dataclass's own checks.

    Example:
        >>> import tempfile
        >>> from dataclasses import dataclass
        >>> @dataclass(frozen=True)
        ... class Run:
        ...     steps: int = 1
        ...     name: str = "a"
        >>> with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        ...     _ = f.write("steps: 3\\n")
        >>> load_typed(Run, f.name)
        Run(steps=3, name='a')
    """
    import yaml
    from jsonargparse import ArgumentParser

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} does not exist")
    parser = ArgumentParser(exit_on_error=False)
    # the key names the group in jsonargparse's messages: "Group 'recipe' does not accept option 'data.x'"
    parser.add_class_arguments(cls, "recipe")
    try:
        cfg = parser.parse_object({"recipe": yaml.safe_load(path.read_text()) or {}})
        return parser.instantiate(cfg).recipe
    except Exception as e:  # jsonargparse's parse errors, and the dataclass's own checks
        raise ValueError(f"{what} {str(path)!r}: {e}") from None
