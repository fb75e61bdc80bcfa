"""Simulation speed: HO-SFL against its forward floor and against SplitFed V1, side by side in
one process on the same task, steps and seed (one torch thread, no evaluation).

For each task: the wall time per step of HO-SFL simulated client by client
(``simulate=per-client``) and as one batch (``simulate=batched``), and of SplitFed V1, from the
train rows of metrics.jsonl after the first two steps (the first builds caches, the second is
the memory-metered step); and in the same process the forward floor of a HO-SFL step: K·(P+1)
forwards of the client part without autograd, P+1 on each of K batches of B examples (new
batches every step, and P of the forwards at perturbed weights made beforehand, as a run's
forwards meet new inputs and new weights), and the server's step (a forward and backward on
each of the K clients' smashed data, one optimizer step). Each figure
is the best of ``--repeats`` runs, taken in turn, so a slow moment of the machine hits all.

    OMP_NUM_THREADS=1 python benchmarks/speed.py
        [--tasks fmnist-cnn,fmnist-cnn-wide,sentiment-minilm] [--repeats 2] [--device cpu|cuda]

Prints a Markdown table of the ratios and the command; writes JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import hosfl
from hosfl import devices, tasks
from hosfl.data import source
from hosfl.metrics.memory import meter
from hosfl.protocol import CutGradient
from hosfl.runner import build

STEPS = {"fmnist-cnn": 100, "fmnist-cnn-wide": 60, "sentiment-minilm": 30}
MODES = {"hosfl per-client": dict(method="hosfl", simulate="per-client"),
         "hosfl batched": dict(method="hosfl", simulate="batched"),
         "sfl-v1": dict(method="sfl-v1", simulate="per-client")}  # fmt: skip


def per_step(cfg: hosfl.Config) -> float:
    """Seconds a step of ``cfg``'s run, between step 2 and its last step."""
    result = hosfl.run(cfg, log=lambda *a: None)
    rows = [json.loads(line) for line in (result.out / "metrics.jsonl").open()]
    walls = {r["step"]: r["wall_s"] for r in rows if r.get("event") == "train"}
    last = max(walls)
    return (walls[last] - walls[2]) / (last - 2)


