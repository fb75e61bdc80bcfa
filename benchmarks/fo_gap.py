"""HO-SFL against first-order split learning (SplitFed V1) and a frozen client, side by side.

Same config, data, partition, batches and seed for every row; only the client's training
differs. Prints a Markdown table and the command, and writes JSON.

    python benchmarks/fo_gap.py                       # the acceptance setting of issue 2
    python benchmarks/fo_gap.py partition=dirichlet alpha=0.5 steps=300
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from hosfl.config import Config
from hosfl.runner import run

ROWS = {
    "HO-SFL (client ZO, SGD)": ["method=hosfl"],
    "SplitFed V1 (client backprop)": ["method=sfl-v1"],
    "frozen client (inference only)": ["method=frozen"],
}
DEFAULTS = ["clients=10", "sampled=3", "batch_size=32", "steps=1500", "partition=iid",
            "eval_every=0", "progress=false"]  # fmt: skip


def main(overrides: list[str]) -> None:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in ROWS.items():
            cfg = Config.load(None, [*DEFAULTS, *overrides, *extra, f"out={tmp}/{len(results)}"])
            r = run(cfg, log=lambda *a: None)
            results.append({"method": name, "test_acc": r.accuracy, "wall_s": r.wall_s,
                            "bytes_up": r.ledger.total("up"),
                            "bytes_down": r.ledger.total("down")})  # fmt: skip
            print(f"{name}: {r.accuracy:.4f} ({r.wall_s:.0f} s)", file=sys.stderr, flush=True)
    fo = results[1]["test_acc"]
    print(f"\n`python benchmarks/fo_gap.py {' '.join(overrides)}`".rstrip("` ") + "`")
    print(f"settings: {' '.join([*DEFAULTS, *overrides])}\n")
    print("| method | test acc | vs SplitFed V1 (points) | wall (× SplitFed V1) |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {r['test_acc']:.4f} | {100 * (r['test_acc'] - fo):+.2f} | "
              f"{r['wall_s'] / results[1]['wall_s']:.2f} |")  # fmt: skip
    out = Path("benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"fo_gap-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"overrides": overrides, "results": results}, indent=2))
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
