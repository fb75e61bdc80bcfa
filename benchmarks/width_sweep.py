"""Is the zeroth-order client's update dimension-free? The CNN of ``fmnist-cnn`` with conv2
widened or narrowed (the client part's size d_c from 1 320 to 21 040 weights at the default
cut), each width run with the frozen client, SplitFed V1, HO-SFL at a grid of client rates
and HO-SFL with ``zo_lr_rule=output``: how the best rate and the gain recovered move with d_c.

    python benchmarks/width_sweep.py run [--only TEXT]   # the runs not finished yet, one by one
    python benchmarks/width_sweep.py table              # the Markdown table from the run folders

Runs are written to benchmarks/results/width_sweep/c<W>-<name>-seed<S> on one torch thread (a
folder that was started but holds no summary is resumed). Width 32 is ``fmnist-cnn`` and width 72
``fmnist-cnn-wide``: their frozen, SplitFed V1, HO-SFL-at-0.05 and output-rule runs are the
findings table's (benchmarks/results/findings), the same configs and seeds. The other widths
are the task ``width_sweep:c<W>`` (this file on PYTHONPATH), which builds the same model with
conv2 16→W.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from hosfl.metrics.plots import load_run
from hosfl.tasks.fmnist_cnn import FashionMnistCNN

OUT = Path("benchmarks/results/width_sweep")
FINDINGS = Path("benchmarks/results/findings")
WIDTHS = (8, 144, 16, 32, 72)  # the ends first: they say most
SEEDS = (0,)
RATES = (0.0125, 0.025, 0.05, 0.1)
METHODS = [
    ("frozen", ["method=frozen"]),
    ("sfl-v1", ["method=sfl-v1"]),
    ("hosfl-out", ["method=hosfl", "zo_lr_rule=output"]),
    *((f"hosfl-lr{r:g}", ["method=hosfl", f"client_lr={r:g}"]) for r in RATES),
]
PRIORITY = ["frozen", "sfl-v1", "hosfl-out",
            *(f"hosfl-lr{r:g}" for r in (0.05, 0.1, 0.025, 0.0125))]  # fmt: skip
# the findings table's name of the same run, at the widths that are built-in tasks
SAME = {"frozen": "frozen", "sfl-v1": "sfl-v1", "hosfl-lr0.05": "hosfl", "hosfl-out": "hosfl-out"}
BUILT_IN = {32: "fmnist-cnn", 72: "fmnist-cnn-wide"}


def __getattr__(name: str) -> FashionMnistCNN:
    """``width_sweep:c<W>``: the default task's CNN with conv2 16→W."""
    if not (name.startswith("c") and name[1:].isdigit() and int(name[1:]) > 0):
        raise AttributeError(name)
    task = FashionMnistCNN()
    task.stages = ((1, 16), (16, int(name[1:])))
    return task


def d_c(width: int) -> int:
    """Client weights at the cut conv2: conv1 (1→16, 3×3) and conv2 (16→W, 3×3), with biases."""
    return 16 * (9 + 1) + width * (16 * 9 + 1)


def task(width: int) -> str:
    return BUILT_IN.get(width, f"width_sweep:c{width}")


def folder(width: int, name: str, seed: int) -> Path:
    if width in BUILT_IN and name in SAME:
        return FINDINGS / f"{BUILT_IN[width]}-conv2-{SAME[name]}-seed{seed}"
    return OUT / f"c{width}-{name}-seed{seed}"


def run(only: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                       os.environ.get("PYTHONPATH")]))}  # fmt: skip
    # the baselines and the output rule at every width first, then the rates from the middle
    order = sorted(METHODS, key=lambda m: PRIORITY.index(m[0]))
    for name, settings in order:
        for width in WIDTHS:
            for seed in SEEDS:
                out = folder(width, name, seed)
                if only not in out.name or (out / "summary.json").exists():
                    continue
                args = (
                    ["resume", str(out)]
                    if (out / "client_init.pt").exists()
                    else ["run", f"task={task(width)}", "cut=conv2", *settings, f"seed={seed}",
                          "eval_every=100", "progress=false", f"out={out}"]  # fmt: skip
                )
                print(f"hosfl {' '.join(args)}", flush=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                with open(out.parent / f"{out.name}.log", "a") as log:
                    subprocess.run([sys.executable, "-m", "hosfl.cli", *args], env=env,
                                   stdout=log, stderr=subprocess.STDOUT)  # fmt: skip


def _result(out: Path) -> tuple[float, float, float] | None:
    """(final test accuracy, mean of the last three evaluations, the client rate) of a finished
    run, or None."""
    if not (out / "summary.json").exists():
        return None
    run = load_run(out)
    accs = [e["test_acc"] for e in run["evals"]]
    return accs[-1], statistics.mean(accs[-3:]), float(run["summary"]["client_lr"])


def _gain(got: dict, name: str) -> str:
    lo, hi, r = got["frozen"], got["sfl-v1"], got[name]
    if not (lo and hi and r) or hi[0] == lo[0]:
        return "–"
    return f"{(r[0] - lo[0]) / (hi[0] - lo[0]):.2f}"


def table() -> str:
    lines = ["| conv2 width | d_c | frozen | SplitFed V1 | "
             + " | ".join(f"HO-SFL {r:g}" for r in RATES)
             + " | best rate (gain recovered) | output rule: rate (gain recovered) |",
             "|---|---|---|---|" + "---|" * len(RATES) + "---|---|"]  # fmt: skip
    for width in sorted(WIDTHS):
        got = {name: _result(folder(width, name, SEEDS[0])) for name, _ in METHODS}
        cell = {n: f"{r[0]:.4f}" if r else "–" for n, r in got.items()}

        rated = [(got[f"hosfl-lr{r:g}"][0], r) for r in RATES if got[f"hosfl-lr{r:g}"]]
        best = max(rated)[1] if rated else None
        best_cell = f"{best:g} ({_gain(got, f'hosfl-lr{best:g}')})" if best else "–"
        out = got["hosfl-out"]
        out_cell = f"{out[2]:.3g} ({_gain(got, 'hosfl-out')}), {out[0]:.4f}" if out else "–"
        lines.append(f"| {width} | {d_c(width):,} | {cell['frozen']} | {cell['sfl-v1']} | "
                     + " | ".join(cell[f"hosfl-lr{r:g}"] for r in RATES)
                     + f" | {best_cell} | {out_cell} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("run", "table"))
    ap.add_argument("--only", default="", help="only the runs whose folder name contains this")
    args = ap.parse_args()
    if args.what == "run":
        run(args.only)
    else:
        print(table())
        print("\nfinal test accuracy, seed 0 (one seed); gain recovered = (HO-SFL − frozen) / "
              "(SplitFed V1 − frozen)\ncommand: python benchmarks/width_sweep.py table "
              "(runs: python benchmarks/width_sweep.py run)")  # fmt: skip


if __name__ == "__main__":
    main()
