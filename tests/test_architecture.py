"""The package's shape (docs/architecture.md): layers that import downwards
only, no private name used outside its module, modules and functions of a
readable size, and the public API in ``deepmask_cli.__all__``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import deepmask_cli

PACKAGE = Path(deepmask_cli.__file__).parent
ROOT = PACKAGE.parent
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
#: where functions are held to MAX_FUNCTION_LINES: the orchestration layers,
#: whose long functions hid several jobs
SHORT_FUNCTIONS = ("pipeline", "training", "cli")


def _rel(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_no_module_is_over_400_lines(path):
    assert path.read_text().count("\n") <= MAX_MODULE_LINES


def test_no_function_is_over_80_lines_in_pipeline_training_and_cli():
    long = []
    for path in MODULES:
        if _rel(path).split("/")[0] not in SHORT_FUNCTIONS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{_rel(path)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _defined_here(tree: ast.AST) -> set[str]:
    """Names a module defines: functions, classes, assignments (also of attributes)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def test_no_private_name_crosses_a_module():
    """No ``from x import _name``, and no ``obj._name`` whose ``_name`` this
    module does not define (``self._x`` and a private name of the same
    module's class on another instance are its own business)."""
    crossing = []
    for path in MODULES:
        tree = ast.parse(path.read_text())
        here = _defined_here(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                crossing += [f"{_rel(path)}:{node.lineno} imports {a.name} from {node.module}"
                             for a in node.names if _private(a.name)]
            elif isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in here:
                crossing.append(f"{_rel(path)}:{node.lineno} uses .{node.attr}")
    assert not crossing


def test_the_public_api_is_declared():
    names = {"load_proposer", "Proposer", "Proposals", "ModelConfig", "InferenceConfig", "TrainConfig",
             "build_model", "load_weights", "save_weights", "run_propose"}
    assert names <= set(deepmask_cli.__all__)
    for name in deepmask_cli.__all__:
        assert getattr(deepmask_cli, name).__doc__, f"deepmask_cli.{name} has no docstring"


def test_the_import_contracts_hold():
    """pyproject.toml's import-linter contracts: the layers, no circle, click only in cli."""
    exe = Path(sys.executable).parent / "lint-imports"
    r = subprocess.run([str(exe) if exe.exists() else "lint-imports", "--no-cache"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout[-3000:]
