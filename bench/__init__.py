"""Benchmarks of distil-run (not shipped in the package): run them from the repository root,
e.g. `python -m bench.step --help`. Figures, with command, machine and versions: RESULTS.md."""
