"""Batched against per-client simulation of in-process clients: steps per second of HO-SFL with
``simulate=batched`` (the K sampled clients' forwards and probes as one batch) and
``simulate=per-client`` (one call per client, the reference), side by side in one run, at
K = 3 and K = 10, on the default task and on ``sentiment-minilm``.

    python benchmarks/simulate.py --out benchmarks/results/simulate

A rate is measured between the train rows of metrics.jsonl (their ``wall_s``) after the
first two steps (the first builds caches, the second is the memory-metered step, always run
client by client). Prints a Markdown table and the command; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import hosfl

TASKS = {
    "fmnist-cnn": dict(steps=40),
    "sentiment-minilm": dict(steps=8),
}


def steps_per_second(cfg: hosfl.Config) -> tuple[float, dict]:
    """Train ``cfg``; its steps per second after the first two steps, and its summary."""
    result = hosfl.run(cfg, log=lambda *a: None)
    rows = [json.loads(line) for line in (result.out / "metrics.jsonl").open()]
    walls = {r["step"]: r["wall_s"] for r in rows if r.get("event") == "train"}
    last = max(walls)
    return (last - 2) / (walls[last] - walls[2]), result.summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/simulate")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--sampled", default="3,10")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks.split(","):
            for k in map(int, args.sampled.split(",")):
                rates = {}
                for mode in ("per-client", "batched"):
                    cfg = hosfl.Config(task=task, sampled=k, simulate=mode, eval_every=0,
                                       test_subset=200, progress=False, device="cpu",
                                       out=f"{tmp}/{task}-{k}-{mode}", **TASKS[task])  # fmt: skip
                    rates[mode], summary = steps_per_second(cfg)
                row = {"task": task, "K": k, **{f"{m}_steps_per_s": r for m, r in rates.items()},
                       "ratio": rates["batched"] / rates["per-client"]}  # fmt: skip
                rows.append(row)
                print(f"{task} K={k}: per-client {rates['per-client']:.2f} steps/s, "
                      f"batched {rates['batched']:.2f} steps/s ({row['ratio']:.2f}×)",
                      flush=True)  # fmt: skip
    print("\n| task | K | per-client steps/s | batched steps/s | batched ÷ per-client |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['K']} | {r['per-client_steps_per_s']:.2f} | "
              f"{r['batched_steps_per_s']:.2f} | {r['ratio']:.2f} |")  # fmt: skip
    print(f"\ncommand: python benchmarks/simulate.py --tasks {args.tasks} --sampled {args.sampled}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "simulate.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
