"""The timeline model against the real transport: one run in-process (which records the step's
shape and compute), the same run over ``hosfl serve`` and ``hosfl client`` processes on
loopback with an emulated link (``HOSFL_TEST_LINK``: a round trip and a bandwidth, both ways,
every client), and ``hosfl timeline``'s prediction for that link beside the measured clock.

    python benchmarks/loopback.py --rtt-ms 100 --mbps 20 --steps 30
    python benchmarks/loopback.py --rtt-ms 100 --mbps 20 --steps 30 method=sfl-v1

Measured: the net run's wall clock from the end of step 2 to the end of its last step (the
clients' start-up, the memory-metered step 1 and the final evaluation left out); predicted:
the model's clock over the same steps, under a profile of the injected numbers with the
clients' and the server's compute as measured in-process. Prints a table and one JSON line;
the in-process and the network run also reach the same weights, bit for bit. Run it with
OMP_NUM_THREADS=1 (the clients are processes of their own; the machine should be quiet).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from hosfl.config import Config
from hosfl.edge import keys, wire
from hosfl.runfolder import read_metrics
from hosfl.runner import run
from hosfl.timeline import Profile, simulate

SMALL = dict(clients=2, sampled=2, batch_size=16, train_subset=3000, test_subset=500,
             eval_every=0, client_threads=1, progress="false", cut_dtype="bfloat16")  # fmt: skip
FIRST = 2  # the window starts after this step


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(rtt_ms: float, mbps: float, steps: int, settings: list[str], out: Path) -> dict:
    cli = [sys.executable, "-m", "hosfl.cli"]
    cfg = Config.load(None, [*(f"{k}={v}" for k, v in SMALL.items()), f"steps={steps}",
                             *settings, f"out={out / 'local'}"])  # fmt: skip
    torch.set_num_threads(1)
    local = run(cfg, log=lambda *a: None)
    secrets = keys.issue(out / "secrets", cfg.clients)
    listen = f"127.0.0.1:{_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", wire.LINK_ENV: f"{rtt_ms},{mbps}"}
    net = {**cfg.to_dict(), "out": str(out / "net"), "listen": listen, "secrets": str(secrets)}
    server = subprocess.Popen([*cli, "serve", *(f"{k}={v}" for k, v in net.items())],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)  # fmt: skip
    clients = [subprocess.Popen([*cli, "client", "--server", listen, "--id", str(c), "--token",
                                 str(keys.token_path(secrets, c)), "--no-tls", "--quiet"],
                                env=env) for c in range(cfg.clients)]  # fmt: skip
    log, _ = server.communicate(timeout=900)
    for c in clients:
        c.wait(timeout=120)
    if server.returncode != 0:
        raise SystemExit(f"the network run failed:\n{log}")
    rows, _ = read_metrics(out / "net" / "metrics.jsonl")
    wall = {r["step"]: r["wall_s"] for r in rows if r["event"] == "train"}
    measured = (wall[steps] - wall[FIRST]) / (steps - FIRST)
    link = Profile("loopback", about="the emulated link", uplink_mbps=mbps, downlink_mbps=mbps,
                   rtt_ms=rtt_ms)  # fmt: skip
    clock = simulate(out / "local", link)["clock"]
    predicted = (clock[steps] - clock[FIRST]) / (steps - FIRST)
    remote = torch.load(out / "net" / "checkpoint.pt", weights_only=True)["client"]
    same = all(torch.equal(remote[k], v) for k, v in local.client_model.state_dict().items())
    return {"method": cfg.method, "cut_dtype": cfg.cut_dtype, "rtt_ms": rtt_ms, "mbps": mbps,
            "steps": steps, "measured_s_per_step": measured, "predicted_s_per_step": predicted,
            "error": predicted / measured - 1, "same_weights": same}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rtt-ms", type=float, default=100.0)
    ap.add_argument("--mbps", type=float, default=20.0)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=None, help="where the run folders go (default: a temp dir)")
    ap.add_argument("settings", nargs="*", help="key=value for both runs")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        r = measure(args.rtt_ms, args.mbps, args.steps, args.settings, Path(args.out or tmp))
    print(f"| method | cut_dtype | link | measured s/step | predicted s/step | error | weights |\n"
          f"|---|---|---|---:|---:|---:|---|\n"
          f"| {r['method']} | {r['cut_dtype']} | {r['rtt_ms']:g} ms round trip, {r['mbps']:g} "
          f"Mbit/s | {r['measured_s_per_step']:.4f} | {r['predicted_s_per_step']:.4f} | "
          f"{100 * r['error']:+.1f} % | {'in-process = network' if r['same_weights'] else 'DIFFER'}"
          f" |\n\ncommand: OMP_NUM_THREADS=1 python benchmarks/loopback.py "
          f"{' '.join(sys.argv[1:] if argv is None else argv)}")  # fmt: skip
    print(json.dumps(r))


if __name__ == "__main__":
    main()
