"""The code's style is checked, not hoped for: ruff's formatter and linter (configured in
pyproject.toml) find nothing, and a module that imports inside functions says why at its top."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

RUFF = str(Path(sys.executable).with_name("ruff"))
TREES = ["distil", "tests", "bench", "scripts", "jobs"]


def test_ruff_finds_nothing():
    lint = subprocess.run([RUFF, "check", "--no-cache", *TREES], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert lint.returncode == 0, lint.stdout[-4000:] + lint.stderr
    fmt = subprocess.run(
        [RUFF, "format", "--check", "--no-cache", *TREES], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert fmt.returncode == 0, "run `ruff format`: " + fmt.stdout[-4000:] + fmt.stderr


def test_imports_inside_functions_say_why():
    """A file's top says what it depends on; where an import waits for the function that needs it
    (start-up time, an optional dependency), a comment above the imports says so."""
    silent = []
    for path in sorted((ROOT / "distil").rglob("*.py")):
        text = path.read_text()
        lazy = any(
            isinstance(sub, (ast.Import, ast.ImportFrom))
            for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            for sub in ast.walk(node)
        )
        if lazy and "# Imports inside functions: " not in text:
            silent.append(str(path.relative_to(ROOT)))
    assert not silent, silent
