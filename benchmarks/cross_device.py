"""Do a CPU client and a client on another device hold the same θ_c? The GPU check of issue 5.

1. Directions: ``directions=rademacher`` generates u on the parameter's own device from integer
   ops; counts the parameters of the default client part whose u differs between the CPU and
   ``--device``. (``gaussian`` draws on the CPU and copies, so it is equal by construction.)
2. Drift: one replica of the client part on the CPU, one on ``--device``, both apply the same
   ``--steps`` (seeds, v̄) updates with plain SGD; prints the largest |θ_cpu − θ_device|.

    python benchmarks/cross_device.py --device cuda --out /tmp/xdev   # on a GPU machine
    python benchmarks/cross_device.py --device cpu                    # the CPU-only dry run
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from hosfl import directions as dirs
from hosfl import tasks, zo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--P", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    device = torch.device(args.device)
    client, _ = tasks.get("fmnist-cnn").split_model("conv2", 0)
    params = zo.trainable(client)
    differing = sum(
        not torch.equal(
            dirs.rademacher(s, i, p.shape, torch.device("cpu")),
            dirs.rademacher(s, i, p.shape, device).cpu(),
        )
        for s in (0, 1, 2**31 - 1)
        for i, p in enumerate(params)
    )
    report = {"device": str(device), "torch": torch.__version__,
              "rademacher_params_differing": differing,
              "rademacher_params_checked": 3 * len(params)}  # fmt: skip
    rng = np.random.default_rng(0)
    history = [
        (
            rng.integers(0, 2**31, size=args.P).tolist(),
            (rng.standard_normal(args.P) * 1e-3).tolist(),
        )
        for _ in range(args.steps)
    ]
    for kind in ("gaussian", "rademacher"):
        cpu = copy.deepcopy(client)
        dev = copy.deepcopy(client).to(device)
        start = time.perf_counter()
        for model in (cpu, dev):
            ps = zo.trainable(model)
            zo.replay_(ps, history, 1e-3, torch.optim.SGD(ps, lr=0.05), kind)
        drift = max(
            float((a.detach() - b.detach().cpu()).abs().max())
            for a, b in zip(cpu.parameters(), dev.parameters(), strict=True)
        )
        report[f"{kind}_max_abs_drift_after_{args.steps}_steps"] = drift
        report[f"{kind}_replay_seconds_both"] = time.perf_counter() - start
    print(json.dumps(report, indent=2))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"cross_device-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps(report, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
