"""The dominant traffic cut: smashed data z and λ sent in float32, bfloat16 and int8 (one
float32 scale per tensor), HO-SFL on one task over seeds; bytes per step from the ledger and
the final accuracy, mean ± sd.

    python benchmarks/cut_dtype.py --task fmnist-cnn --seeds 0,1,2
    python benchmarks/cut_dtype.py --task sentiment-minilm --seeds 0,1,2

Each format is one ``hosfl compare --methods hosfl --seeds ...`` into OUT/TASK/FORMAT; a format
whose folder already holds results.csv is read, not run again. Extra ``key=value`` settings go
to every run. Run it with OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from hosfl.compare import compare, mean_sd

FORMATS = ("float32", "bfloat16", "int8")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--task", default="fmnist-cnn")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="benchmarks/results/cut_dtype")
    ap.add_argument("settings", nargs="*", help="key=value for every run")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    base = Path(args.out) / "-".join([args.task, *args.settings]).replace("=", "")
    rows = []
    for fmt in FORMATS:
        folder = base / fmt
        if not (folder / "results.csv").is_file():
            compare(["hosfl"], [f"task={args.task}", f"cut_dtype={fmt}", "progress=false",
                                *args.settings], str(folder), target=None, seeds=seeds,
                    log=lambda *a: None)  # fmt: skip
        with open(folder / "results.csv") as f:
            runs = list(csv.DictReader(f))
        r = runs[0]  # the bytes of a step are the same for every seed
        total = (float(r["bytes_up"]) + float(r["bytes_down"])) / int(r["steps"])
        rows.append((fmt, float(r["up_smashed_per_step"]), float(r["down_lambda_per_step"]),
                     total, mean_sd([float(r["final"]) for r in runs]),
                     mean_sd([float(r["last3"]) for r in runs]), len(runs)))  # fmt: skip
    print(f"{args.task}, HO-SFL, {', '.join(args.settings) or 'task defaults'}; seeds "
          f"{args.seeds}; test metric mean ± sd (final; the mean of the last three evaluations)\n")
    print("| cut_dtype | smashed up / step | λ down / step | all bytes / step | final "
          "| last three | runs |")
    print("|---|---:|---:|---:|---|---|---:|")
    for fmt, up, down, total, final, last3, n in rows:
        print(f"| {fmt} | {up:,.0f} | {down:,.0f} | {total:,.0f} | {final} | {last3} | {n} |")
    print(f"\ncommand: OMP_NUM_THREADS=1 python benchmarks/cut_dtype.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
