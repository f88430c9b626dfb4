"""The package layering: imports only point down (README's Layout), module-level and function-level alike.

errors, utils, training at the bottom; then data; then autoencoder and text (which may use data but not each
other); then diffusion; then the masked transformer (maskgit, which uses the DiT's blocks); then curation and
evaluation (not each other); the annotation app; then the miniature
(emu/mini) and demo on top. The real system (everything but emu/mini and emu/demo, and the entry points) reaches the
miniature only through configs (``_target_``, named sets), never by import.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

LAYERS = [("errors", "paper"), ("utils",), ("training",), ("data",), ("autoencoder", "text"), ("diffusion",),
          ("maskgit",), ("curation", "evaluation", "export", "plan"), ("annotate",), ("mini",), ("demo",)]  # fmt: skip
MINIATURE = ("mini", "demo")  # the only packages that may import emu.mini
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def package_of(path: Path) -> str:
    """``emu/<package>/...`` or ``emu/<module>.py`` -> its top-level name under ``emu``."""
    parts = path.relative_to(ROOT / "emu").with_suffix("").parts
    return parts[0]


def emu_imports(path: Path, root: Path = ROOT) -> set[str]:
    """The top-level ``emu`` packages a file under ``root/emu`` imports, anywhere in it (functions included; relative
    imports and ``importlib.import_module("emu....")`` strings too)."""
    here = ["emu", *path.relative_to(root / "emu").parent.parts]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names = [module] + ([f"{module}.{a.name}" for a in node.names] if module == "emu" else [])
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            names = [a.value for a in node.args[:1] if isinstance(a, ast.Constant) and isinstance(a.value, str)]
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
        f"{pkg} -> {dep}" for pkg, deps in import_graph().items() for dep in deps if RANK.get(dep, 99) >= RANK[pkg]
    )
    assert not upward, f"imports that point up or sideways: {', '.join(upward)}"


def test_the_checker_sees_function_level_relative_and_string_imports(tmp_path):
    f = tmp_path / "emu" / "data" / "m.py"
    f.parent.mkdir(parents=True)
    f.write_text("import os\nfrom emu.data import haystack\nfrom . import sources\nfrom ..text import clip\n\n"
                 "def g():\n    from emu.evaluation.fid import x\n    import emu.autoencoder.model\n"
                 "    from .. import curation\n    importlib.import_module('emu.demo.report')\n")  # fmt: skip
    assert emu_imports(f, tmp_path) == {"data", "text", "evaluation", "autoencoder", "curation", "demo"}


def test_only_the_miniature_and_the_demo_import_the_miniature():
    """Nothing of the real system imports ``emu.mini``: not a package, not an entry point, not a benchmark."""
    files = [p for p in sorted((ROOT / "emu").rglob("*.py")) if package_of(p) not in MINIATURE]
    scripts = sorted(ROOT.glob("*.py")) + sorted((ROOT / "bench").rglob("*.py"))
    offenders = [p.relative_to(ROOT).as_posix() for p in files if "mini" in emu_imports(p)]
    offenders += [p.relative_to(ROOT).as_posix() for p in scripts if "mini" in script_imports(p)]
    assert not offenders, f"the real system imports emu.mini: {offenders} (name it in a config instead)"


def script_imports(path: Path) -> set[str]:
    """The top-level ``emu`` packages a script outside ``emu/`` imports (absolute imports and import_module strings)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + ([f"emu.{a.name}" for a in node.names] if node.module == "emu" else [])
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            names = [a.value for a in node.args[:1] if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        out |= {n.split(".")[1] for n in names if n.startswith("emu.")}
    return out


def test_the_miniature_check_sees_a_script_and_a_package_importing_it(tmp_path):
    f = tmp_path / "emu" / "evaluation" / "m.py"
    f.parent.mkdir(parents=True)
    f.write_text("def g():\n    from emu.mini.judge import PixelJudge\n")
    assert "mini" in emu_imports(f, tmp_path)
    script = tmp_path / "run.py"
    script.write_text("import emu.mini.haystack\nfrom emu import mini\n")
    assert script_imports(script) == {"mini"}
