"""Every docstring example in the package runs as written."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import gdn2ts

MODULES = sorted(m.name for m in pkgutil.walk_packages(gdn2ts.__path__, "gdn2ts.")
                 if not m.name.startswith(("gdn2ts.kernels", "gdn2ts.bench.kernels", "gdn2ts.bench.profile")))


def test_modules_found():
    assert "gdn2ts.ops.gdn2" in MODULES and "gdn2ts.layers.gdn2" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
