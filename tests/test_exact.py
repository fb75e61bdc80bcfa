"""One θ_c on every machine: with exact directions (rademacher, lowrank) the replica's update
is the same bits whichever CPU kernels run it, for every client optimizer, and it is still the
optimizer it says it is."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import killed_at

from hosfl import zo
from hosfl.methods.hosfl import HOSFL
from hosfl.replay import replay_run
from hosfl.runner import resume, run

BENCH = Path(__file__).parent.parent / "benchmarks" / "cross_cpu.py"


def _levels() -> list[str]:
    top = torch.backends.cpu.get_cpu_capability().lower()
    order = ["default", "avx2", "avx512"]
    return order[: order.index(top) + 1] if top in order else ["default"]


@pytest.mark.parametrize(
    ("kind", "optimizer"),
    [("rademacher", "sgd"), ("rademacher", "momentum"), ("rademacher", "adam"), ("lowrank", "sgd")],
)
def test_the_same_history_gives_the_same_bytes_under_every_cpu_capability(kind, optimizer):
    digests = {}
    for level in _levels():
        done = subprocess.run(
            [sys.executable, str(BENCH), "--worker", kind, optimizer, "1", "200"],
            env={**os.environ, "ATEN_CPU_CAPABILITY": level},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        digests[level] = done.stdout.strip()
    assert len(digests) >= 1 and len(set(digests.values())) == 1, digests


@pytest.mark.parametrize(("name", "momentum"), [("sgd", 0.0), ("sgd", 0.9), ("adam", 0.0)])
def test_the_exact_optimizer_is_the_optimizer_it_names(name, momentum):
    """Against torch.optim on the same gradients: equal up to float32 rounding."""
    torch.manual_seed(0)
    mine = [torch.randn(40, 7), torch.randn(13)]
    theirs = [p.clone().requires_grad_(True) for p in mine]
    exact = zo.ExactOptimizer(mine, name, 0.01, momentum)
    ref = (
        torch.optim.SGD(theirs, lr=0.01, momentum=momentum)
        if name == "sgd"
        else (torch.optim.Adam(theirs, lr=0.01))
    )
    for _ in range(25):
        grads = [torch.randn_like(p) for p in mine]
        exact.begin()
        for i, (p, g) in enumerate(zip(mine, grads, strict=True)):
            exact.update_(i, p, -0.01 * g if exact.folds_lr else g)
        for p, g in zip(theirs, grads, strict=True):
            p.grad = g
        ref.step()
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("optimizer", "momentum"), [("sgd", 0.0), ("sgd", 0.9), ("adam", 0.0)])
def test_exact_updates_replay_and_resume_bit_for_bit(small_cfg, tmp_path, optimizer, momentum):
    lr = 0.05 if optimizer == "sgd" else 1e-3
    cfg = dict(directions="rademacher", client_optimizer=optimizer, momentum=momentum,
               client_lr=lr, steps=20, snapshot_every=5, eval_every=0)  # fmt: skip
    whole = run(small_cfg(**cfg, out=str(tmp_path / "whole")), log=lambda *a: None)
    assert replay_run(whole.out).identical
    with killed_at(HOSFL, 13):
        run(small_cfg(**cfg, out=str(tmp_path / "killed")), log=lambda *a: None)
    resumed = resume(tmp_path / "killed", log=lambda *a: None)
    for a, b in ((whole.client_model, resumed.client_model),
                 (whole.server_model, resumed.server_model)):  # fmt: skip
        assert all(
            torch.equal(x, y)
            for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
        )


@pytest.mark.parametrize(
    ("directions", "optimizer", "momentum"),
    [("gaussian", "sgd", 0.0), ("gaussian", "sgd", 0.9), ("gaussian", "adam", 0.0),
     ("rademacher", "sgd", 0.9), ("rademacher", "adam", 0.0)],
)  # fmt: skip
def test_a_replica_restored_from_the_record_continues_exactly_as_the_record(
    small_cfg, directions, optimizer, momentum
):
    from hosfl.methods.replica import Replica
    from hosfl.protocol import ScalarBroadcast, decode, encode
    from hosfl.runner import build

    cfg = small_cfg(directions=directions, client_optimizer=optimizer, momentum=momentum,
                    client_lr=1e-3)  # fmt: skip
    record = build(cfg)[0].server.replica
    drifted = Replica(build(cfg)[0].client_model, cfg)
    values = torch.tensor([1e-3, -2e-3, 5e-4])
    seeds = torch.arange(3, dtype=torch.int32)
    updates = [ScalarBroadcast(t, seeds + 7 * t, values * (t + 1)) for t in range(6)]
    for u in updates[:3]:
        record.apply(u)
    drifted.params[0].data[0, 0, 0, 0] += 1.0  # a replica that has gone its own way
    synced = drifted.restore(decode(encode(record.export())))  # as it crosses the wire
    assert synced == record.synced()
    for u in updates[3:]:
        record.apply(u)
        drifted.apply(u)
    assert drifted.synced() == record.synced()
