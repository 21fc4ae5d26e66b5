"""The package's folders are its layers (pyproject's [tool.importlinter] contract): the command
on top, its rooms below it, the basics (errors) at the bottom; each room imports only the rooms
below it. import-linter (grimp) reads every import, lazy ones inside functions too. Within a
room, modules import each other, without a cycle."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
LINT = str(Path(sys.executable).with_name("lint-imports"))


def _contract() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [LINT, "--config", str(cwd / "pyproject.toml"), "--no-cache"],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(cwd)},
    )


def test_every_module_is_in_a_room_of_the_contract():
    """A module outside every listed room would be unconstrained; a listed room with no folder
    (or module) would be a layer that says nothing."""
    listed = {m.strip().removeprefix("distil.") for layer in _contract()["layers"] for m in layer.split("|")}
    rooms = {p.name for p in (ROOT / "distil").iterdir() if (p / "__init__.py").is_file()}
    modules = {p.stem for p in (ROOT / "distil").glob("*.py") if p.stem != "__init__"}
    assert rooms | modules == listed
    assert not any(
        p.is_dir() and not (p / "__init__.py").exists() and p.name not in ("chart", "__pycache__")
        for p in (ROOT / "distil").iterdir()
    )  # a folder of modules is a room, with its docstring
    assert all(len((ROOT / "distil" / r / "__init__.py").read_text().strip()) > 40 for r in rooms)


def test_no_module_imports_in_a_cycle():
    """Within a room the contract does not order modules: no module may reach itself again."""
    import ast

    graph: dict[str, set[str]] = {}
    for path in (ROOT / "distil").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        graph[module] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("distil"):
                graph[module] |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    graph = {m: {d for d in deps if d in graph and d != m and d != "distil"} for m, deps in graph.items()}
    seen, stack, cycles = set(), [], []

    def visit(m: str) -> None:
        if m in stack:
            cycles.append(stack[stack.index(m) :] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for d in sorted(graph[m]):
            visit(d)
        stack.pop()

    for m in sorted(graph):
        visit(m)
    assert not cycles, cycles


def test_the_layers_are_kept(tmp_path):
    r = _lint(ROOT)
    assert r.returncode == 0 and "1 kept, 0 broken" in r.stdout, r.stdout + r.stderr
    # the check can fail: a copy of the package where errors.py reaches up into the command line
    shutil.copytree(ROOT / "distil", tmp_path / "distil", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / "distil" / "storage" / "paths.py", "a") as f:
        f.write("\n\ndef _upward():\n    from distil.runs.layout import LATEST\n    return LATEST\n")
    r = _lint(tmp_path)
    assert r.returncode == 1 and "distil.storage.paths -> distil.runs.layout" in r.stdout, r.stdout + r.stderr
