"""The network engine (``hosfl serve`` + ten ``hosfl client`` processes on loopback) against the
in-process engine and the Ray engine, side by side in one run, on the default task at M=10, K=3.

For each engine: milliseconds per step (between the train rows' ``wall_s`` after the first
ten steps: start-up and the metered step left out), the bytes of a step by the ledger and, for
the network, by the transport's own frame counters, and the client processes' peak resident
memory (each reports its own ``getrusage`` peak at the end). The final weights of the network
run must equal the in-process run's (every process on one torch thread).

    python benchmarks/network.py                       # 200 steps; TLS on and off
    python benchmarks/network.py --steps 100 --engines local,net

Writes JSON under --out and prints a Markdown table and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from hosfl.edge import keys

HOSFL = [sys.executable, "-m", "hosfl.cli"]
ONE_CORE = False  # --one-core: every process on CPU 0, so that no engine gains by parallelism
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ms_per_step(folder: Path) -> float:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").open()]
    walls = {r["step"]: r["wall_s"] for r in rows if r.get("event") == "train"}
    first, last = 10, max(walls)
    return 1000 * (walls[last] - walls[first]) / (last - first)


def _pin() -> None:
    if ONE_CORE:
        os.sched_setaffinity(0, {0})


def _run(engine: str, settings: list[str], folder: Path, clients: int) -> dict:
    """Train with ``engine`` (local, ray, net, net-tls); the figures of its run folder."""
    start = time.perf_counter()
    if engine in ("local", "ray"):
        cmd = [*HOSFL, "run", *settings, f"engine={engine}", f"out={folder}"]
        subprocess.run(cmd, env=ENV, check=True, capture_output=True, preexec_fn=_pin)
    else:
        tls = engine == "net-tls"
        secrets = keys.issue(folder.parent / f"{folder.name}-secrets", clients, tls=tls)
        listen = f"127.0.0.1:{_port()}"
        server = subprocess.Popen(
            [*HOSFL, "serve", *settings, f"out={folder}", f"listen={listen}",
             f"secrets={secrets}", f"tls={'on' if tls else 'off'}"],  # fmt: skip
            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            preexec_fn=_pin,
        )
        security = ["--ca", str(secrets / keys.CERT)] if tls else ["--no-tls"]
        procs = [
            subprocess.Popen(
                [*HOSFL, "client", "--server", listen, "--id", str(cid), "--quiet",
                 "--token", str(keys.token_path(secrets, cid)), *security],  # fmt: skip
                env=ENV,
                preexec_fn=_pin,
            )
            for cid in range(clients)
        ]
        out, _ = server.communicate()
        if server.returncode:
            for p in procs:
                p.kill()
            raise SystemExit(f"hosfl serve failed:\n{out}")
        for p in procs:
            p.wait(timeout=120)
    summary = json.loads((folder / "summary.json").read_text())
    steps = summary["steps"]
    ledger = {d: sum(n.values()) / steps for d, n in summary["bytes"].items()}
    wire = summary.get("wire_bytes") or {}
    return {
        "engine": engine,
        "ms_per_step": _ms_per_step(folder),
        "client_ms_per_step": summary["client_ms_per_step"],
        "ledger_bytes_per_step": ledger,
        "wire_bytes_per_step": {d: n / steps for d, n in wire.items()},
        "client_peak_rss_mib": (summary["client_peak_rss"] or 0) / 2**20,
        "test_acc": summary["test_acc"],
        "wall_s": time.perf_counter() - start,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--engines", default="local,net,net-tls,ray")
    ap.add_argument("--out", default="benchmarks/results/network")
    ap.add_argument("--one-core", action="store_true",
                    help="every process on CPU 0: the clients' work serialised for every engine, "
                    "so the differences are the transports' own cost")  # fmt: skip
    args = ap.parse_args()
    global ONE_CORE
    ONE_CORE = args.one_core
    clients = 10
    settings = [f"clients={clients}", "sampled=3", f"steps={args.steps}", "eval_every=0",
                "progress=false", "client_threads=1"]  # fmt: skip
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for engine in args.engines.split(","):
            folder = Path(tmp) / engine
            results.append(_run(engine, settings, folder, clients))
            print(f"{engine}: {results[-1]['ms_per_step']:.1f} ms/step", file=sys.stderr)
        ckpts = {
            r["engine"]: torch.load(Path(tmp) / r["engine"] / "checkpoint.pt", weights_only=True)
            for r in results
        }
    same = {
        e: all(torch.equal(ckpts[e][p][k], ckpts["local"][p][k])
               for p in ("client", "server") for k in ckpts["local"][p])  # fmt: skip
        for e in ckpts
        if "local" in ckpts and e != "local"
    }
    base = {r["engine"]: r["ms_per_step"] for r in results}
    lines = [
        "| engine | ms / step | − in-process | − Ray | bytes/step up · down (ledger) | "
        "frame bytes/step up · down (transport) | client peak RSS (MiB) | weights = in-process |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        led, wire = r["ledger_bytes_per_step"], r["wire_bytes_per_step"]
        wire_txt = (
            f"{wire['up']:,.0f} · {wire['down']:,.0f} "
            f"(+{100 * (wire['up'] / led['up'] - 1):.2f} % · "
            f"+{100 * (wire['down'] / led['down'] - 1):.2f} %)"
            if wire
            else "–"
        )
        rss = f"{r['client_peak_rss_mib']:.0f}" if r["client_peak_rss_mib"] else "–"
        d_local = r["ms_per_step"] - base["local"] if "local" in base else float("nan")
        d_ray = r["ms_per_step"] - base["ray"] if "ray" in base else float("nan")
        lines.append(
            f"| {r['engine']} | {r['ms_per_step']:.1f} | {d_local:+.1f} | {d_ray:+.1f} | "
            f"{led['up']:,.0f} · {led['down']:,.0f} | {wire_txt} | "
            f"{rss} | {same.get(r['engine'], '–')} |"
        )
    table = "\n".join(lines)
    print(table)
    where = "every process on CPU 0" if args.one_core else f"{os.cpu_count()} CPUs"
    print(f"\nM=10, K=3, default task, {args.steps} steps, one torch thread a process, {where}.")
    flag = " --one-core" if args.one_core else ""
    print(f"command: python benchmarks/network.py --steps {args.steps} --engines {args.engines}"
          f"{flag}")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"network{'-one-core' if args.one_core else ''}.json"
    (out / name).write_text(json.dumps({"results": results, "same": same}, indent=2))


if __name__ == "__main__":
    main()
