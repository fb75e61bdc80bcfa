"""What the trackers cost: the same run with log_to="" (none), tensorboard, mlflow and both,
in one process, one after another, twice each in alternating order (the best of two kept);
prints the wall time of each as a ratio to no tracker, and the command.

    OMP_NUM_THREADS=1 python benchmarks/trackers.py --steps 300
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from hosfl.config import Config
from hosfl.runner import run

SETTINGS = ("", "tensorboard", "mlflow", "tensorboard,mlflow")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # each run's own store, as by default
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for turn in range(2):
            for i, log_to in enumerate(SETTINGS if turn == 0 else SETTINGS[::-1]):
                cfg = Config.load(None, [f"steps={args.steps}", "eval_every=100", "progress=false",
                                         f"log_to={log_to}", f"out={tmp}/{turn}-{i}"])  # fmt: skip
                start = time.perf_counter()
                run(cfg, log=lambda *a: None)
                best[log_to] = min(best.get(log_to, float("inf")), time.perf_counter() - start)
    print(f"command: OMP_NUM_THREADS=1 python benchmarks/trackers.py --steps {args.steps}\n")
    print("| log_to | wall s (best of 2) | × none |")
    print("|---|---|---|")
    for log_to in SETTINGS:
        print(f"| {log_to or '(none)'} | {best[log_to]:.1f} | {best[log_to] / best['']:.3f} |")


if __name__ == "__main__":
    main()
