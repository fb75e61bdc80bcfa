"""Screen: probe directions shaped by state every replica holds identically (issue 26, item 2).
Not built into hosfl; measured here. Two shapes:

``--momentum-probe on``: one of the P probes along the clients' own momentum.

Every replica holds the same θ_c history, so every replica can hold the same exponential
average m of the step's random-probe estimate ĝ = 1/((P−1)μ) Σ_p v̄_p u_p (p < P). The P-th
probe's direction is w = m·√d_c/‖m‖ (the size of a ±1 direction) instead of a fresh one: its
scalar v̄_w = λᵀ(f(θ + μw) − f(θ)) is a measured directional derivative along m, with no
d_c-sized noise. The step is

    θ ← θ − lr·ĝ − lr_w·(v̄_w/(μ·d_c))·w,

the first term HO-SFL's unbiased estimate from P − 1 probes, the second a first-order-sized step
(rate ``--lr-w``) along the unit direction m/‖m‖, the gradient's component there: E[step] is the
gradient under the positive-definite preconditioner I + (lr_w/lr)·m̂m̂ᵀ, so a descent direction.
Why it could bend the width law: ĝ's d_c-sized noise averages out of m over ≈ 2/(1 − β) steps
while the gradient, if it drifts slowly, stays, so m's cosine with the gradient is ≈ √(N(P−1)/d_c)
where a random direction's is 1/√d_c. m is fed by ĝ only, so the step along m does not feed
itself. Still P scalars a client; m is a function of the journal, so replay holds (here: float64
on one machine, no exactness across CPUs yet).

The loop reuses hosfl's own pieces (client forward, the server's step and λ, probe swaps,
directions) as ``channel_probes.py`` does; ``--momentum-probe off`` is HO-SFL at P probes.

``--sparse q``: each random probe perturbs only the fraction q of each tensor's entries with
the smallest |θ| (Sparse MeZO, Liu et al. 2024, arXiv 2402.15751), a mask every replica reads
off its own θ_c: the probe's scalar then carries the noise of q·d_c entries instead of d_c, and
the step moves only them (E[step] is the masked gradient).

Evaluations run the averaged server (``server_average=0.99``).

    OMP_NUM_THREADS=1 PYTHONPATH=benchmarks python benchmarks/shaped_probes.py \\
        --task width_sweep:c144 --lr 0.025 --lr-w 0.05 --beta 0.99 --seed 0 [--steps 1500]
        [--sparse 0.25 --momentum-probe off]

Prints one JSON line per evaluation and one for the run.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from channel_probes import screen_args, screened

from hosfl import directions as dirs
from hosfl import runner, zo


def along(model, layout, x, lam, base, u, mu) -> float:
    """λᵀ(f(x; θ + μu) − f(x; θ)) for a direction u given whole (a list of tensors)."""
    params = layout.params
    kept = [p.data for p in params]
    for p, ui in zip(params, u, strict=True):
        p.data = p.data + (mu * ui).float()
    try:
        return zo.estimate(lam, model(x), base)
    finally:
        for p, k in zip(params, kept, strict=True):
            p.data = k


def masks(params, q: float) -> list[torch.Tensor] | None:
    """Per tensor, the fraction q of entries with the smallest |θ| (None: every entry)."""
    if not q:
        return None
    out = []
    for p in params:
        a = p.detach().abs().reshape(-1)
        k = max(1, int(q * a.numel()))
        out.append((a <= a.kthvalue(k).values).reshape(p.shape).double())
    return out


def scalars(model, layout, x, lam, base, seeds, w, mu, how, mask) -> list[float]:
    """v_p = λᵀ(f(x; θ + μu_p) − f(x; θ)) for the random seeds (masked), then for w if given."""
    out = []
    for s in seeds:
        if mask is None:
            with zo.perturbed(layout, s, mu, how):
                out.append(zo.estimate(lam, model(x), base))
        else:
            u = [dirs.direction(s, i, p, how).double() * mk
                 for i, (p, mk) in enumerate(zip(layout.params, mask, strict=True))]  # fmt: skip
            out.append(along(model, layout, x, lam, base, u, mu))
    if w is not None:
        out.append(along(model, layout, x, lam, base, w, mu))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    screen_args(ap, "width_sweep:c144", 0.025)
    ap.add_argument("--lr-w", type=float, default=0.05, help="rate of the step along m")
    ap.add_argument("--beta", type=float, default=0.99)
    ap.add_argument("--warmup", type=int, default=50, help="steps before the momentum probe")
    ap.add_argument("--momentum-probe", choices=("on", "off"), default="on")
    ap.add_argument("--sparse", type=float, default=0.0, help="fraction of entries probed")
    args = ap.parse_args()
    cfg, fed, test = screened(args)
    method, replica = fed.server, fed.server.replica
    params, mu = replica.params, cfg.mu
    d = sum(p.numel() for p in params)
    m = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    evals, cosines, start = [], [], time.perf_counter()
    for t in range(args.steps):
        clients, plan = method.plan(t)
        seeds, how = plan.seeds.tolist(), replica.directions.at(t)
        norm = math.sqrt(sum(float((mi * mi).sum()) for mi in m))
        use_w = args.momentum_probe == "on" and t >= args.warmup and norm > 0
        w = [mi * (math.sqrt(d) / norm) for mi in m] if use_w else None
        rand = seeds[:-1] if use_w else seeds
        mask = masks(params, args.sparse)
        lams, _ = method.train({c: fed.clients[c].handle(plan) for c in clients}, t)
        with torch.no_grad():
            v = torch.zeros(len(rand) + use_w, dtype=torch.float64)
            for c in clients:
                role = fed.clients[c]
                _, x, z, _ = role._pending
                role._pending = None
                lam = lams[c].lam
                base = zo.project(lam, z)
                v += torch.tensor(scalars(replica.model, replica.layout, x, lam, base, rand, w,
                                          mu, how, mask), dtype=torch.float64)  # fmt: skip
            v /= len(clients)
            for i, p in enumerate(params):
                g = torch.zeros(p.shape, dtype=torch.float64)
                for k, s in enumerate(rand):
                    g += float(v[k]) * dirs.direction(s, i, p, how).double()
                if mask is not None:
                    g *= mask[i]
                g /= len(rand) * mu
                step = args.lr * g
                if use_w:
                    step = step + (args.lr_w * float(v[-1]) / (mu * d)) * w[i]
                p.sub_(step.float())
                m[i].mul_(args.beta).add_(g, alpha=1 - args.beta)
        replica.step += 1
        if use_w and (t + 1) % 50 == 0:
            cosines.append(round(float(v[-1]) / (mu * math.sqrt(d)), 6))
        if (t + 1) % args.eval_every == 0 or t + 1 == args.steps:
            acc, _ = runner.evaluate(replica.model, method.evaluated_server, fed.task, test)
            evals.append(round(acc, 4))
            wall = round(time.perf_counter() - start, 1)
            print(json.dumps({"step": t + 1, "test_acc": evals[-1], "wall_s": wall,
                              "along_m": cosines[-1:] or None}), flush=True)  # fmt: skip
    print(json.dumps({**vars(args), "evals": evals}))
    print(f"command: OMP_NUM_THREADS=1 PYTHONPATH=benchmarks python benchmarks/shaped_probes.py"
          f" --task {args.task} --lr {args.lr:g} --lr-w {args.lr_w:g} --beta {args.beta:g}"
          f" --momentum-probe {args.momentum_probe} --sparse {args.sparse:g}"
          f" --seed {args.seed} --steps {args.steps}")  # fmt: skip


if __name__ == "__main__":
    main()
