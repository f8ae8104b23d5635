"""The repository layout: no top-level folder shadows a real package, and imports only go downward."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gdn2ts"


@pytest.mark.parametrize("name", ["datasets", "kernels"])
def test_repo_root_does_not_shadow_installed_packages(tmp_path, name):
    """From the repository root (on sys.path first), ``import datasets`` / ``import kernels`` give the real
    package found later on the path, never the repository's folder."""
    fake = tmp_path / name
    fake.mkdir()
    (fake / "__init__.py").write_text("REAL = True\n")
    code = f"import {name}; print({name}.__file__); assert {name}.REAL"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path), "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(fake / "__init__.py")


def test_bare_kernels_import_without_a_real_package_fails_cleanly():
    # -S leaves site-packages off the path: transformers (the hf extra) brings PyPI's kernels package, which a bare
    # import from the root must find when it is installed (test above) and cleanly miss when it is not (here)
    out = subprocess.run([sys.executable, "-S", "-c", "import kernels"], cwd=ROOT, capture_output=True, text=True,
                         env={"PATH": ""})
    assert out.returncode != 0
    assert "No module named 'kernels'" in out.stderr


def test_datasets_folder_holds_no_python():
    assert not list((ROOT / "datasets").rglob("*.py"))


def test_kernels_install_as_gdn2ts_kernels():
    import gdn2ts.kernels

    assert Path(gdn2ts.kernels.__file__).resolve().parent == ROOT / "kernels"


# Lower layers never import higher ones; nothing in the core imports the training frameworks. The streaming library
# sits above the models and below its applications (quickstart, demos, probes, the stream command) in gdn2ts.apps;
# its scale-out on Ray (gdn2ts.distributed) sits between them, and the core never imports ray.
LAYERS = ["kernels", "ops", "layers", "models", "streaming", "distributed", "apps"]
CORE = ("kernels", "ops", "layers", "models", "streaming")
# the packages beside the layers (compat: other libraries' signatures over the ops): a layer below "apps" may import
# none of them
USERS = ("bench", "forecasting", "lm", "cli", "apps", "hf", "compat")
FRAMEWORKS = ("lightning", "pytorch_lightning", "pytorch_forecasting", "transformers")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "gdn2ts" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYERS or parts[1] in USERS else None


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_only_go_downward(layer):
    folder = ROOT / "kernels" if layer == "kernels" else PACKAGE / layer
    assert any(folder.rglob("*.py")), f"no modules under {folder}"
    for path in folder.rglob("*.py"):
        for module in _imports(path):
            target = _layer_of(module)
            if target in LAYERS:
                assert LAYERS.index(target) <= LAYERS.index(layer), f"{path}: {layer} imports {module}"
            elif target is not None:
                assert layer not in CORE, f"{path}: {layer} imports {module}, which sits above it"
            if layer in CORE:
                assert module.split(".")[0] not in FRAMEWORKS, f"{path}: core module imports {module}"
                assert module.split(".")[0] != "ray", f"{path}: core module imports {module}"


def test_import_rule_checker_catches_violations(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(textwrap.dedent("""
        from gdn2ts.layers import GatedDeltaNet2
        import lightning
    """))
    mods = _imports(bad)
    assert _layer_of("gdn2ts.layers") == "layers" and "lightning" in mods
    assert _layer_of("gdn2ts.apps.quickstart") == "apps" and _layer_of("gdn2ts.bench.common") == "bench"


def test_every_package_folder_is_installed():
    """pyproject lists packages explicitly (kernels/ is mapped); a new sub-package must be added there."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.relative_to(ROOT).parts[:-1]) for p in PACKAGE.rglob("__init__.py")}
    assert found | {"gdn2ts.kernels"} == listed
    assert config["package-dir"]["gdn2ts.kernels"] == "kernels"
