"""Ray engine: each client is a Ray actor, a process of its own (on this machine or another),
holding its own data shard and its own client role, built from the config alone by the
method's ``client(shard)``. The server (this process) and the actors exchange nothing but
encoded protocol messages (bytes); the ledger counts those bytes. The engine knows no method:
it uses the Method and ClientRole contracts (``methods/base.py``) only.

Keeping replicas in step without weights (methods whose ``seed_synced`` is true):
- the clients of a step get its (seeds, v̄) broadcast at once;
- a client that was not sampled for a while (or that restarted) gets, before its next
  StepPlan, one CatchUp message with the journal rows it missed, replays them and answers
  Synced(step, digest); the digest must equal that of the server's own record of θ_c;
- at the end every client is caught up and checked the same way.

Faults: a client that fails (its process dies, it raises, or it does not answer within
``client_timeout`` seconds) is killed and restarted by Ray (max_restarts=-1), re-synced from the
journal, and its part of the step is asked again, up to ``client_retries`` times; a client
that still fails is dropped from the step with a logged reason, and the step completes with
the others.
Ray's own guarantees are what they are: the actors are reached by the handles this run created
(the server accepts replies only to its own calls on them), and cluster membership is guarded
by Ray's token authentication and TLS (docs/DISTRIBUTED.md).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

import ray
import torch

from hosfl import methods, tasks
from hosfl.config import Config, ConfigError
from hosfl.journal import Journal
from hosfl.methods.base import Method, Shard
from hosfl.metrics.ledger import DOWN, UP, ByteLedger
from hosfl.metrics.memory import meter
from hosfl.protocol import (
    CatchUp,
    Message,
    ProtocolError,
    ReplicaState,
    ScalarBroadcast,
    StepPlan,
    Synced,
    decode,
    encode,
)


class ClientProcess:
    """One client, in its own process: builds its shard and replica from the config alone."""

    def __init__(self, config: dict, cid: int, threads: int) -> None:
        torch.set_num_threads(threads)
        cfg = Config.from_dict(config).validate()
        task, client_model, server_model = tasks.prepare(cfg)
        device = cfg.device_of("client")  # resolved here, on the client's own machine
        client_model.to(device)
        train = task.load("train", cfg.train_subset)
        shard = Shard(cid, train, task.partition(cfg, train)[cid], cfg.seed, device)
        method = methods.get(cfg.method)(cfg, client_model, server_model, task)
        self.role = method.client(shard)
        self.measure_step = min(1, cfg.steps - 1)
        self.meter = meter(device)  # one meter across the calls of the measured step
        self.seconds = 0.0

    def handle(self, data: bytes) -> bytes | None:
        msg = decode(data)
        if isinstance(msg, CatchUp):
            return encode(self.role.catch_up(msg))
        if isinstance(msg, ReplicaState):
            return encode(self.role.restore(msg))
        start = time.perf_counter()
        if msg.step == self.measure_step and not isinstance(msg, ScalarBroadcast):
            with self.meter:
                reply = self.role.handle(msg)
        else:
            reply = self.role.handle(msg)
            self.seconds += time.perf_counter() - start
        return None if reply is None else encode(reply)

    def state(self) -> bytes:
        """Where the client's replica is; Synced(0, 0) for a client that keeps none."""
        return encode(self.role.synced() or Synced(0, 0))

    def stats(self) -> tuple[int, float]:
        return self.meter.peak, self.seconds

    def pid(self) -> int:
        return os.getpid()


STARTUP = 300.0  # seconds a client process may take to start (import torch, load its data)


