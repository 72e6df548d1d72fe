"""Layout rules import-linter cannot check (AST only, no imports, no processes): product modules stay
small, and no product module reaches into another top-level package's private names.

Who may import whom is checked by ``lint-imports`` (``[tool.importlinter]`` in pyproject.toml; ``make
test`` runs it first). Each allow-list below holds today's offenders and only shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("actor", "learner", "services", "fleetloop", "bench")
MAX_LINES = 450

#: modules allowed over MAX_LINES (none: keep it that way; split a module by role before it grows past)
LONG_ALLOWED: set[str] = set()

#: (importing module, imported module, private name) allowed (none)
PRIVATE_ALLOWED: set[tuple[str, str, str]] = set()


def product_modules() -> list[Path]:
    """Every product module, generated protobuf code (``*_pb2*.py``, made by ``make``) left out."""
    return sorted(p for top in PRODUCT for p in (ROOT / top).rglob("*.py") if "_pb2" not in p.name)


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_product_modules_are_found():
    found = {rel(p) for p in product_modules()}
    assert {"services/cli/__init__.py", "services/control/api.py", "services/harness/demo.py", "bench/cli.py",
            "fleetloop/config_files.py"} <= found


def test_no_product_module_over_450_lines():
    long = {rel(p): n for p in product_modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    offenders = {path: n for path, n in long.items() if path not in LONG_ALLOWED}
    assert not offenders, f"modules over {MAX_LINES} lines (split them by role): {offenders}"


def private_imports(name: str, source: str) -> set[tuple[str, str, str]]:
    """``from X import _name`` in module ``name`` (a path like ``services/cli/__init__.py``) where X is
    another top-level product package."""
    own = name.split("/")[0]
    found = set()
    for node in ast.walk(ast.parse(source, filename=name)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            top = node.module.split(".")[0]
            if top in PRODUCT and top != own:
                found |= {(name, node.module, a.name) for a in node.names if a.name.startswith("_")}
    return found


def test_no_private_names_imported_across_packages():
    found = set().union(*(private_imports(rel(p), p.read_text()) for p in product_modules()))
    offenders = sorted(found - PRIVATE_ALLOWED)
    assert not offenders, f"private names imported from another package (make them public or use the public API): {offenders}"


def test_the_private_import_check_sees_the_pattern():
    """Another package's private name is found (also inside a function); a package's own private
    names, public names and relative imports are not."""
    source = ("from services.control.api import create_app\n"
              "from services.cli.common import _x\n"
              "from . import _y\n"
              "def f():\n    from learner.checkpoint import _load_one, load\n")
    assert private_imports("services/harness/probe.py", source) == {
        ("services/harness/probe.py", "learner.checkpoint", "_load_one")}


def test_test_module_names_are_unique():
    """tests/unit and tests/integration have no __init__.py, so pytest imports test modules by their
    base name: two files with one name in different folders break collection of the whole suite."""
    seen: dict[str, Path] = {}
    clashes = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        if path.name in seen and not (path.parent / "__init__.py").exists():
            clashes.append(f"{seen[path.name].relative_to(ROOT)} and {path.relative_to(ROOT)}")
        seen.setdefault(path.name, path)
    assert not clashes, clashes
