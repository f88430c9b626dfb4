"""The package layering: imports only point down (DESIGN.md's layering), module-level and function-level alike.

errors, utils, training at the bottom; then data; then autoencoder and text (which may use data but not each
other); then diffusion; then curation and evaluation (not each other); demo on top.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

LAYERS = [("errors",), ("utils",), ("training",), ("data",), ("autoencoder", "text"), ("diffusion",),
          ("curation", "evaluation"), ("demo",)]  # fmt: skip
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def package_of(path: Path) -> str:
    """``emu/<package>/...`` or ``emu/<module>.py`` -> its top-level name under ``emu``."""
    parts = path.relative_to(ROOT / "emu").with_suffix("").parts
    return parts[0]


def emu_imports(path: Path) -> set[str]:
    """The top-level ``emu`` packages a file imports, anywhere in it (functions included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names] if node.module == "emu" else [])
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "emu" and len(parts) > 1:
                out.add(parts[1])
    return out


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / "emu").rglob("*.py")):
        if path.name == "__init__.py" and path.parent == ROOT / "emu":
            continue
        pkg = package_of(path)
        graph.setdefault(pkg, set()).update(emu_imports(path) - {pkg})
    return graph


def test_every_package_has_a_layer():
    assert set(import_graph()) <= set(RANK), f"add {sorted(set(import_graph()) - set(RANK))} to LAYERS"


def test_imports_only_point_down():
    upward = sorted(
        f"{pkg} -> {dep}" for pkg, deps in import_graph().items() for dep in deps if RANK.get(dep, -1) >= RANK[pkg]
    )
    assert not upward, f"imports that point up or sideways: {', '.join(upward)}"


def test_the_checker_sees_function_level_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\nfrom emu.data import haystack\n\ndef g():\n    from emu.evaluation.fid import x\n"
                 "    import emu.text.encoders\n    from emu import curation\n")  # fmt: skip
    assert emu_imports(f) == {"data", "evaluation", "text", "curation"}
