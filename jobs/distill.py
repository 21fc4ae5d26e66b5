"""Ray job entry point: `python jobs/distill.py --config configs/X.yaml [--set key=value ...]`.

Same as `distil train --ray`: Ray Train workers on the cluster in RAY_ADDRESS (set by `ray job
submit`), or on a local Ray instance started here.

Runs from a checkout (`ray job submit --working-dir .`) or an installed package alike.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distil.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", "--ray", *sys.argv[1:]]))
