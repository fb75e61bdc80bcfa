"""Clients in processes of their own: the client process, and the logic every remote engine
shares (Ray actors: ``ray.py``; ``hosfl client`` programs over the network: ``net.py``).

A client process builds its shard and role from the config alone and answers encoded
messages with encoded messages (``ClientProcess.handle``). The engine (the server side) keeps
the replicas of seed-synced methods in step without sending weights:
- the clients of a step get its (seeds, v̄) broadcast at once;
- a client that was not sampled for a while, restarted or reconnected gets, before its next
  StepPlan, one CatchUp message with the journal rows it missed, replays them and answers
  Synced(step, digest); the digest must equal that of the server's own record of θ_c;
- a client whose replica differs from the record at the same step (other initial weights, a
  drift, a corrupted replica) is sent the record (ReplicaState), logged and counted;
- at the end every reachable client is caught up and checked the same way.

Faults: a client that fails (its process dies, it raises, or it does not answer within
``client_timeout`` seconds) is restarted (``_restart``: a new process for Ray; for the network,
its session is closed and the program reconnects by itself), re-synced from the journal, and
its part of the step is asked again, up to ``client_retries`` times; a client that still fails
is dropped from the step with a logged reason, and the step completes with the others.

A subclass is the transport: ``_post`` (send bytes, not awaited), ``_collect`` (await them,
with a deadline), ``_restart`` and ``_release``; it raises ``ClientFailed`` for anything that
goes wrong with one client.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from hosfl.config import Config
from hosfl.engines.base import Releasing
from hosfl.journal import Journal
from hosfl.methods.base import Method
from hosfl.metrics.ledger import DOWN, UP, ByteLedger
from hosfl.protocol import (
    CatchUp,
    ClientStats,
    Message,
    ProtocolError,
    StateQuery,
    StatsQuery,
    StepPlan,
    Synced,
    decode,
    encode,
)


class ClientFailed(Exception):
    """One client could not be reached, died, raised, or did not answer in time."""


class RemoteEngine(Releasing):
    """The server side of clients in other processes; see the module docstring."""

    remote = True  # every client process builds the task from the config: it must import it

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
        # the method's record of the clients' replica (None: the clients keep none); nothing
        # else of the method is read here
        self.record = method.record if journal is not None else None
        self.seed_synced = self.record is not None
        self.dropped: set[int] = set()  # clients that would not take the record: out of the run
        self.before_broadcast = lambda msg: None
        self.synced: dict[int, int | None] = dict.fromkeys(range(cfg.clients), None)
        self._plans: dict[int, StepPlan] = {}  # each client's StepPlan of the current step
        self._told: dict[int, list[Message]] = {}  # what each was told at the current step
        self._asked: set[int] = set()  # the clients of the current step
        self._step = -1
        self.measure_step = measure_step
        # clients whose θ_c was checked equal to the record at the end (None: no record)
        self.verified: int | None = 0 if self.seed_synced else None
        self.check_every = cfg.check_every
        self._due: set[int] = set()  # clients whose digest is to be checked before the next step
        self.events: list[dict] = []  # resyncs and unreachable clients, for metrics.jsonl
        self.client_peak_bytes = 0  # filled in by close()
        self.client_peak_rss = 0  # the largest client process's peak resident memory
        self._seconds = float("nan")

    # --- the transport (subclasses) --------------------------------------------------------
    def _post(self, cid: int, data: bytes) -> object:
        """Send ``data`` to client ``cid``; a handle to ``_collect`` its reply with."""
        raise NotImplementedError

    def _collect(self, cid: int, handles: list, timeout: float) -> list[bytes | None]:
        """The replies to ``handles``, in order (None: the message needs none)."""
        raise NotImplementedError

    def _restart(self, cid: int) -> None:
        """After a failure: make sure the next call reaches a fresh client."""
        raise NotImplementedError

    def _release(self) -> None:
        """End of run: let the clients go."""
        raise NotImplementedError

    def _reconnected(self, cid: int) -> bool:
        """True once after client ``cid`` came back by itself (its state is unknown again)."""
        return False

    # --- bytes on the wire ---------------------------------------------------------------
    def _send(self, cid: int, msg: Message) -> object:
        data = encode(msg, self.cfg.cut_dtype)
        self.ledger.record(DOWN, msg)
        return self._post(cid, data)

    def _receive(self, data: object) -> Message:
        if type(data) is not bytes:
            raise ProtocolError(f"a client replied with a {type(data).__name__}, not bytes")
        msg = decode(data)
        if len(data) != msg.nbytes(self.cfg.cut_dtype):  # z in another format than the run's
            raise ProtocolError(
                f"{type(msg).__name__} of {len(data)} bytes, {msg.nbytes(self.cfg.cut_dtype)} "
                f"in cut_dtype={self.cfg.cut_dtype}"
            )
        self.ledger.record(UP, msg)
        return msg

    def _call(self, cid: int, msg: Message) -> Message:
        """Send one message and wait for its reply."""
        (reply,) = self._collect(cid, [self._send(cid, msg)], self.timeout)
        if reply is None:
            raise ProtocolError(f"client {cid} did not answer {type(msg).__name__}")
        return self._receive(reply)

    def _record_digest(self) -> int:
        return self.record.synced().digest

    def _reject(self, step: int, cid: int, why: str) -> None:
        self.events.append({"event": "reject", "step": step, "client": cid, "reason": why})

    # --- keeping a client's replica in step ----------------------------------------------
    def _state(self, cid: int) -> Synced:
        """Where client ``cid``'s replica is."""
        reply = self._call(cid, StateQuery(max(self._step, 0)))
        if not isinstance(reply, Synced):
            raise ProtocolError(f"client {cid} answered its state with {type(reply).__name__}")
        self.synced[cid] = reply.step
        return reply

    def _welcome(self, cid: int) -> None:
        """Learn where a (new, restarted or reconnected) client is. A replica that differs
        from the record at the record's own step, or that is ahead of it (the server resumed
        from an earlier checkpoint while the client kept running), takes the record."""
        state = self._state(cid)
        record = self.record.synced() if self.seed_synced else None
        if record and state.step > record.step:
            why = f"at step {state.step}, ahead of the server's record at step {record.step}"
            self._resync(cid, record.step, why)
        elif record and state.step == record.step and state.digest != record.digest:
            why = (
                "initial weights built on another kind of CPU"
                if record.step == 0
                else f"digest {state.digest:x} against {record.digest:x} on joining"
            )
            self._resync(cid, record.step, why)

    def _catch_up(self, cid: int, target: int) -> list:
        """Calls (not awaited) that bring client ``cid`` from its known step to ``target``."""
        if not self.seed_synced:
            return []
        back = self._reconnected(cid)
        if self.synced[cid] is None or back:
            self._welcome(cid)
        have = self.synced[cid]
        if have == target:
            return []
        if have > target:
            raise ProtocolError(f"client {cid} is at step {have}, ahead of the server ({target})")
        seeds, values = zip(*self.journal.entries(have, target), strict=True)
        return [self._send(cid, CatchUp(have, torch.stack(seeds), torch.stack(values)))]

    def _fail(self, cid: int, step: int, why: str) -> None:
        """Client ``cid`` failed: it is restarted and re-syncs from the journal."""
        self._reject(step, cid, why)
        self.synced[cid] = None
        self._restart(cid)

    def _start(self, cid: int, msgs: list[Message], step: int) -> list | None:
        """Submit the catch-up ``cid`` needs to be at ``step``, then ``msgs``; not awaited."""
        try:
            return self._catch_up(cid, step) + [self._send(cid, m) for m in msgs]
        except (ClientFailed, ProtocolError) as e:
            self._fail(cid, step, str(e))
            return None

    def _finish(self, cid: int, handles: list, sent: int, step: int) -> tuple[bool, Message | None]:
        """Await ``handles``: (False, None) if the client failed (it is restarted), else (True,
        the reply to the last message sent, or None if that reply was malformed: dropped)."""
        try:
            out = self._collect(cid, handles, self.timeout)
        except ClientFailed as e:
            self._fail(cid, step, str(e))
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
        except (ClientFailed, ProtocolError) as e:
            self._fail(cid, step, str(e))
            return False, None
        self.synced[cid] = step
        replies = out[len(out) - sent :]
        try:
            received = [self._receive(r) for r in replies if r is not None]
        except ProtocolError as e:
            self._reject(step, cid, str(e))  # malformed: dropped, the client is kept
            return True, None
        return True, received[-1] if sent and received else None

    def ask(self, requests: Mapping[int, Message]) -> dict[int, Message]:
        """Each client's reply to its request. A client that fails is restarted, re-synced and
        asked again (``retries`` times; a restarted client needs its StepPlan again before a
        λ); one that still fails is left out of the step (logged)."""
        for cid in sorted(self._due):
            self._check(cid)
        self._due.clear()
        requests = {c: m for c, m in requests.items() if c not in self.dropped}
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
                again = not isinstance(msg, StepPlan) and cid in self._plans
                todo = [*self._told[cid], *([self._plans[cid]] if again else []), msg]
                handles = self._start(cid, todo, msg.step)
                if handles is not None:
                    ok, reply = self._finish(cid, handles, len(todo), msg.step)
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

    def tell(self, messages: Mapping[int, Message]) -> None:
        """Send each client its message, not awaited: a client runs its messages in order,
        and one that failed shows it at its next call (where what it was told is sent again)."""
        for cid in sorted(set(messages) - self.dropped):
            msg = messages[cid]
            self._at(cid, msg.step)
            self._told[cid].append(msg)
            self._start(cid, [msg], msg.step)

    def broadcast(self, msg: Message) -> None:
        """Journal the update and send it to the step's clients (the others catch up from the
        journal when next sampled). Not awaited: a client that failed to apply it shows it at
        its next call."""
        self.before_broadcast(msg)
        for cid in sorted((self._asked if self._step == msg.step else set()) - self.dropped):
            try:
                if not self.seed_synced:
                    self._send(cid, msg)
                elif self.synced[cid] == msg.step:
                    self._send(cid, msg)
                    self.synced[cid] = msg.step + 1
                    if self.check_every and (msg.step + 1) % self.check_every == 0:
                        self._due.add(cid)
            except ClientFailed:
                self.synced[cid] = None  # gone: it catches up when it is back

    # --- drift: a replica that differs from the record is resynced from it -----------------
    def _check(self, cid: int) -> None:
        """Compare client ``cid``'s digest with the record's (at the same step)."""
        try:
            state = self._state(cid)
            record = self.record.synced()
            if state.step == record.step and state.digest != record.digest:
                self._resync(cid, record.step, f"digest {state.digest:x} against {record.digest:x}")
        except (ClientFailed, ProtocolError) as e:
            self._fail(cid, self.record.synced().step, str(e))

    def _resync(self, cid: int, step: int, why: str) -> None:
        """Send client ``cid`` the record's θ_c and optimizer state; log it; check it took."""
        reply = self._call(cid, self.record.export())
        if not isinstance(reply, Synced) or reply.digest != self._record_digest():
            # a client that answers another digest for the record itself cannot be trusted
            # with the run's θ_c: it takes no further part (its replies would be dropped anyway)
            self.dropped.add(cid)
            self._reject(step, cid, f"client {cid} did not take the server's record at step "
                         f"{step} (answered {reply}): dropped from the run")  # fmt: skip
            raise ClientFailed(f"client {cid} did not take the server's record at step {step}")
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
    def _verify(self, cid: int, target: int) -> None:
        """Bring client ``cid`` to ``target`` and check its replica against the record."""
        for _ in range(1 + self.retries):
            handles = self._start(cid, [], target)
            if handles is not None and self._finish(cid, handles, 0, target)[0]:
                break
        state = self._state(cid)
        if state.step == target and state.digest != self._record_digest():
            self._resync(cid, target, f"digest {state.digest:x} at the end")
            state = self._state(cid)
        if state.step != target or state.digest != self._record_digest():
            raise ProtocolError(
                f"client {cid} could not be brought to the server's θ_c of step {target}"
            )

    def close(self) -> None:
        """Bring every client to the final step and check each replica against the record;
        collect the clients' figures. A client that cannot be reached is logged, not counted."""
        try:
            target = self.record.synced().step if self.seed_synced else 0
            for cid in range(self.cfg.clients if self.seed_synced else 0):
                if cid in self.dropped:
                    continue
                try:
                    self._verify(cid, target)
                    self.verified += 1
                except (ClientFailed, ProtocolError) as e:
                    self.events.append(
                        {"event": "unverified", "step": target, "client": cid, "reason": str(e)}
                    )
            self._gather(target)
        finally:
            self.release()

    def _gather(self, step: int) -> None:
        """Each reachable client's peak bytes, work seconds and peak resident memory."""
        pending = {}
        for cid in range(self.cfg.clients):
            try:
                pending[cid] = self._send(cid, StatsQuery(step))
            except ClientFailed:
                continue
        stats = []
        for cid, handle in pending.items():
            try:
                (data,) = self._collect(cid, [handle], self.timeout)
                reply = self._receive(data)
            except (ClientFailed, ProtocolError):
                continue
            if isinstance(reply, ClientStats):
                stats.append(reply)
        if stats:
            self.client_peak_bytes = max(s.peak_bytes for s in stats)
            self.client_peak_rss = max(s.rss_bytes for s in stats)
            self._seconds = sum(s.micros for s in stats) / 1e6

    def client_ms_per_step(self, sampled: int) -> float:
        steps = self._step + 1 - (self.measure_step is not None)
        return 1000 * self._seconds / (steps * sampled) if steps > 0 else float("nan")
