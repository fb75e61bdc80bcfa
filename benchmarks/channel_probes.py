"""Screen: one probe scalar per channel of the cut layer, where the client's last module feeds
each channel from its own row of weights (a convolution or linear layer followed by ReLU and
pooling: the CNN's conv2 at the default cut). Not built into hosfl; measured here.

Why it could bend the width law (docs/FINDINGS.md): a probe's scalar v = λᵀ(f(θ + μu) − f(θ))
sums C channel terms v_c = λ_cᵀ(f_c(θ + μu) − f_c(θ)). Channel c's term moves with row c of the
last module and with the modules before it, not with the other rows, so v_c·u_c estimates
row c's gradient without bias and with the variance of a direction of (row + earlier) entries,
not of d_c: at the CNN's conv2 16→144, 145 + 160 entries against 21 040. The rows are updated
along Σ_p v̄_pc·u_pc, every other parameter along Σ_p (Σ_c v̄_pc)·u_p, exactly HO-SFL's update.
The price: P·C scalars a client and a step instead of P (720 at C = 144, against 903 KB of
smashed data up).

The loop reuses hosfl's own pieces (the client's forward, the server's step and λ, the probes'
swaps and the directions) and writes only the estimate and the update (the mean of the
clients' scalars, plain SGD, float64 accumulation, no journal): ``--per scalar`` runs the same
loop with one scalar a probe, HO-SFL's estimator, as its control. Evaluations run the averaged
server (``server_average=0.99``), as the baselines in docs/FINDINGS.md do.

    OMP_NUM_THREADS=1 python benchmarks/channel_probes.py --task width_sweep:c144 \\
        --lr 0.05 --per channel --seed 0 [--steps 1500]

(``width_sweep:c<W>`` needs benchmarks/ on PYTHONPATH.) Prints one JSON line per evaluation
and one for the run.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import hosfl
from hosfl import directions as dirs
from hosfl import runner, zo


def rows_of_last_module(model: torch.nn.Module) -> set[int]:
    """Indices (in ``zo.trainable`` order) of the trainable parameters of the last module that
    owns any: the module whose rows feed the cut layer's channels one each."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    last = names[-1].rsplit(".", 1)[0]
    return {i for i, n in enumerate(names) if n.rsplit(".", 1)[0] == last}


def channel_scalars(model, layout, x, z, lam, seeds, mu, how) -> torch.Tensor:
    """P × C: v_pc = λ_cᵀ(f_c(x; θ + μu_p) − f_c(x; θ)), in float64, channels on dim 1."""
    lam = lam.double()
    dims = [d for d in range(z.dim()) if d != 1]
    base = (lam * z.double()).sum(dim=dims)
    out = []
    for s in seeds:
        with zo.perturbed(layout, s, mu, how):
            out.append((lam * model(x).double()).sum(dim=dims) - base)
    return torch.stack(out)


def update_(params, rows, seeds, v, lr, mu, how, per_channel: bool) -> None:
    """θ ← θ − lr/(Pμ)·Σ_p c_p·u_p: c_p per row for the last module's parameters (per channel),
    else Σ_c v̄_pc for every parameter (HO-SFL's update)."""
    for i, p in enumerate(params):
        g = torch.zeros(p.shape, dtype=torch.float64)
        for k, s in enumerate(seeds):
            u = dirs.direction(s, i, p, how).double()
            if per_channel and i in rows:
                g += v[k].reshape(-1, *[1] * (p.dim() - 1)) * u
            else:
                g += v[k].sum() * u
        p.sub_((lr / (len(seeds) * mu) * g).float())


def screen_args(ap: argparse.ArgumentParser, task: str, lr: float) -> None:
    """The options every estimator screen takes."""
    ap.add_argument("--task", default=task)
    ap.add_argument("--lr", type=float, default=lr, help="the client's SGD rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--eval-every", type=int, default=250)


def screened(args: argparse.Namespace):
    """HO-SFL's federation for a screen (one torch thread, the averaged server): the config,
    the federation and the test set."""
    torch.set_num_threads(1)
    cfg = hosfl.Config(task=args.task, method="hosfl", client_lr=args.lr, server_average=0.99,
                       seed=args.seed, steps=args.steps, out="", progress=False)  # fmt: skip
    fed, test, _ = runner.build(cfg)
    return cfg, fed, test


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    screen_args(ap, "fmnist-cnn", 0.05)
    ap.add_argument("--per", choices=("channel", "scalar"), default="channel")
    args = ap.parse_args()
    cfg, fed, test = screened(args)
    method, replica = fed.server, fed.server.replica
    rows = rows_of_last_module(replica.model)
    evals, start = [], time.perf_counter()
    for t in range(args.steps):
        clients, plan = method.plan(t)
        seeds, how = plan.seeds.tolist(), replica.directions.at(t)
        lams, _ = method.train({c: fed.clients[c].handle(plan) for c in clients}, t)
        with torch.no_grad():
            v = 0
            for c in clients:
                role = fed.clients[c]
                _, x, z, _ = role._pending
                role._pending = None
                v = v + channel_scalars(replica.model, replica.layout, x, z, lams[c].lam, seeds,
                                        cfg.mu, how)  # fmt: skip
            update_(replica.params, rows, seeds, v / len(clients), args.lr, cfg.mu, how,
                    args.per == "channel")  # fmt: skip
        replica.step += 1
        if (t + 1) % args.eval_every == 0 or t + 1 == args.steps:
            acc, _ = runner.evaluate(replica.model, method.evaluated_server, fed.task, test)
            evals.append(round(acc, 4))
            wall = round(time.perf_counter() - start, 1)
            print(json.dumps({"step": t + 1, "test_acc": evals[-1], "wall_s": wall}), flush=True)
    print(json.dumps({**vars(args), "evals": evals}))
    print(f"command: OMP_NUM_THREADS=1 python benchmarks/channel_probes.py --task {args.task} "
          f"--lr {args.lr:g} --per {args.per} --seed {args.seed} --steps {args.steps}")  # fmt: skip


if __name__ == "__main__":
    main()
