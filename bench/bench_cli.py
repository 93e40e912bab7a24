"""Start-up time of the CLI beside torch's import and TRL's CLI, in one run.

    python bench/bench_cli.py [--repeat 5]

Prints the median wall time of each command and the ratios the project aims for:
``tunesmith --help`` no slower than ``trl --help``; ``tunesmith plugins`` and
``tunesmith train --help`` at most a tenth of ``trl sft --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def exe(name: str) -> str:
    found = BIN / name
    return str(found) if found.exists() else (shutil.which(name) or name)


COMMANDS = {
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "trl --help": [exe("trl"), "--help"],
    "trl sft --help": [exe("trl"), "sft", "--help"],
    "tunesmith --help": [exe("tunesmith"), "--help"],
    "tunesmith plugins": [exe("tunesmith"), "plugins"],
    "tunesmith train --help": [exe("tunesmith"), "train", "--help"],
}


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    results = {}
    for label, cmd in COMMANDS.items():
        timed(cmd)  # warm the file cache
        results[label] = statistics.median(timed(cmd) for _ in range(args.repeat))
        print(f"{label:28s} {results[label]:7.3f} s")
    ratios = {
        "tunesmith --help / trl --help": results["tunesmith --help"] / results["trl --help"],
        "tunesmith plugins / trl sft --help": results["tunesmith plugins"] / results["trl sft --help"],
        "tunesmith train --help / trl sft --help": results["tunesmith train --help"] / results["trl sft --help"],
    }
    goals = {"tunesmith --help / trl --help": 1.0, "tunesmith plugins / trl sft --help": 0.1, "tunesmith train --help / trl sft --help": 0.1}
    print()
    for k, v in ratios.items():
        print(f"{k:42s} {v:6.3f}  (goal <= {goals[k]}: {'met' if v <= goals[k] else 'NOT met'})")
    out = Path(__file__).parent / "results" / "cli.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"seconds": results, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
