"""The package's import graph is layered (pyproject's [tool.importlinter] contract): the
commands on top, errors at the bottom, no cycle. import-linter (grimp) reads every import,
lazy ones inside functions too."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT = str(Path(sys.executable).with_name("lint-imports"))


def _contract() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT, "--config", str(cwd / "pyproject.toml"), "--no-cache"], cwd=cwd,
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(cwd)})


def test_every_module_has_a_layer():
    """A module left out of the contract would be unconstrained."""
    listed = {m.strip() for layer in _contract()["layers"] for m in layer.replace(":", "|").split("|")}
    modules = {f"distil.{p.stem}" for p in (ROOT / "distil").glob("*.py") if p.stem != "__init__"}
    assert modules == listed


def test_the_layers_are_kept(tmp_path):
    r = _lint(ROOT)
    assert r.returncode == 0 and "1 kept, 0 broken" in r.stdout, r.stdout + r.stderr
    # the check can fail: a copy of the package where errors.py reaches up into the command line
    shutil.copytree(ROOT / "distil", tmp_path / "distil", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / "distil" / "errors.py", "a") as f:
        f.write("\n\ndef _upward():\n    from distil.cli import main\n    return main\n")
    r = _lint(tmp_path)
    assert r.returncode == 1 and "distil.errors -> distil.cli" in r.stdout, r.stdout + r.stderr