class RayEngine:
    # Environment variables of chosen client processes, by client id (the tests run one client
    # under another ATEN_CPU_CAPABILITY: another kind of CPU, on one machine).
    actor_env: dict[int, dict[str, str]] = {}

    def __init__(
        self,
        cfg: Config,
        method: Method,
        ledger: ByteLedger,
        measure_step: int | None,
        journal: Journal | None,
    ) -> None:
        self.cfg, self.ledger, self.journal = cfg, ledger, journal
        self.retries, self.timeout = cfg.client_retries, cfg.client_timeout
        self.method = method
        self.seed_synced = method.seed_synced and journal is not None
        self.before_broadcast = lambda msg: None
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            # Ray runs workers at nice 15 by default; a client is on the step's critical path.
            # On one machine: a loopback node address, no dashboard (Ray 2.60 still listens on
            # every interface: docs/DISTRIBUTED.md).
            local = (
                {}
                if cfg.ray_address
                else {"_system_config": {"worker_niceness": 0}, "_node_ip_address": "127.0.0.1"}
            )
            ray.init(
                address=cfg.ray_address or None,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
                **local,
            )
        actor = ray.remote(ClientProcess)
        # The K clients of a step run at once; on one machine more threads each only contend.
        # (Results depend on the thread count: equal counts give bit-identical runs.)
        threads = cfg.client_threads or torch.get_num_threads()
        gpus = self._gpus_per_client(cfg)
        self.actors = []
        for cid in range(cfg.clients):
            # Across machines each client goes to the node that offers its resource
            # (``ray start --resources='{"hosfl_client_3": 1}'``); on one machine, anywhere.
            res = {f"hosfl_client_{cid}": 1} if cfg.ray_address else {}
            opts = dict(num_cpus=0, num_gpus=gpus, max_restarts=-1, resources=res)
            if cid in self.actor_env:
                opts["runtime_env"] = {"env_vars": self.actor_env[cid]}
            self.actors.append(actor.options(**opts).remote(cfg.to_dict(), cid, threads))
        self.synced: dict[int, int | None] = dict.fromkeys(range(cfg.clients), None)
        started = {cid: self._state(cid) for cid in range(cfg.clients)}  # every process is up
        self._pids = ray.get([a.pid.remote() for a in self.actors])
        self._plans: dict[int, StepPlan] = {}  # each client's StepPlan of the current step
        self._told: dict[int, list[Message]] = {}  # what each was told at the current step
        self._asked: set[int] = set()  # the clients of the current step
        self.measure_step = measure_step
        # clients whose θ_c was checked equal to the record at the end (None: no record)
        self.verified: int | None = 0 if self.seed_synced else None
        self.check_every = cfg.check_every
        self._due: set[int] = set()  # clients whose digest is to be checked before the next step
        self.events: list[dict] = []  # resyncs, for metrics.jsonl
        if self.seed_synced and method.synced().step == 0:
            # A client on another kind of CPU can build other initial weights from the same
            # seed (torch's initialisers fuse differently): it starts from the record's.
            for cid, state in started.items():
                if state.digest != self._record_digest():
                    self._resync(cid, 0, "initial weights built on another kind of CPU")
        self.client_peak_bytes = 0  # filled in by close()
        self._seconds = float("nan")

    # --- bytes on the wire ---------------------------------------------------------------
    def _send(self, cid: int, msg: Message) -> ray.ObjectRef:
        data = encode(msg)
        self.ledger.record(DOWN, msg)
        return self.actors[cid].handle.remote(data)

    def _receive(self, data: bytes) -> Message:
        msg = decode(_bytes(data))
        self.ledger.record(UP, msg)
        return msg

    def _record_digest(self) -> int:
        return self.method.synced().digest

    # --- keeping a client's replica in step ----------------------------------------------
    def _catch_up(self, cid: int, target: int) -> list[ray.ObjectRef]:
        """Calls (not awaited) that bring client ``cid`` from its known step to ``target``."""
        if not self.seed_synced:
            return []
        if self.synced[cid] is None:
            self._state(cid)
        have = self.synced[cid]
        if have == target:
            return []
        if have > target:
            raise ProtocolError(f"client {cid} is at step {have}, ahead of the server ({target})")
        seeds, values = zip(*self.journal.entries(have, target), strict=True)
        return [self._send(cid, CatchUp(have, torch.stack(seeds), torch.stack(values)))]

    @staticmethod
    def _gpus_per_client(cfg: Config) -> float:
        """Ray's GPU share of one client process: none unless the clients compute on CUDA;
        ``client_gpus``, or the cluster's GPUs divided among the M clients (at most one)."""
        name = cfg.client_device or cfg.device
        if not name.startswith(("cuda", "auto")):
            return 0.0
        total = ray.cluster_resources().get("GPU", 0.0)
        if name == "auto" and not total:
            return 0.0  # auto on a cluster without GPUs: the CPU
        if not total:
            raise ConfigError("client_device=cuda: this Ray cluster offers no GPU")
        return cfg.client_gpus or min(1.0, total / cfg.clients)

    def _state(self, cid: int) -> Synced:
        """Ask client ``cid`` where its replica is, waiting (up to STARTUP seconds) while its
        process starts or restarts (loading its data takes a while)."""
        deadline = time.monotonic() + max(STARTUP, self.timeout)
        while True:
            try:
                reply = decode(
                    _bytes(ray.get(self.actors[cid].state.remote(), timeout=self.timeout))
                )
                break
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.ledger.record(UP, reply)
        self.synced[cid] = reply.step
        return reply

    def _fail(self, cid: int, step: int, why: str) -> None:
        """Client ``cid`` failed: restart its process; it re-syncs from the journal."""
        self.method.reject(step, cid, why)
        ray.kill(self.actors[cid], no_restart=False)
        self.synced[cid] = None
        # ray.kill returns at once: wait for the new process, so no call reaches the old one
        deadline = time.monotonic() + STARTUP
        while time.monotonic() < deadline:
            try:
                pid = ray.get(self.actors[cid].pid.remote(), timeout=self.timeout)
            except ray.exceptions.RayError:
                pid = self._pids[cid]
            if pid != self._pids[cid]:
                self._pids[cid] = pid
                return
            time.sleep(0.1)

    def _start(self, cid: int, msgs: list[Message], step: int) -> list | None:
        """Submit the catch-up ``cid`` needs to be at ``step``, then ``msgs``; not awaited."""
        try:
            return self._catch_up(cid, step) + [self._send(cid, m) for m in msgs]
        except (ray.exceptions.RayError, ProtocolError) as e:
            self._fail(cid, step, _reason(e))
            return None

    def _finish(self, cid: int, refs: list, sent: int, step: int) -> tuple[bool, Message | None]:
        """Await ``refs``: (False, None) if the client failed (it is restarted), else (True,
        the reply to the last message sent, or None if that reply was malformed: dropped)."""
        try:
            out = ray.get(refs, timeout=self.timeout)
        except ray.exceptions.RayError as e:
            self._fail(cid, step, _reason(e))
            return False, None
        try:
            if len(out) > sent:
                synced = self._receive(out[0])
                if not isinstance(synced, Synced) or synced.step != step:
                    raise ProtocolError(f"catch-up to step {step} answered {synced}")
                if synced.digest != self._record_digest():
                    # what it answered after the catch-up came from a drifted replica: take
                    # the record, and let the caller ask again
                    self._resync(cid, step, "after catch-up")
                    return False, None
        except ProtocolError as e:
            self._fail(cid, step, str(e))
            return False, None
        self.synced[cid] = step
        replies = out[len(out) - sent :]
        try:
            received = [self._receive(r) for r in replies if r is not None]
        except ProtocolError as e:
            self.method.reject(step, cid, str(e))  # malformed: dropped, the client is kept
            return True, None
        return True, received[-1] if sent and received else None

    def ask(self, requests: Mapping[int, Message]) -> dict[int, Message]:
        """Each client's reply to its request. A client that fails is restarted, re-synced and
        asked again (``retries`` times; a restarted client needs its StepPlan again before a
        λ); one that still fails is left out of the step (logged)."""
        for cid in sorted(self._due):
            self._check(cid)
        self._due.clear()
        for cid, msg in requests.items():
            self._at(cid, msg.step)
            if isinstance(msg, StepPlan):
                self._plans[cid] = msg
        started = {cid: self._start(cid, [requests[cid]], requests[cid].step) for cid in requests}
        replies = {}
        for cid in sorted(requests):
            msg = requests[cid]
            ok, reply = False, None
            if started[cid] is not None:
                ok, reply = self._finish(cid, started[cid], 1, msg.step)
            for _ in range(0 if ok else self.retries):
                todo = [
                    *self._told[cid],
                    *([] if isinstance(msg, StepPlan) else [self._plans[cid]]),
                    msg,
                ]
                refs = self._start(cid, todo, msg.step)
                if refs is not None:
                    ok, reply = self._finish(cid, refs, len(todo), msg.step)
                if ok:
                    break
            if reply is not None:
                replies[cid] = reply
        return replies

    def _at(self, cid: int, step: int) -> None:
        """Note that client ``cid`` takes part in ``step`` (a new step forgets the last)."""
        if self._plans.get(cid) is not None and self._plans[cid].step != step:
            self._plans.pop(cid)
        if any(m.step != step for m in self._told.get(cid, [])):
            self._told[cid] = []
        self._told.setdefault(cid, [])
        if self._step != step:
            self._step, self._asked = step, set()
        self._asked.add(cid)

    _step = -1

    def tell(self, messages: Mapping[int, Message]) -> None:
        """Send each client its message, not awaited: an actor runs its calls in order, and a
        client that failed shows it at its next call (where what it was told is sent again)."""
        for cid in sorted(messages):
            msg = messages[cid]
            self._at(cid, msg.step)
            self._told[cid].append(msg)
            self._start(cid, [msg], msg.step)

    def broadcast(self, msg: Message) -> None:
        """Journal the update and send it to the step's clients (the others catch up from the
        journal when next sampled). Replies are not awaited: an actor runs its calls in order,
        and a client that failed to apply shows it at its next call."""
        self.before_broadcast(msg)
        for cid in sorted(self._asked if self._step == msg.step else ()):
            if not self.seed_synced:
                self._send(cid, msg)
            elif self.synced[cid] == msg.step:
                self._send(cid, msg)
                self.synced[cid] = msg.step + 1
                if self.check_every and (msg.step + 1) % self.check_every == 0:
                    self._due.add(cid)

    # --- drift: a replica that differs from the record is resynced from it -----------------
    def _check(self, cid: int) -> None:
        """Compare client ``cid``'s digest with the record's (at the same step)."""
        try:
            state = self._state(cid)
            record = self.method.synced()
            if state.step == record.step and state.digest != record.digest:
                self._resync(cid, record.step, f"digest {state.digest:x} against {record.digest:x}")
        except (ray.exceptions.RayError, ProtocolError) as e:
            self._fail(cid, self.method.synced().step, _reason(e))

    def _resync(self, cid: int, step: int, why: str) -> None:
        """Send client ``cid`` the record's θ_c and optimizer state; log it; check it took."""
        reply = self._receive(
            ray.get(self._send(cid, self.method.replica.export()), timeout=self.timeout)
        )
        if not isinstance(reply, Synced) or reply.digest != self._record_digest():
            raise ProtocolError(f"client {cid} did not take the server's record at step {step}")
        self.synced[cid] = step
        self.events.append(
            {
                "event": "resync",
                "step": step,
                "client": cid,
                "reason": f"replica drifted ({why}); resynced from the record",
            }
        )

    # --- end of run and figures -----------------------------------------------------------
    def close(self) -> None:
        """Bring every client to the final step and check each replica against the record."""
        try:
            for cid in range(self.cfg.clients if self.seed_synced else 0):
                target = self.method.synced().step
                for _ in range(1 + self.retries):
                    refs = self._start(cid, [], target)
                    if refs is not None and self._finish(cid, refs, 0, target)[0]:
                        break
                state = self._state(cid)
                if state.step == target and state.digest != self._record_digest():
                    self._resync(cid, target, f"digest {state.digest:x} at the end")
                    state = self._state(cid)
                if state.step != target or state.digest != self._record_digest():
                    raise ProtocolError(
                        f"client {cid} could not be brought to the server's θ_c of step {target}"
                    )
                self.verified += 1
            stats = ray.get([a.stats.remote() for a in self.actors], timeout=self.timeout)
            self.client_peak_bytes = max(p for p, _ in stats)
            self._seconds = sum(s for _, s in stats)
        finally:
            for a in self.actors:
                ray.kill(a, no_restart=True)
            if self.started_ray:
                ray.shutdown()

    def client_ms_per_step(self, sampled: int) -> float:
        steps = self._step + 1 - (self.measure_step is not None)
        return 1000 * self._seconds / (steps * sampled) if steps > 0 else float("nan")


def _bytes(data: object) -> bytes:
    """A client's reply must be the bytes of one encoded message; anything else is refused
    before any use. (Ray has already unpickled it by then: see docs/DISTRIBUTED.md on why the
    Ray engine trusts every process of its cluster.)"""
    if type(data) is not bytes:
        raise ProtocolError(f"a client replied with a {type(data).__name__}, not message bytes")
    return data


def _reason(e: Exception) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:200]}"
