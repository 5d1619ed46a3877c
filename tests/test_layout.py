"""The library core never imports the experiments: only the CLI (which dispatches `ccmem eval`) may reach
``ccmem.evaluation``, and nothing in ``src/ccmem`` imports ``benchmarks``."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "ccmem"


def _imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved against its package)."""
    pkg = ["ccmem", *path.relative_to(SRC).parent.parts]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out |= {mod} | {f"{mod}.{a.name}" for a in node.names}
    return out


def test_core_never_imports_the_experiments():
    offenders = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        if rel.parts[0] == "evaluation" or rel == Path("cli.py"):
            continue
        bad = sorted(m for m in _imports(path) if m.startswith(("ccmem.evaluation", "benchmarks")))
        if bad:
            offenders[str(rel)] = bad
    assert not offenders, offenders


def test_the_import_scan_sees_relative_imports():
    """The scan resolves ``from .evaluation import x`` and ``from ..evaluation.core import y``."""
    assert "ccmem.evaluation.runner" in _imports(SRC / "cli.py")
    assert "ccmem.memory" in _imports(SRC / "evaluation" / "core.py")
