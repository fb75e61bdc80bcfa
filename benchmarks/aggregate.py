"""Scalar aggregation on the default task, honest clients only: what robustness costs.

Each aggregate (mean, median, trimmed, clipped) over several seeds, every run at the defaults
(`fmnist-cnn`, M=10, K=3, P=5, 1 500 steps) with the default bounded contributions
(outlier_factor=1000), plus plain mean without them (outlier_factor=0) for the same seeds.
Prints a Markdown table (final and mean of the last three evaluations, mean ± sd over seeds,
uploads rejected), the command, and writes JSON. Runs two at a time, one torch thread each.

    python benchmarks/aggregate.py --seeds 0,1,2 --out benchmarks/results/aggregate
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from hosfl.compare import mean_sd

ROWS = {
    "mean, outlier_factor=0 (before)": ["aggregate=mean", "outlier_factor=0"],
    "mean (default)": ["aggregate=mean"],
    "median": ["aggregate=median"],
    "trimmed": ["aggregate=trimmed"],
    "clipped": ["aggregate=clipped"],
}


def one(args: tuple[str, list[str], int, str]) -> dict:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from hosfl.config import Config
    from hosfl.runfolder import read_metrics
    from hosfl.runner import run

    name, overrides, seed, out = args
    folder = Path(out) / f"{'-'.join(o.split('=')[1] for o in overrides)}-seed{seed}"
    cfg = Config.load(None, [*overrides, f"seed={seed}", "eval_every=100", "progress=false",
                             f"out={folder}"])  # fmt: skip
    result = run(cfg, log=lambda *a: None)
    rows, _ = read_metrics(folder / "metrics.jsonl")
    evals = [r["test_acc"] for r in rows if r["event"] == "eval"]
    return {"row": name, "seed": seed, "final": result.accuracy, "last3": statistics.mean(
        evals[-3:]), "rejected": result.summary["rejected"], "folder": str(folder)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="benchmarks/results/aggregate")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for every run (e.g. directions=gaussian)")  # fmt: skip
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    todo = [(name, [*o, *args.set], s, args.out) for name, o in ROWS.items() for s in seeds]
    with ProcessPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(one, todo))
    extra = "".join(f" --set {kv}" for kv in args.set)
    print(f"command: python benchmarks/aggregate.py --seeds {args.seeds}{extra}\n")
    print("| aggregate | final acc (mean ± sd) | last-3 evals (mean ± sd) | rejected uploads |")
    print("|---|---|---|---|")
    for name in ROWS:
        mine = [r for r in runs if r["row"] == name]
        f, l3 = [r["final"] for r in mine], [r["last3"] for r in mine]
        print(f"| {name} | {mean_sd(f)} | {mean_sd(l3)} | {sum(r['rejected'] for r in mine)} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "aggregate.json").write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
