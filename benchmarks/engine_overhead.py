"""The Ray engine against the in-process engine, side by side on the same config and seed.

1. Per-step overhead: wall time per step of the same HO-SFL training, in-process and with
   each client a Ray actor process (startup excluded, a few warm-up steps excluded); the final
   weights must be identical.
2. Catch-up: one client process is restarted at the end (it comes back with the initial θ_c)
   and caught up by replaying the journal; the bytes of that catch-up, from the ledger,
   against downloading θ_c once.

    python benchmarks/engine_overhead.py                 # M=10, K=3, default task, 1000 steps
    python benchmarks/engine_overhead.py steps=300
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

from hosfl.config import Config
from hosfl.engines.local import LocalEngine
from hosfl.engines.ray import RayEngine
from hosfl.journal import Journal
from hosfl.metrics.ledger import DOWN, UP, ByteLedger
from hosfl.protocol import ModelWeights, encode
from hosfl.runner import build

DEFAULTS = ["clients=10", "sampled=3", "steps=1000", "progress=false"]
WARMUP = 10


def _train(cfg: Config, engine_name: str, folder: Path):
    fed, _, _ = build(cfg)
    journal = Journal(folder / f"{engine_name}.sqlite")
    ledger = ByteLedger()
    if engine_name == "ray":
        engine = RayEngine(cfg, fed.server, ledger, None, journal)
    else:
        engine = LocalEngine(fed.clients, ledger)
    engine.before_broadcast = lambda m: journal.append(m.step, m.seeds, m.values)
    for t in range(WARMUP):
        fed.server.step(t, engine)
    start = time.perf_counter()
    for t in range(WARMUP, cfg.steps):
        fed.server.step(t, engine)
    ms = 1000 * (time.perf_counter() - start) / (cfg.steps - WARMUP)
    return fed, engine, ledger, ms


def main(overrides: list[str]) -> None:
    cfg = Config.load(None, [*DEFAULTS, *overrides])
    torch.set_num_threads(1)  # as each client process (client_threads=1): identical weights
    ray.init(include_dashboard=False, log_to_driver=False,
             _system_config={"worker_niceness": 0})  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        local_fed, local_engine, _, local_ms = _train(cfg, "local", Path(tmp))
        print(f"in-process: {local_ms:.1f} ms/step", file=sys.stderr, flush=True)
        fed, engine, ledger, ray_ms = _train(cfg, "ray", Path(tmp))
        print(f"ray: {ray_ms:.1f} ms/step", file=sys.stderr, flush=True)
        identical = all(
            torch.equal(a, b)
            for pa, pb in (
                (local_fed.client_model, fed.client_model),
                (local_fed.server_model, fed.server_model),
            )  # fmt: skip
            for a, b in zip(pa.state_dict().values(), pb.state_dict().values(), strict=True)
        )
        # restart client 0's process: it comes back at step 0 and must replay everything
        victim = 0
        engine._fail(victim, cfg.steps, "benchmark: restarted on purpose")
        before = {d: dict(ledger.by_message[d]) for d in (UP, DOWN)}
        refs = engine._start(victim, [], cfg.steps)
        assert refs is not None and engine._finish(victim, refs, 0, cfg.steps)[0]
        catchup = sum(
            n - before[d].get(kind, 0)
            for d in (UP, DOWN)
            for kind, n in ledger.by_message[d].items()
        )
        engine.close()
    theta = torch.cat([p.detach().flatten() for p in fed.client_model.parameters()])
    download = len(encode(ModelWeights(cfg.steps, theta)))
    ray.shutdown()
    command = f"python benchmarks/engine_overhead.py {' '.join(overrides)}".rstrip()
    print(f"\n`{command}`")
    print(f"settings: {' '.join([*DEFAULTS, *overrides])}; one torch thread per process; "
          f"{WARMUP} warm-up steps not timed\n")  # fmt: skip
    print("| engine | ms per step | × in-process |")
    print("|---|---|---|")
    print(f"| in-process | {local_ms:.1f} | 1.00 |")
    print(f"| ray (one actor process per client) | {ray_ms:.1f} | {ray_ms / local_ms:.2f} |")
    same = "yes" if identical else "NO"
    print(f"\nRay overhead per step: {ray_ms - local_ms:+.1f} ms; final weights identical: "
          f"{same}; {engine.verified} client replicas checked equal to the record")  # fmt: skip
    print(f"catch-up of a client that missed {cfg.steps} steps: {catchup:,} bytes "
          f"(CatchUp + Synced, from the ledger) against {download:,} bytes to download θ_c "
          f"(d_c = {theta.numel():,}): download / catch-up = {download / catchup:.2f}; "
          f"replay is the smaller of the two below about d_c/(2P) = "
          f"{theta.numel() // (2 * cfg.P):,} missed steps")  # fmt: skip
    out = Path("benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"engine_overhead-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({
        "command": command, "local_ms_per_step": local_ms, "ray_ms_per_step": ray_ms,
        "identical": identical, "catchup_steps": cfg.steps, "catchup_bytes": catchup,
        "theta_c_download_bytes": download}, indent=2) + "\n")  # fmt: skip
    print(f"written: {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
