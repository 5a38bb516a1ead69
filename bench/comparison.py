"""The report's comparison re-made with search, at the quick profile on real paintings (issue 25).

Runs `python -m prado_dist.compare` (default: the three custom CNNs and EfficientNet-Lite0 with its
packaged ImageNet weights, `--profile quick`, an equal budget of epochs per search) on
../shared/data/paintings-dev in a temporary folder, then appends the leaderboard rows, the total wall
time and the machine to bench/results/comparison.jsonl and keeps the table and plot as
bench/results/comparison-TAG.md / .png.

    python bench/comparison.py                                   # the README's table
    python bench/comparison.py --budget-epochs 12 --tag small --spaces mobilenet lite0
Any further arguments go to prado_dist.compare (e.g. --set image_size=48).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from prado_dist import compare

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import record  # noqa: E402  (a sibling bench module)

RESULTS = Path(__file__).resolve().parent / "results"
SHARED_PAINTINGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "paintings-dev"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spaces", nargs="+", default=["vgg", "resnet29", "mobilenet", "lite0"])
    parser.add_argument("--budget-epochs", type=int, default=18)
    parser.add_argument("--data", type=Path, default=SHARED_PAINTINGS)
    parser.add_argument("--tag", default="quick", help="names the kept table and plot")
    args, more = parser.parse_known_args()
    if not args.data.is_dir():
        parser.error(f"{args.data} is missing: pass --data DIR (a folder-per-painter dataset)")
    with tempfile.TemporaryDirectory(prefix="comparison-") as folder:
        argv = [
            *("--spaces", *args.spaces, "--profile", "quick", "--budget-epochs", str(args.budget_epochs)),
            *("--data", str(args.data), "--storage", f"{folder}/runs", "--name", "bench"),
            *("--mlflow-uri", f"sqlite:///{folder}/mlflow.db", *more),
        ]
        started = time.monotonic()
        code = compare.main(argv)
        wall_s = time.monotonic() - started
        out = Path(folder) / "runs" / "bench"
        if not (out / "comparison.json").is_file():
            return code  # refused before it started: compare printed why
        state = json.loads((out / "comparison.json").read_text())
        for suffix in ("md", "png"):
            if (out / f"leaderboard.{suffix}").is_file():
                shutil.copy(out / f"leaderboard.{suffix}", RESULTS / f"comparison-{args.tag}.{suffix}")
    line = record({"tag": args.tag, "compare_argv": argv, "exit_code": code, "wall_s": wall_s, **state})
    with (RESULTS / "comparison.jsonl").open("a") as file:
        file.write(json.dumps(line, default=str) + "\n")
    print(f"{wall_s / 60:.1f} min in all; appended to {RESULTS / 'comparison.jsonl'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