def floor(cfg: hosfl.Config, steps: int, fresh: bool = True) -> float:
    """Seconds a step of the forward floor of HO-SFL under ``cfg``: each step K batches of B
    examples of its own (training reads new ones every step), P + 1 forwards of the client part
    on each without autograd, P of them at weights of their own (θ + μu_p, made before the
    timing and swapped in as whole tensors: no direction is drawn and nothing is projected),
    and the server's step. ``fresh=False``: the first K batches every step and every forward
    at θ (the floor of the earlier figures, which no training run can reach: its inputs and
    weights stay in the cache)."""
    task, client, server = tasks.prepare(cfg)
    device = cfg.device_of("client")
    client.to(device)
    server.to(device)
    k, b = cfg.sampled, cfg.batch_size
    data = task.load("train", (steps + 2) * k * b)
    size = len(data[1]) if isinstance(data, tuple) else len(data)
    x, y = source.take(data, np.arange((steps + 2) * k * b) % size)
    batches = list(zip(x.to(device).split(b), y.to(device).split(b), strict=True))
    params = [p for p in client.parameters() if p.requires_grad]
    gen = torch.Generator(device).manual_seed(cfg.seed)
    theta = [p.data for p in params]
    probes = [[w + cfg.mu * torch.randn(w.shape, generator=gen, device=device) for w in theta]
              for _ in range(cfg.P)]  # fmt: skip
    opt = torch.optim.SGD([p for p in server.parameters() if p.requires_grad], lr=1e-3)

    def step(t: int) -> None:
        mine = batches[t * k : (t + 1) * k] if fresh else batches[:k]
        zs = []
        with torch.no_grad():
            for xk, _ in mine:
                zs.append(client(xk))
                for ws in probes if fresh else [theta] * cfg.P:
                    for p, w in zip(params, ws, strict=True):
                        p.data = w
                    client(xk)
                for p, w in zip(params, theta, strict=True):
                    p.data = w
        opt.zero_grad(set_to_none=True)
        for z, (_, yk) in zip(zs, mine, strict=True):
            z = z.detach().requires_grad_(True)
            task.loss(server(z), yk).backward()
        opt.step()

    for t in range(2):
        step(t)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for t in range(2, steps + 2):
        step(t)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def peaks(cfg: hosfl.Config) -> tuple[int, int]:
    """Peak tensor bytes of one HO-SFL client's step (forward and probes) simulated alone, and
    of the K clients' step simulated as one batch: the batched simulation's own memory, which
    is not a device's."""
    fed, _, _ = build(cfg)
    method = fed.server
    sampled, plan = method.plan(0)
    roles = [fed.clients[c] for c in sampled]
    out = []
    for group in ([roles[0]], roles):
        def answer(msgs: list, group: list = group) -> list:
            if len(group) == 1:  # as the device's client: handle() alone
                return [group[0].handle(msgs[0])]
            return type(group[0]).handle_group(group, msgs)

        with meter(cfg.device_of("client")) as m:
            smashed = answer([plan] * len(group))
            lams = [CutGradient(0, torch.ones_like(z.z)) for z in smashed]
            del smashed
            answer(lams)
        out.append(m.peak)
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default=",".join(STEPS))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sampled", type=int, default=3)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    devices.keep_freed_memory()  # as every run does: the floor's forwards under the same heap
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.tasks.split(","):
            steps = STEPS.get(name, 50)
            base = dict(task=name, steps=steps, eval_every=0, test_subset=200, progress=False,
                        device=args.device, clients=args.clients, sampled=args.sampled)  # fmt: skip
            best: dict[str, float] = {}
            for r in range(args.repeats):
                for mode, settings in MODES.items():
                    cfg = hosfl.Config(**base, **settings, out=f"{tmp}/{name}-{mode}-{r}")
                    best[mode] = min(best.get(mode, float("inf")), per_step(cfg))
                cfg = hosfl.Config(**base, method="hosfl", out="")
                best["floor"] = min(best.get("floor", float("inf")), floor(cfg, steps // 2))
                fixed = floor(cfg, steps // 2, fresh=False)
                best["fixed floor"] = min(best.get("fixed floor", float("inf")), fixed)
            alone, batched = peaks(hosfl.Config(**base, method="hosfl", out=""))
            row = {"task": name, "steps": steps, **{f"{k} s/step": v for k, v in best.items()},
                   "client peak MiB": alone / 2**20,
                   "batched peak MiB": batched / 2**20}  # fmt: skip
            for mode in ("hosfl per-client", "hosfl batched"):
                row[f"{mode} ÷ floor"] = best[mode] / best["floor"]
                row[f"{mode} ÷ fixed floor"] = best[mode] / best["fixed floor"]
                row[f"{mode} ÷ sfl-v1"] = best[mode] / best["sfl-v1"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\ncommand: OMP_NUM_THREADS=1 python benchmarks/speed.py --tasks {args.tasks} "
          f"--repeats {args.repeats} --device {args.device} --clients {args.clients} "
          f"--sampled {args.sampled}\n")  # fmt: skip
    print("| task | HO-SFL per-client ÷ its floor | batched ÷ floor | the same ÷ the fixed-input "
          "floor | per-client ÷ SplitFed V1 | batched ÷ SplitFed V1 | SplitFed V1 ms/step "
          "| peak: a client alone, K batched (MiB) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['hosfl per-client ÷ floor']:.2f} | "
              f"{r['hosfl batched ÷ floor']:.2f} | {r['hosfl per-client ÷ fixed floor']:.2f}, "
              f"{r['hosfl batched ÷ fixed floor']:.2f} | {r['hosfl per-client ÷ sfl-v1']:.2f} | "
              f"{r['hosfl batched ÷ sfl-v1']:.2f} | {1e3 * r['sfl-v1 s/step']:.1f} | "
              f"{r['client peak MiB']:.1f}, {r['batched peak MiB']:.1f} |")  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
