"""Peak memory of tokenizing a corpus whose only document is one long line (a dump without
newlines): read (distil/data/corpus.py), tokenized and packed (distil/data/sequences.py) in a fresh process, its peak RSS (ru_maxrss) and time.

    .venv/bin/python bench/long_line.py --mb 110 --packing lines
    .venv/bin/python bench/long_line.py --mb 20 --packing lines --code /path/to/an/older/checkout

The line is made of the committed Brown sample (tests/assets, data/brown) repeated; the
tokenizer is the demo teacher's (models/all-MiniLM-L6-v2, a BERT WordPiece). `--code` runs
another checkout's distil (to compare with the code before a change).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
from transformers import AutoTokenizer
from distil.data import corpus
from distil.data.sequences import Packer, token_ids, tokenizer_spec
text_path, tok_path, packing, cache = sys.argv[1:5]
tok = AutoTokenizer.from_pretrained(tok_path)
spec = tokenizer_spec(tok)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
packer, n = Packer(tok.cls_token_id, tok.sep_token_id, 128, packing, 8), 0
for r in corpus.file_ranges(text_path, __import__("os").path.getsize(text_path), False, corpus.Reading()):
    n += len(packer(*token_ids(spec, corpus.read(r, corpus.Reading())))[1])
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"sequences": n, "seconds": dt, "peak_rss_mib": peak / 1024, "rss_before_mib": base / 1024}))
"""


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=110.0, help="size of the single line in MB")
    ap.add_argument("--packing", choices=["pack", "lines"], default="lines")
    ap.add_argument("--code", default=str(ROOT), help="checkout whose distil/ is measured")
    ap.add_argument("--tokenizer", default=str(ROOT / "models" / "all-MiniLM-L6-v2"))
    args = ap.parse_args(argv)
    sample = " ".join((ROOT / "tests" / "assets" / "en_brown_800.txt").read_text().split())
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "one_line.txt"
        target = int(args.mb * 1e6)
        with open(text, "w", encoding="utf-8") as f:
            written = 0
            while written < target:
                f.write(sample + " ")
                written += len(sample) + 1
        env = {**os.environ, "PYTHONPATH": args.code, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        r = subprocess.run(
            [sys.executable, "-c", CHILD, str(text), args.tokenizer, args.packing, str(Path(tmp) / "cache")],
            capture_output=True,
            text=True,
            env=env,
            cwd=args.code,
        )
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    result = {
        "mb": args.mb,
        "packing": args.packing,
        "code": args.code,
        **json.loads(r.stdout.strip().splitlines()[-1]),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
