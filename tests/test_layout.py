"""The code's own rules, checked on its source: shared code is public, modules stay readable."""

from __future__ import annotations

import ast
from pathlib import Path

GBLM = Path(__file__).resolve().parents[1] / "gblm"


def _modules() -> list[Path]:
    return sorted(GBLM.rglob("*.py"))


def test_no_module_imports_a_private_name_of_another():
    """A name two modules share is public: ``from gblm.x import _y`` never appears."""
    found = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gblm"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                private = [n for n in private if not n.startswith("__")]
                found += [f"{path.relative_to(GBLM)}: {node.module}.{n}" for n in private]
    assert not found, found


def test_no_module_is_over_450_lines():
    long = {
        str(p.relative_to(GBLM)): n
        for p in _modules()
        if (n := len(p.read_text().splitlines())) > 450
    }
    assert not long, long
