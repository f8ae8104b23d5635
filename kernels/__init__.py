"""Triton kernels for the GDN-2 op, installed as ``gdn2ts.kernels`` (kernels only: no ``torch.nn``, no state).

The folder sits at the top of the repository. When Python runs from the repository root, the root is on
``sys.path`` and a bare ``import kernels`` would find this folder before an installed package of that name.
Imported under that top-level name, this module hands the import on to the next ``kernels`` on ``sys.path``
(or raises ``ModuleNotFoundError``), so the repository never shadows a real package.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _rest)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(
            "No module named 'kernels' (the repository's kernels/ folder is importable only as gdn2ts.kernels)",
            name="kernels",
        )
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
