#!/usr/bin/env bash
# The GPU benchmark: bert-base teacher (12 x 768, 12 heads, FFN 3072, vocab 30522) -> 6-layer
# student, fp16, DeepSpeed ZeRO-2 at world size 1, seq 128 and 512, both recipes.
# On a machine whose Python has CUDA torch + transformers; wheels for what it lacks may be in
# .whl/ (installed into /tmp/site). Results: one JSON per case in ${OUT:-bench/out}.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/out}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCH_EXTENSIONS_DIR=/tmp/torch_ext
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
# VARIANTS: a --variants list (default: all three).
shape="--variants ${VARIANTS:-fast-deepspeed,fast-torch,reference} --teacher-layers 12 --student-layers 6 --hidden 768 --heads 12 --vocab 30522 --precision fp16 --device cuda --steps ${STEPS:-20} --warmup 5"
# TAR: also append each case's JSON to this tar file (one file to carry back).
# CASES: "recipe seq batch extra-flags" lines; by default both recipes at seq 128 and 512.
CASES=${CASES:-"distilbert 128 128
distilbert 512 32
masked 128 128
masked 512 32"}
echo "$CASES" | while read -r recipe seq batch extra; do
    name="gpu_${recipe}_seq${seq}_b${batch}$(echo "$extra" | tr -c 'a-z0-9\n' '_' | sed 's/^_*/_/;s/_*$//;s/^_$//')"
    python3 -m bench.step $shape --seq "$seq" --batch "$batch" --recipe "$recipe" $extra --json > "$out/$name.json" \
      2> "/tmp/$name.err" || { echo "FAILED $name"; cp "/tmp/$name.err" "$out/"; tail -20 "/tmp/$name.err"; continue; }
    [ -n "${TAR:-}" ] && tar -rf "$TAR" -C "$out" "$name.json"
    python3 - "$out/$name.json" <<'PY'
import json, sys
from bench.step import format_report
print(format_report(json.load(open(sys.argv[1]))))
PY
done
