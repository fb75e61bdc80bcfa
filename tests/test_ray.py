"""Clients as real processes (Ray actors in local mode): the same weights as in-process, catch-up
by replay, a client killed mid-step, and the server's record checked against every replica."""

import json
import os
import signal
import struct
import time

import pytest
import ray
import torch
from conftest import only_read

from hosfl.engines.ray import ClientProcess, RayEngine
from hosfl.journal import Journal
from hosfl.methods.shard import sample_clients
from hosfl.methods.weights import digest
from hosfl.metrics.ledger import ByteLedger
from hosfl.protocol import CatchUp, SmashedData, decode, encode
from hosfl.runner import build, run


@pytest.fixture(scope="module", autouse=True)
def cluster():
    # Client processes use one torch thread (client_threads=1); results depend on the thread
    # count, so the in-process runs compared with them use one too.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # the client processes import the test tasks by path (test_library:digits_bn), as a
    # user's workers import theirs
    here = os.path.dirname(__file__)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _system_config={"worker_niceness": 0},
    )
    yield
    ray.shutdown()
    torch.set_num_threads(threads)


def _weights(model):
    return list(model.state_dict().values())


def _identical(a, b):
    return all(torch.equal(x, y) for x, y in zip(_weights(a), _weights(b), strict=True))


def test_ray_and_in_process_runs_give_identical_weights_and_every_replica_in_step(
    small_cfg, tmp_path
):
    cfg = dict(clients=4, sampled=2, steps=12, eval_every=6)
    local = run(small_cfg(**cfg, out=str(tmp_path / "local")), log=lambda *a: None)
    remote = run(small_cfg(**cfg, engine="ray", out=str(tmp_path / "ray")), log=lambda *a: None)
    assert _identical(local.client_model, remote.client_model)
    assert _identical(local.server_model, remote.server_model)
    assert remote.accuracy == local.accuracy
    # clients not sampled for a while were caught up from the journal, not sent weights
    assert remote.ledger.by_message["down"]["CatchUp"] > 0
    assert "weights" not in remote.ledger.as_dict()["down"]
    assert remote.summary["clients_in_sync"] == 4 and remote.summary["rejected"] == 0
    # each client process metered its own step: the same tensors as the in-process client
    assert remote.summary["client_peak_bytes"] == local.summary["client_peak_bytes"]


def test_a_client_that_missed_steps_replays_them_to_the_servers_theta_c(small_cfg):
    cfg = small_cfg(clients=3, sampled=1, steps=15)
    result = run(cfg, log=lambda *a: None)
    journal = Journal(result.out / "journal.sqlite", create=False)
    seeds, values = zip(*journal.entries(), strict=True)
    late = ClientProcess(cfg.to_dict(), cid=2, threads=1)  # a fresh client at step 0
    assert late.role.replica.step == 0
    synced = decode(late.handle(encode(CatchUp(0, torch.stack(seeds), torch.stack(values)))))
    assert synced.step == 15
    assert synced.digest == digest([p for p in result.client_model.parameters()])
    assert _identical(late.role.replica.model, result.client_model)
    # a catch-up that overlaps what the client has is applied from where the client is
    again = decode(
        late.handle(encode(CatchUp(10, torch.stack(seeds[10:]), torch.stack(values[10:]))))
    )
    assert again.step == 15 and again.digest == synced.digest


