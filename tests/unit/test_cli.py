"""The command line as a script sees it: `--version`, help on every flag, and a result on
stdout with nothing else before it."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from distil import cli


def _parsers(parser: argparse.ArgumentParser, path: str = "distil"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, f"{path} {name}")


def test_version(capsys):
    from importlib.metadata import version

    try:
        cli.main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert capsys.readouterr().out.strip() == f"distil {version('distil-run')} (distil-run)"


def test_every_flag_and_command_has_help(monkeypatch):
    from bench import step as bench

    bench_parser = []
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", lambda self, argv=None: bench_parser.append(self))
    bench.parse_args([])
    parsers = [*_parsers(cli.build_parser()), ("python -m bench.step", bench_parser[0])]
    missing = [
        f"{path} {'/'.join(a.option_strings) or a.dest}"
        for path, p in parsers
        for a in p._actions
        if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not a.help
    ]
    assert missing == []


GUARDED = """
import json, os
from distil.quiet import result_only_on_stdout
with result_only_on_stdout():
    print("a library's line")                     # through sys.stdout
    os.write(1, b"a C library's line\\n")          # straight to file descriptor 1
print(json.dumps({"ok": True}))
"""


def test_result_only_on_stdout():
    r = subprocess.run([sys.executable, "-c", GUARDED], capture_output=True, text=True, check=True)
    assert r.stdout == json.dumps({"ok": True}) + "\n"
    assert "a library's line" in r.stderr and "a C library's line" in r.stderr


def test_the_run_summary_rounds_its_wall_time_before_splitting_it():
    """59.96 s is 0:01:00.0 -- it printed 0:00:60.0 -- and a probe's row count is no measure."""
    from distil.runs.metrics_log import summary_lines

    result = {
        "start": {"probe/rows": 3000, "eval/agreement": 0.5},
        "end": {"probe/rows": 3000, "eval/agreement": 0.75},
        "wall_s": 59.96,
        "step": 8,
        "tokens": 1000,
        "steps_run": 8,
        "tokens_per_s": 16.7,
    }
    lines = summary_lines(result)
    assert lines[1] == "  this start: 8 steps in 0:01:00.0 (h:mm:ss), 17 tokens/s mean"
    assert lines[2:] == ["  held-out agreement          start 0.5000 -> end 0.7500 (higher is better)"]
