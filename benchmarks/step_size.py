"""How far one zeroth-order client step moves the cut layer, task by task: the measurement
behind a rate rule that needs no per-task number.

For each task and cut, a short HO-SFL run (default settings, one torch thread) is replayed from
its journal, and after every step the client's output on a fixed batch of test inputs is
compared with the output before it: ρ_t = ‖f_c(x; θ_{t+1}) − f_c(x; θ_t)‖ / ‖f_c(x; θ_t)‖, and
the same change against the output centred over the batch (each feature's batch mean
removed: large constant features no longer hide how far the examples move).
For small steps ρ is proportional to the rate, so ρ at any other rate r is ρ · r / rate; the
table prints it for the rates given with --rates (the rates the cut sweeps measured).

    python benchmarks/step_size.py [--steps 20] [--cases fmnist-cnn:conv2,...]

A case is task:cut, optionally followed by :key=value settings
(sentiment-minilm:encoder.5:lora=client).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from hosfl import checkpoint, methods
from hosfl.data import source
from hosfl.journal import Journal
from hosfl.protocol import ScalarBroadcast
from hosfl.runner import load_models

OUT = Path("benchmarks/results/step_size")
# task:cut -> extra settings of the run
CASES = {
    "fmnist-cnn:conv2": [],
    "fmnist-cnn-wide:conv2": [],
    "fmnist-effnet:blocks.2": [],
    "fmnist-effnet:conv_head": [],
    "sentiment-minilm:encoder.1": ["partition=by-source"],
    "sentiment-minilm:encoder.5": ["partition=by-source"],
}


def measure(case: str, steps: int, batch: int = 64) -> tuple[int, float, list[float], list[float]]:
    """(d_c, the run's zeroth-order rate, ρ_t for t = 1..steps, the same against the centred
    output)."""
    task, cut, *extra = case.split(":")
    out = OUT / "-".join([task, cut, *extra])
    if not (out / "summary.json").exists():
        args = ["run", f"task={task}", f"cut={cut}", "method=hosfl", *extra,
                *CASES.get(f"{task}:{cut}", []),
                f"steps={steps}", "eval_every=0", "progress=false", f"out={out}"]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "hosfl.cli", *args], env=env, check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
    cfg, client, server, t = load_models(checkpoint.load(out / "client_init.pt"))
    replica = methods.get(cfg.method)(cfg, client, server, t).replica
    x, _ = next(source.batches(t.load("test", cfg.test_subset), batch))
    journal = Journal(out / "journal.sqlite", create=False)
    try:
        entries = list(journal.entries(0, journal.end, cfg.P))
    finally:
        journal.close()
    rho, centred = [], []
    with torch.no_grad():
        z = client(x).double()
        for step, (seeds, values) in enumerate(entries):
            replica.apply(ScalarBroadcast(step, seeds, values))  # the directions of that step
            z_next = client(x).double()
            moved = float((z_next - z).norm())
            rho.append(moved / float(z.norm()))
            centred.append(moved / float((z - z.mean(0, keepdim=True)).norm()))
            z = z_next
    return replica.size, replica.optimizer.param_groups[0]["lr"], rho, centred


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cases", default=",".join(CASES), help="task:cut[:key=value...],...")
    ap.add_argument("--rates", default="", help="task:cut=r1/r2,... rates to scale ρ to")
    args = ap.parse_args()
    rates: dict[str, list[float]] = {}
    for item in filter(None, args.rates.split(",")):
        case, _, values = item.partition("=")
        rates[case] = [float(r) for r in values.split("/")]
    print("| task, cut | d_c | rate | median ρ per step | ρ at other rates | "
          "median ρ against the centred output | at other rates |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        d, lr, rho, centred = measure(case, args.steps)
        row = [case.replace(":", ", "), f"{d:,}", f"{lr:.2g}"]
        for values in (rho, centred):
            med = statistics.median(values)
            scaled = ", ".join(f"{r:.2g}: {med * r / lr:.2g}" for r in rates.get(case, []))
            row += [f"{med:.3g}", scaled or "–"]
        print(f"| {' | '.join(row)} |")
    print(f"\ncommand: python benchmarks/step_size.py --steps {args.steps} --cases {args.cases}"
          + (f" --rates {args.rates}" if args.rates else ""))  # fmt: skip


if __name__ == "__main__":
    main()