def test_a_client_killed_mid_step_is_restarted_resynced_and_the_run_is_unchanged(
    small_cfg, tmp_path
):
    steps, kill_at = 8, 4
    cfg = small_cfg(clients=3, sampled=2, steps=steps, engine="ray", out=str(tmp_path / "r"))
    fed, _, _ = build(cfg)
    journal = Journal(tmp_path / "journal.sqlite")
    engine = RayEngine(cfg, fed.server, ByteLedger(), None, journal)
    engine.before_broadcast = lambda m: journal.append(m.step, m.seeds, m.values)
    victim = sample_clients(cfg, kill_at)[0]
    train = fed.server.train

    def train_then_kill(smashed, t):
        if t == kill_at:  # the victim has sent z and waits for λ: kill its process
            os.kill(ray.get(engine.actors[victim].pid.remote()), signal.SIGKILL)
        return train(smashed, t)

    fed.server.train = train_then_kill
    try:
        for t in range(steps):
            fed.server.step(t, engine)
    finally:
        engine.close()
    reasons = [r for r in engine.events if r["event"] == "reject" and r["client"] == victim]
    assert reasons and reasons[0]["step"] == kill_at, engine.events
    assert engine.verified == 3  # the restarted client caught up to the record bit for bit
    reference = run(
        small_cfg(clients=3, sampled=2, steps=steps, out=str(tmp_path / "ref")), log=lambda *a: None
    )
    assert _identical(fed.client_model, reference.client_model)
    assert _identical(fed.server_model, reference.server_model)


def test_malformed_bytes_from_a_client_process_are_dropped_with_a_reason(small_cfg, tmp_path):
    cfg = small_cfg(clients=2, sampled=1, steps=2, engine="ray", out=str(tmp_path / "r"))
    fed, _, _ = build(cfg)
    journal = Journal(tmp_path / "journal.sqlite")
    engine = RayEngine(cfg, fed.server, ByteLedger(), None, journal)
    try:
        good = encode(SmashedData(0, torch.ones(2, 32, 7, 7), torch.tensor([1, 2])))
        nan = bytearray(good)
        nan[-16 - 4 : -16] = struct.pack("<f", float("nan"))  # one z value, on the wire
        cases = {
            b"GET / HTTP/1.1\r\n": "not a hosfl v1 message",
            bytes(nan): "NaN or infinite",
            good[:-5]: "truncated",
        }
        for data, reason in cases.items():
            ok, reply = engine._finish(0, [ray.put(data)], 1, 0)
            assert ok and reply is None  # dropped; the client process itself is kept
            assert reason in engine.events[-1]["reason"], engine.events[-1]
        assert engine.synced[0] == 0 and len(engine.events) == 3
    finally:
        engine.close()
    assert engine.verified == 2


@pytest.mark.parametrize(
    "method", ["hosfl", "sfl-v1", "sfl-v2", "zo-sfl", "hosl", "fedavg", "zo-fl", "frozen"]
)
def test_every_method_gives_the_same_weights_in_process_and_as_ray_processes(
    method, small_cfg, tmp_path
):
    # two client processes, both sampled: a third would only add a process start-up; a model
    # with BatchNorm on both sides, whose statistics must come back from the client processes
    cfg = dict(task="test_library:digits_bn", method=method, clients=2, sampled=2, steps=4,
               eval_every=4, P=2, batch_size=8, client_lr=0.01)  # fmt: skip
    cfg = only_read(cfg)
    local = run(small_cfg(**cfg, out=str(tmp_path / "local")), log=lambda *a: None)
    remote = run(small_cfg(**cfg, engine="ray", out=str(tmp_path / "ray")), log=lambda *a: None)
    assert _identical(local.client_model, remote.client_model)
    assert _identical(local.server_model, remote.server_model)
    moved = bool(local.client_model[1].running_mean.abs().sum())  # trained in train mode
    assert moved == (method in ("sfl-v1", "sfl-v2", "fedavg")), method
    assert remote.summary["rejected"] == 0

    def payload(result):  # Ray adds the Synced replies: framing only
        return {k: n for k, n in result.ledger.as_dict()["up"].items() if k != "framing"}

    assert payload(remote) == payload(local)


