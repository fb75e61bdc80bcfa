"""Do two CPU kernels of one machine give one θ_c? The same (seeds, v̄) history applied in
processes pinned to each ATEN_CPU_CAPABILITY this CPU supports (default, avx2, avx512), for
each direction kind and client optimizer, today's torch.optim update against the exact one
(``zo.ExactOptimizer``); then the cost of one exact update against today's, per step, on the
default task's client part and on MiniLM's (sentiment-minilm at its default cut).

    python benchmarks/cross_cpu.py --steps 200 --out benchmarks/results/cross_cpu

Prints two Markdown tables and the command, writes JSON. ``--worker`` is the per-process part.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPES = [(7,), (33, 5), (3, 17, 19), (1000,), (16, 1, 3, 3)]  # sizes that fit no vector width
OPTIMIZERS = {"sgd": ("sgd", 0.0), "momentum": ("sgd", 0.9), "adam": ("adam", 0.0)}


def params():
    """Parameters built from integers only: the same bits whatever the kernels."""
    import torch

    return [((torch.arange(int(torch.tensor(s).prod())) % 97 - 48).float() / 64).reshape(s)
            for s in SHAPES]  # fmt: skip


def history(steps: int, probes: int = 5):
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(steps):
        seeds = rng.integers(0, 2**31, probes).tolist()
        yield seeds, [float(v) for v in rng.standard_normal(probes).astype(np.float32) * 1e-3]


def directions(kind: str):
    """A direction kind by name; ``lowrank`` at rank 2 with a basis every 5 steps (the
    parameters' matrices here have 5 to 19 columns)."""
    from hosfl import directions as dirs

    return dirs.Directions("lowrank", rank=2, lazy=5) if kind == "lowrank" else kind


def worker(kind: str, optimizer: str, exact: bool, steps: int) -> str:

    from hosfl import zo
    from hosfl.methods.base import make_optimizer

    ps = params()
    name, momentum = OPTIMIZERS[optimizer]
    lr = 0.05 if name == "sgd" else 1e-3
    if exact:
        opt = zo.ExactOptimizer(ps, name, lr, momentum)
    else:
        opt = make_optimizer(name, ps, lr, momentum)
    zo.replay_(ps, history(steps), 1e-3, opt, directions(kind))
    return hashlib.sha256(b"".join(p.numpy().tobytes() for p in ps)).hexdigest()


def levels() -> list[str]:
    import torch

    top = torch.backends.cpu.get_cpu_capability().lower()
    order = ["default", "avx2", "avx512"]
    return order[: order.index(top) + 1] if top in order else ["default"]


def digest_under(level: str, kind: str, optimizer: str, exact: bool, steps: int) -> str:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": level}
    args = [sys.executable, __file__, "--worker", kind, optimizer, str(int(exact)), str(steps)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def cost(repeat: int = 5) -> list[dict]:
    import torch

    from hosfl import directions as dirs
    from hosfl import tasks, zo
    from hosfl.config import Config
    from hosfl.methods.base import make_optimizer

    rows = []
    for task in ("fmnist-cnn", "sentiment-minilm"):
        cfg = Config(task=task)
        client = tasks.prepare(cfg)[1]
        ps = zo.trainable(client)
        d = sum(p.numel() for p in ps)
        seeds, values = next(history(1))
        lowrank = dirs.Directions("lowrank", rank=4, lazy=50)
        for label, kind, exact in (("today, gaussian", "gaussian", False),
                                   ("today, rademacher", "rademacher", False),
                                   ("exact, rademacher", "rademacher", True),
                                   ("exact, lowrank r=4", lowrank, True)):  # fmt: skip
            opt = zo.ExactOptimizer(ps, "sgd", 1e-9) if exact else make_optimizer("sgd", ps, 1e-9)
            times = []
            with torch.no_grad():
                for _ in range(repeat):
                    start = time.perf_counter()
                    zo.apply_update_(ps, seeds, values, 1e-3, opt, kind)
                    times.append(time.perf_counter() - start)
            rows.append({"task": task, "d_c": d, "update": label,
                         "ms": 1000 * sorted(times)[len(times) // 2]})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="benchmarks/results/cross_cpu")
    parser.add_argument("--worker", nargs=4, metavar=("KIND", "OPTIMIZER", "EXACT", "STEPS"))
    args = parser.parse_args()
    if args.worker:
        kind, optimizer, exact, steps = args.worker
        print(worker(kind, optimizer, exact == "1", int(steps)))
        return
    found = levels()
    rows = []
    for exact in (False, True):
        for kind in ("gaussian", "rademacher", "lowrank"):
            for optimizer in OPTIMIZERS:
                digests = {lv: digest_under(lv, kind, optimizer, exact, args.steps) for lv in found}
                rows.append({"update": "exact" if exact else "today (torch.optim)", "kind": kind,
                             "optimizer": optimizer, "identical": len(set(digests.values())) == 1,
                             "digests": digests})  # fmt: skip
    print(f"command: python benchmarks/cross_cpu.py --steps {args.steps}")
    print(f"capabilities: {', '.join(found)}; {args.steps} steps; parameters {SHAPES}\n")
    print("| update | directions | optimizer | bytes identical across capabilities |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['update']} | {r['kind']} | {r['optimizer']} | "
              f"{'yes' if r['identical'] else 'no'} |")  # fmt: skip
    costs = cost()
    print("\n| task | d_c | update | ms per step (median of 5) | × today, gaussian |")
    print("|---|---|---|---|---|")
    for r in costs:
        base = next(c["ms"] for c in costs if c["task"] == r["task"] and "gaussian" in c["update"])
        print(f"| {r['task']} | {r['d_c']:,} | {r['update']} | {r['ms']:.1f} | "
              f"{r['ms'] / base:.2f} |")  # fmt: skip
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "cross_cpu.json").write_text(json.dumps({"rows": rows, "cost": costs},
                                                              indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
