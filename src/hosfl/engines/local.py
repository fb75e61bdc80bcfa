"""In-process engine: client roles are objects in this process; messages are handed over by
reference and every delivery is recorded in the byte ledger at its exact encoded size.

The engine also times the clients' work, and at one chosen step measures each client's peak
tensor memory (``metrics.memory``): the client side of a step is whatever runs inside the
clients' ``handle`` calls, whatever the method. At that step replies cross as encoded bytes,
so what a client sends is not kept alive in its memory by the server's reference.

Batched simulation (``batched``): the clients asked at once that share their state (the one
θ_c every HO-SFL client holds) are handed their messages together
(``ClientRole.handle_group``), so the method can run their forwards as one batch. The server
still receives one reply per client, counted as before. The metered step is always simulated
client by client: the meter measures one client's work."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from hosfl import directions
from hosfl.engines.base import Releasing
from hosfl.methods.base import ClientRole
from hosfl.metrics.exchanges import Exchanges
from hosfl.metrics.ledger import DOWN, UP, ByteLedger
from hosfl.metrics.memory import meter
from hosfl.protocol import Message, ProtocolError, decode, encode, rounded


class LocalEngine(Releasing):
    remote = False  # clients are objects of this process
    def __init__(
        self,
        clients: Sequence[ClientRole],
        ledger: ByteLedger,
        measure_step: int | None = None,
        batched: bool = False,
    ) -> None:
        self.clients = list(clients)
        self.batched = batched
        self.ledger = ledger
        self.client_seconds: dict[int, float] = {}  # step -> seconds in clients' handle calls
        self.measure_step = measure_step
        self.meters: dict[int, object] = {}  # client id (-1: broadcast) -> peak meter
        self.before_broadcast: Callable[[Message], None] = lambda msg: None  # e.g. journal it
        self.memo = directions.Memo()  # a step's directions, made once for all the clients
        self.exchanges = Exchanges(skip_step=measure_step)  # the step's shape, for timelines
        self._seconds: dict[int, float] = {}  # client id -> its work in this exchange
        self.events: list[dict] = []  # in-process every client shares the record: no drift

    @classmethod
    def for_run(cls, run) -> LocalEngine:
        return cls(run.fed.clients, run.ledger, run.measure_step, batched=run.cfg.batched())

    @property
    def client_peak_bytes(self) -> int:
        """Peak live tensor bytes of one client's work at ``measure_step`` (0 if not yet)."""
        return max((m.peak for m in self.meters.values()), default=0)

    def carry(self, direction: str, msg: Message, copies: int = 1) -> Message:
        """Move one message (to ``copies`` recipients); what the receiver gets is returned:
        z and λ as the run's ``cut_dtype`` delivers them."""
        self.ledger.record(direction, msg, copies)
        return rounded(msg, self.ledger.cut_dtype)

    def client_ms_per_step(self, sampled: int) -> float:
        """Mean client compute per sampled client per step, the measured step left out (the
        memory meter slows it)."""
        timed = [s for step, s in self.client_seconds.items() if step != self.measure_step]
        return 1000 * sum(timed) / (len(timed) * sampled) if timed else float("nan")

    def _deliver(self, cid: int, msg: Message, meter_id: int) -> Message | None:
        if msg.step == self.measure_step:
            with self.meters.setdefault(meter_id, meter(self.clients[cid].shard.device)):
                reply = self.clients[cid].handle(msg)
            # The server gets its own copy, as over a network: the client's tensors are freed
            # when the client drops them, not kept alive by the server's reference.
            if reply is None:
                return None
            try:
                return decode(encode(reply))
            except ProtocolError:
                return reply  # malformed: the server's admission rejects it with its reason
        start = time.perf_counter()
        with directions.remembering(self.memo):
            reply = self.clients[cid].handle(msg)
        self._timed(msg.step, start, [cid])
        return reply

    def _timed(self, step: int, start: float, cids: list[int]) -> None:
        """Count the client work since ``start`` towards ``step``, shared by ``cids``."""
        elapsed = time.perf_counter() - start
        self.client_seconds[step] = self.client_seconds.get(step, 0.0) + elapsed
        for cid in cids:
            self._seconds[cid] = self._seconds.get(cid, 0.0) + elapsed / len(cids)

    def _record(self, kind: str, start: float, sent: Mapping[int, Message],
                replies: Mapping[int, Message], clients: int | None = None) -> None:  # fmt: skip
        """The exchange just done, for ``exchanges`` (to ``clients``, by default those sent)."""
        fmt = self.ledger.cut_dtype
        first = next(iter(sent.values()))
        up = next(iter(replies.values()), None)
        self.exchanges.record(kind, first.step, start, type(first).__name__,
                              None if up is None else type(up).__name__,
                              len(sent) if clients is None else clients,
                              [(sent[c].nbytes(fmt), replies[c].nbytes(fmt) if c in replies else 0,
                                self._seconds.get(c, 0.0)) for c in sent])  # fmt: skip
        self._seconds = {}

    def _groups(self, cids: list[int], step: int) -> list[list[int]]:
        """The clients that answer together: one each, or (batched) those sharing a state."""
        if not self.batched or step == self.measure_step:
            return [[cid] for cid in cids]
        groups: dict[tuple[type, int], list[int]] = {}
        for cid in cids:
            role = self.clients[cid]
            groups.setdefault((type(role), id(role.state)), []).append(cid)
        return list(groups.values())

    def _deliver_group(self, cids: list[int], msgs: list[Message]) -> list[Message | None]:
        if len(cids) == 1:
            return [self._deliver(cids[0], msgs[0], cids[0])]
        roles = [self.clients[cid] for cid in cids]
        start = time.perf_counter()
        with directions.remembering(self.memo):
            replies = type(roles[0]).handle_group(roles, msgs)
        self._timed(msgs[0].step, start, cids)
        return replies

    def ask(self, requests: Mapping[int, Message]) -> dict[int, Message]:
        """Send each client its request and collect the replies, in client order."""
        cids = sorted(requests)
        if not cids:
            return {}
        start, replies = time.perf_counter(), {}
        for group in self._groups(cids, requests[cids[0]].step):
            msgs = [self.carry(DOWN, requests[cid]) for cid in group]
            for cid, reply in zip(group, self._deliver_group(group, msgs), strict=True):
                if reply is None:
                    raise RuntimeError(
                        f"client {cid} did not answer {type(requests[cid]).__name__}"
                    )
                replies[cid] = self.carry(UP, reply)
        self._record("ask", start, requests, replies)
        return {cid: replies[cid] for cid in cids}

    def tell(self, messages: Mapping[int, Message]) -> None:
        """Deliver each client its message; no replies."""
        start = time.perf_counter()
        for cid in sorted(messages):
            self._deliver(cid, self.carry(DOWN, messages[cid]), cid)
        if messages:
            self._record("tell", start, messages, {})

    def close(self) -> None:
        """Nothing to release in-process."""

    @property
    def verified(self) -> int:
        """In-process every client reads the server's own θ_c: all are in step."""
        return len(self.clients)

    def broadcast(self, msg: Message) -> None:
        """Deliver ``msg`` to every client; no replies."""
        self.before_broadcast(msg)
        start = time.perf_counter()
        received = self.carry(DOWN, msg, copies=len(self.clients))
        updated = {}  # one delivery per state the clients share: each client's work
        for cid, client in enumerate(self.clients):
            if id(client.state) not in updated:
                updated[id(client.state)] = cid
                self._deliver(cid, received, -1)
        self._record("broadcast", start, dict.fromkeys(updated.values(), msg), {},
                     clients=len(self.clients))  # fmt: skip
