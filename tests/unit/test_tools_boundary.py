"""The core never imports `orchestrator.tools`; the CLI imports it only inside subcommand functions."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORE = ("orchestrator", "rollout", "learner", "buffer")


def _tools_imports(tree: ast.AST) -> list[ast.AST]:
    hits = []
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if any(n == "orchestrator.tools" or n.startswith("orchestrator.tools.") for n in names):
            hits.append(node)
        elif isinstance(node, ast.ImportFrom) and node.module == "orchestrator" and \
                any(a.name == "tools" for a in node.names):
            hits.append(node)
    return hits


def test_core_does_not_import_tools():
    files = [f for pkg in CORE for f in (ROOT / pkg).rglob("*.py")
             if "tools" not in f.relative_to(ROOT).parts and f != ROOT / "orchestrator" / "cli.py"]
    assert len(files) > 10
    bad = [f"{f.relative_to(ROOT)}:{n.lineno}" for f in files for n in _tools_imports(ast.parse(f.read_text()))]
    assert not bad, f"core modules import orchestrator.tools: {bad}"


def test_cli_imports_tools_only_inside_functions():
    tree = ast.parse((ROOT / "orchestrator" / "cli.py").read_text())
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) for n in ast.walk(f)}
    hits = _tools_imports(tree)
    assert len(hits) >= 4  # experiment, bench, report, trl-baseline
    assert all(id(n) in inside for n in hits)
