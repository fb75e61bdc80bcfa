"""The in-process federation as the number of clients M grows (K fixed), against the same
HO-SFL training written as one centralised loop on the K concatenated batches.

Each row runs in its own process, so its peak resident memory (ru_maxrss) is its own. The
centralised loop does the same arithmetic per step (same sampled clients, batches, seeds; the
loss averaged over the K·B examples, so λ is the per-client λ divided by K and its probe scalar
is already the mean v̄) without roles, messages or an engine.

    python benchmarks/engine.py                 # M = 10, 100, 1000; K=3; 200 steps
    python benchmarks/engine.py steps=100
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hosfl import zo
from hosfl.config import Config
from hosfl.engines.local import LocalEngine
from hosfl.metrics.ledger import ByteLedger
from hosfl.protocol import ScalarBroadcast
from hosfl.runner import build

CLIENTS = (10, 100, 1000)
DEFAULTS = ["sampled=3", "steps=200", "progress=false"]
WARMUP = 10


def _central_step(t: int, cfg: Config, fed) -> None:
    sampled, plan = fed.server.plan(t)
    batches = [fed.clients[m].shard.batch(t, cfg.batch_size) for m in sampled]
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    replica, server = fed.clients[0].replica, fed.server
    with torch.no_grad():
        z = replica.model(x)
    z = z.requires_grad_(True)
    server.optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(server.model(z), y).backward()
    server.optimizer.step()
    lam = z.grad
    with torch.no_grad():
        base = zo.project(lam, z)
        values = []
        for s in plan.seeds.tolist():
            with zo.perturbed(replica.model, s, cfg.mu):
                values.append(zo.estimate(lam, replica.model(x), base))
    replica.apply(ScalarBroadcast(t, plan.seeds, torch.tensor(values).float()))


def one(kind: str, overrides: list[str]) -> dict:
    """Train one row in this process; steps per second and peak resident memory."""
    clients = 10 if kind == "central" else int(kind)
    cfg = Config.load(None, [*DEFAULTS, *overrides, f"clients={clients}"])
    fed, _, _ = build(cfg)
    engine = LocalEngine(fed.clients, ByteLedger())

    def step(t: int) -> None:
        if kind == "central":
            _central_step(t, cfg, fed)
        else:
            fed.server.step(t, engine)

    for t in range(WARMUP):
        step(t)
    start = time.perf_counter()
    for t in range(WARMUP, cfg.steps):
        step(t)
    seconds = time.perf_counter() - start
    return {
        "kind": kind,
        "steps_per_s": (cfg.steps - WARMUP) / seconds,
        "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(overrides: list[str]) -> None:
    rows = []
    for kind in ("central", *map(str, CLIENTS)):
        done = subprocess.run(
            [sys.executable, __file__, "--one", kind, *overrides],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{kind}: {rows[-1]['steps_per_s']:.1f} steps/s", file=sys.stderr, flush=True)
    central = rows[0]
    command = f"python benchmarks/engine.py {' '.join(overrides)}".rstrip()
    print(f"\n`{command}`")
    print(f"settings: {' '.join([*DEFAULTS, *overrides])}, default task; "
          f"{WARMUP} warm-up steps not timed\n")  # fmt: skip
    print("| federation | steps/s | centralised ÷ this | peak RSS MiB |")
    print("|---|---|---|---|")
    for r in rows:
        name = "centralised loop (K batches concatenated)" if r is central else f"M = {r['kind']}"
        ratio = central["steps_per_s"] / r["steps_per_s"]
        print(f"| {name} | {r['steps_per_s']:.1f} | {ratio:.2f} | {r['maxrss_mib']:.0f} |")
    out = Path("benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"engine-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    print(f"written: {path}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(one(sys.argv[2], sys.argv[3:])))
    else:
        main(sys.argv[1:])