@pytest.mark.parametrize(("directions", "drifts"), [("rademacher", False), ("gaussian", True)])
def test_a_client_on_another_kind_of_cpu_stays_in_sync_or_is_resynced(
    directions, drifts, small_cfg, tmp_path, monkeypatch
):
    """Client 0 runs under ATEN_CPU_CAPABILITY=default (scalar kernels), the others under this
    CPU's best. torch's initialisers give client 0 other initial weights from the same seed:
    it starts from the record's (a resync at step 0). Then exact updates keep every digest
    equal at every check, while Gaussian directions drift and are resynced from the record,
    logged and counted; either way the run ends with every replica equal to the record."""
    if torch.backends.cpu.get_cpu_capability().lower() == "default":
        pytest.skip("this CPU has no vector kernels to compare the scalar ones with")
    monkeypatch.setattr(RayEngine, "actor_env", {0: {"ATEN_CPU_CAPABILITY": "default"}})
    cfg = dict(clients=3, sampled=3, steps=8, eval_every=0, check_every=2, directions=directions)
    remote = run(small_cfg(**cfg, engine="ray", out=str(tmp_path / "ray")), log=lambda *a: None)
    rows = [json.loads(x) for x in (remote.out / "metrics.jsonl").read_text().splitlines()]
    resyncs = [r for r in rows if r["event"] == "resync"]
    assert remote.summary["clients_in_sync"] == 3
    assert {r["client"] for r in resyncs} == {0}, resyncs
    assert resyncs[0]["step"] == 0 and "initial weights" in resyncs[0]["reason"]
    later = [r for r in resyncs if r["step"] > 0]
    assert bool(later) == drifts, resyncs
    assert remote.ledger.by_message["down"]["ReplicaState"] > 0


def test_a_replica_corrupted_mid_run_is_detected_resynced_and_counted(small_cfg, tmp_path):
    from hosfl.protocol import ReplicaState

    cfg = small_cfg(clients=3, sampled=3, steps=6, check_every=2, engine="ray",
                    out=str(tmp_path / "r"))  # fmt: skip
    fed, _, _ = build(cfg)
    journal = Journal(tmp_path / "journal.sqlite")
    engine = RayEngine(cfg, fed.server, ByteLedger(), None, journal)
    engine.before_broadcast = lambda m: journal.append(m.step, m.seeds, m.values)
    try:
        for t in range(cfg.steps):
            fed.server.step(t, engine)
            if t == 2:  # one bit of client 1's θ_c flipped, through the wire
                good = fed.server.replica.export()
                bits = good.weights.clone().view(torch.int32)
                bits[5] ^= 1 << 20
                ray.get(engine.actors[1].handle.remote(encode(ReplicaState(
                    good.step, bits.view(torch.float32), good.state))))  # fmt: skip
    finally:
        engine.close()
    (event,) = [e for e in engine.events if e["client"] == 1]
    assert event["step"] == 4 and "drifted" in event["reason"]  # the next check, at step 4
    assert engine.ledger.by_message["down"]["ReplicaState"] > 0
    assert engine.verified == 3  # every replica equals the record at the end


def test_a_step_that_raises_still_lets_the_client_processes_go(small_cfg, tmp_path, monkeypatch):
    from hosfl.methods.hosfl import HOSFL

    released = []
    original = RayEngine._release
    monkeypatch.setattr(RayEngine, "_release", lambda self: (released.append(self),
                                                             original(self)))  # fmt: skip

    def broken(self, t, engine):
        if t == 1:
            raise RuntimeError("a user's bug in step 1")
        return real(self, t, engine)

    real = HOSFL.step
    monkeypatch.setattr(HOSFL, "step", broken)
    cfg = small_cfg(clients=2, sampled=2, steps=3, engine="ray", out=str(tmp_path / "r"))
    with pytest.raises(RuntimeError, match="a user's bug"):
        run(cfg, log=lambda *a: None)
    (engine,) = released  # let go once, on the failing path
    deadline = time.monotonic() + 60  # ray.kill is asynchronous
    while any(_alive(a) for a in engine.actors):
        assert time.monotonic() < deadline, "a client process outlived its run"
        time.sleep(0.5)


def _alive(actor) -> bool:
    try:
        ray.get(actor.pid.remote(), timeout=5)
        return True
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return False
