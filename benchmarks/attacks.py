"""Robustness: each attack of ``hosfl.attacks`` by 1 or 2 malicious clients of ten, against
each aggregation, on the default task (HO-SFL, M=10, K=3), over seeds; and the honest runs.

    python benchmarks/attacks.py --seeds 0,1,2                      # the README's table
    python benchmarks/attacks.py --seeds 0 --steps 300 --attacks scale-scalars:50,scale-z:50
    python benchmarks/attacks.py net scale-scalars:50 1 OUT steps=300 aggregate=mean
        # over the network engine: hosfl serve and ten hosfl client processes, the first
        # BAD of them attacking

Prints a Markdown table (final accuracy and the mean of the last three evaluations, mean ± sd
over seeds; uploads rejected from honest clients; runs that diverged) and the command, and
writes JSON. A run folder that holds a summary is read, not run again. Two runs at a time, one
torch thread each.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from hosfl.compare import mean_sd

ATTACKS = "none,scale-scalars:50,scale-scalars:1000,scale-scalars:-3,constant-scalars:1,alie:1.5,scale-z:50,random-z:1,flip-labels"  # noqa: E501


def one(args: tuple[str, str, int, int, list[str], str, bool]) -> dict | None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from hosfl import methods
    from hosfl.attacks import attacking
    from hosfl.config import Config
    from hosfl.runfolder import read_metrics
    from hosfl.runner import run

    attack, aggregate, bad, seed, extra, out, read = args
    name, _, value = attack.partition(":")
    label = aggregate.replace("=", "").replace("+", "-")
    folder = Path(out) / f"{name}{value}-{bad}bad-{label}-seed{seed}"
    if not (folder / "summary.json").is_file():
        if read:
            return None
        cfg = Config.load(None, [*extra, *aggregate.split("+"), f"seed={seed}",
                                 "eval_every=100", "progress=false", f"out={folder}"])  # fmt: skip
        malicious = set(range(bad)) if name != "none" else set()
        with attacking(methods.get(cfg.method), malicious, name or "scale-scalars",
                       float(value or 1)):  # fmt: skip
            run(cfg, log=lambda *a: None)
    rows, _ = read_metrics(folder / "metrics.jsonl")
    summary = json.loads((folder / "summary.json").read_text())
    evals = [r["test_acc"] for r in rows if r["event"] == "eval"]
    honest_rejected = sum(1 for r in rows if r["event"] == "reject" and r["client"] >= bad)
    return {"attack": attack, "bad": bad, "aggregate": aggregate, "seed": seed,
            "final": evals[-1] if evals else 0.0, "last3": statistics.mean(evals[-3:] or [0.0]),
            "honest_rejected": honest_rejected, "diverged": summary["diverged_at"] is not None,
            "folder": str(folder)}  # fmt: skip


def edge_client(attack: str, argv: list[str]) -> int:
    """``hosfl client ARGS`` whose role attacks (its id is its --id): the malicious client of a
    network run, a process of its own like every other client."""
    from contextlib import ExitStack

    from hosfl import methods
    from hosfl.attacks import attacking
    from hosfl.cli import main as cli

    name, _, value = attack.partition(":")
    cid = int(argv[argv.index("--id") + 1])
    with ExitStack() as stack:  # the method is known only from the server's config
        for cls in methods.METHODS.values():
            stack.enter_context(attacking(cls, {cid}, name, float(value or 1)))
        return cli(["client", *argv])


def over_network(attack: str, bad: int, settings: list[str], folder: Path) -> dict:
    """One run with ``hosfl serve`` and ten ``hosfl client`` processes on loopback, the first
    ``bad`` of them attacking."""
    from hosfl.edge import keys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        listen = f"127.0.0.1:{sock.getsockname()[1]}"
    secrets = keys.issue(folder.parent / f"{folder.name}-secrets", 10, tls=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "hosfl.cli", "serve", *settings, "clients=10", "tls=off",
         f"out={folder}", f"listen={listen}", f"secrets={secrets}", "progress=false"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    procs = []
    for cid in range(10):
        args = ["--server", listen, "--id", str(cid), "--quiet", "--no-tls",
                "--token", str(keys.token_path(secrets, cid))]  # fmt: skip
        cmd = ([sys.executable, __file__, "edge-client", attack, *args] if cid < bad
               else [sys.executable, "-m", "hosfl.cli", "client", *args])  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env))
    out, _ = server.communicate()
    for p in procs:
        p.wait(timeout=120)
    if server.returncode:
        raise SystemExit(f"hosfl serve failed:\n{out}")
    summary = json.loads((folder / "summary.json").read_text())
    return {"attack": attack, "bad": bad, "engine": "net", "final": summary["test_acc"],
            "rejected": summary["rejected"], "folder": str(folder)}  # fmt: skip


def main() -> None:
    if sys.argv[1:2] == ["edge-client"]:
        raise SystemExit(edge_client(sys.argv[2], sys.argv[3:]))
    if sys.argv[1:2] == ["net"]:  # net ATTACK BAD OUT KEY=VALUE...
        attack, bad, out, *settings = sys.argv[2:]
        row = over_network(attack, int(bad), settings, Path(out))
        print(f"command: python benchmarks/attacks.py net {' '.join(sys.argv[2:])}")
        print(json.dumps(row))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--attacks", default=ATTACKS, help="NAME:VALUE,... (none: honest)")
    parser.add_argument("--bad", default="1,2", help="numbers of malicious clients of ten")
    parser.add_argument("--aggregates", default="aggregate=mean,aggregate=median",
                        help="settings compared, comma-separated (A+B: two in one column)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", default="benchmarks/results/attacks")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--read", action="store_true",
                        help="only read the runs already in --out (a missing one: not counted)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for every run (e.g. method=sfl-v1)")  # fmt: skip
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = [f"steps={args.steps}", *args.set]
    todo = []
    for attack in args.attacks.split(","):
        for bad in [0] if attack == "none" else [int(b) for b in args.bad.split(",")]:
            for aggregate in args.aggregates.split(","):
                todo += [(attack, aggregate, bad, s, extra, args.out, args.read) for s in seeds]
    with ProcessPoolExecutor(args.jobs) as pool:
        runs = [r for r in pool.map(one, todo) if r is not None]
    sets = "".join(f" --set {kv}" for kv in args.set)
    print(f"command: python benchmarks/attacks.py --seeds {args.seeds} --steps {args.steps} "
          f"--attacks {args.attacks} --bad {args.bad} --aggregates {args.aggregates}{sets}\n")
    columns = args.aggregates.split(",")
    print("| attack | malicious | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for attack in args.attacks.split(","):
        for bad in sorted({r["bad"] for r in runs if r["attack"] == attack}):
            cells = []
            for aggregate in columns:
                mine = [r for r in runs if (r["attack"], r["bad"], r["aggregate"])
                        == (attack, bad, aggregate)]  # fmt: skip
                note = sum(r["honest_rejected"] for r in mine)
                diverged = sum(r["diverged"] for r in mine)
                cells.append(mean_sd([r["final"] for r in mine])
                             + (f" ({len(mine)} seeds)" if 1 < len(mine) < len(seeds) else "")
                             + (f", {note} honest rejected" if note else "")
                             + (f", {diverged} diverged" if diverged else ""))  # fmt: skip
            print(f"| {attack} | {bad} | " + " | ".join(cells) + " |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "attacks.json").write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
