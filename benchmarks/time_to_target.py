"""Time to target per method under every built-in device and link profile (``hosfl timeline``)
on the default task and on ``sentiment-minilm`` at its default cut and at ``encoder.5``; with
``int8`` rows, the same methods sending z and λ in int8 (``cut_dtype=int8``).

    OMP_NUM_THREADS=1 python benchmarks/time_to_target.py [--out benchmarks/results/timeline]

The runs (one seed each: this is a table of wall clock, not of accuracy) are ``hosfl compare``
folders under OUT; a missing one is run first:

    hosfl compare --methods hosfl,sfl-v1,sfl-v2,fedavg --seeds 0 --out OUT/fmnist-cnn eval_every=50
    hosfl compare --methods hosfl,sfl-v1 --seeds 0 --out OUT/fmnist-cnn-int8 eval_every=50 \\
        cut_dtype=int8
    hosfl compare --methods hosfl,sfl-v1,fedavg --seeds 0 --out OUT/sentiment-minilm \\
        task=sentiment-minilm eval_every=25            (and OUT/sentiment-minilm-int8 likewise)
    hosfl compare --methods hosfl,sfl-v1 --seeds 0 --out OUT/sentiment-minilm-encoder.5 \\
        task=sentiment-minilm cut=encoder.5 eval_every=25

FedAvg trains the whole model whatever the cut: its MiniLM run stands for both cuts. Prints,
per task, a Markdown table of time to the target (and seconds a step) by profile, and writes
OUT/<task>/timeline.* with the accuracy-against-time plots.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hosfl.compare import compare
from hosfl.timeline import builtin_profiles, hms, time_to, timeline

GROUPS = {  # table: (target, [(compare folder, methods, settings)])
    "fmnist-cnn": (0.85, [("fmnist-cnn", ["hosfl", "sfl-v1", "sfl-v2", "fedavg"], []),
                          ("fmnist-cnn-int8", ["hosfl", "sfl-v1"], ["cut_dtype=int8"])]),
    "sentiment-minilm": (0.9, [
        ("sentiment-minilm", ["hosfl", "sfl-v1", "fedavg"], []),
        ("sentiment-minilm-int8", ["hosfl", "sfl-v1"], ["cut_dtype=int8"])]),
    "sentiment-minilm-encoder.5": (0.85, [
        ("sentiment-minilm-encoder.5", ["hosfl", "sfl-v1"], ["cut=encoder.5"]),
        ("sentiment-minilm", ["fedavg"], [])]),
}  # fmt: skip
EVAL = {"fmnist-cnn": "eval_every=50"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/timeline")
    args = ap.parse_args(argv)
    out = Path(args.out)
    names = list(builtin_profiles())
    for table, (target, parts) in GROUPS.items():
        folders, labels = [], []
        for folder, methods, settings in parts:
            task = "fmnist-cnn" if folder.startswith("fmnist") else "sentiment-minilm"
            if not (out / folder / "results.csv").is_file():
                compare(methods, [f"task={task}", EVAL.get(task, "eval_every=25"),
                                  "progress=false", *settings],
                        str(out / folder), target=None, seeds=[0], log=print)  # fmt: skip
            for m in methods:
                folders.append(out / folder / f"{m}-seed0")
                labels.append(m + (" (int8)" if "cut_dtype=int8" in settings else ""))
        _, results = timeline(folders, target=target, out=out / table, labels=labels)
        print(f"\n{table}: time to test accuracy {target} (seconds a step), one seed\n")
        print("| method | final | " + " | ".join(names) + " |")
        print("|---|---:|" + "---:|" * len(names))
        for i, label in enumerate(labels):
            mine = results[i :: len(folders)]
            final = mine[0]["evals"][-1][1]
            print(f"| {label} | {final:.4f} | " + " | ".join(
                f"{hms(time_to(r, target))} ({r['seconds_per_step']:.3g} s)" for r in mine) + " |")
    print(f"\ncommand: OMP_NUM_THREADS=1 python benchmarks/time_to_target.py "
          f"{' '.join(sys.argv[1:] if argv is None else argv)}")


if __name__ == "__main__":
    main()
