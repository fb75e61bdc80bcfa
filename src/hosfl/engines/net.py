"""Network engine (``engine=net``, ``hosfl serve``): each client is a ``hosfl client`` program
started by whoever owns the device, anywhere that can reach the server's address.

The transport is gRPC: one bidirectional stream per client, opened by the client (so a device
behind NAT can join), carrying ``edge.wire`` frames around hosfl codec messages; TLS on by
default outside loopback. A client is admitted only with the token the server issued to its
id (``edge.keys``), and only one live session per id; a refused attempt is logged. Every
frame a client sends is checked: its id must be its session's, and it must answer a request
the server sent and has not had answered; anything else is refused and logged, never decoded
further. gRPC bounds the size of a frame (``max_upload_mb``). Nothing is unpickled.

Clients come and go: the server waits up to ``join_timeout`` seconds for them at the start,
then goes on with those connected; a sampled client that is not connected, or that does not
answer within ``client_timeout``, is dropped from the step (logged) and its session closed;
one that connects late, drops or reconnects is caught up from the journal before it next takes
part (``remote.RemoteEngine``). The server never waits on a client past a deadline.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc

from hosfl.config import Config, ConfigError
from hosfl.edge import keys, wire
from hosfl.engines.remote import ClientFailed, RemoteEngine
from hosfl.journal import Journal
from hosfl.methods.base import Method
from hosfl.metrics.ledger import ByteLedger
from hosfl.protocol import ProtocolError

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


class Session:
    """One connected client: what the server has sent it and waits to hear back about."""

    def __init__(self, cid: int, number: int, peer: str) -> None:
        self.cid, self.number, self.peer = cid, number, peer
        # (when queued, frame); None ends the stream
        self.outbox: collections.deque[tuple[float, bytes] | None] = collections.deque()
        self.ready = threading.Condition()
        self.pending: dict[int, futures.Future] = {}
        self.seq = 0
        self.open = True
        self.ready_at: float | None = None  # when the client said it was built and ready

    def send(self, kind: int, payload: bytes) -> futures.Future:
        future: futures.Future = futures.Future()
        with self.ready:
            if not self.open:
                raise ClientFailed(f"client {self.cid} is not connected")
            self.seq += 1
            self.pending[self.seq] = future
            frame = wire.Frame(kind, self.cid, self.seq, payload).pack()
            self.outbox.append((time.monotonic(), frame))
            self.ready.notify()
        return future

    def next_frame(self) -> tuple[float, bytes] | None:
        with self.ready:
            while not self.outbox:
                self.ready.wait()
            return self.outbox.popleft()

    def answer(self, frame: wire.Frame) -> bool:
        """Resolve the request ``frame`` answers; False if it answers none."""
        with self.ready:
            future = self.pending.pop(frame.seq, None)
        if future is None:
            return False
        if frame.kind == wire.ERROR:
            future.set_exception(ClientFailed(frame.payload.decode("utf-8", "replace")[:300]))
        else:
            future.set_result(frame.payload if frame.kind == wire.MESSAGE else None)
        return True

    def close(self, why: str, last: bytes | None = None) -> None:
        """End the session (after sending ``last``, if given); what is awaited fails."""
        with self.ready:
            if not self.open:
                return
            self.open = False
            pending, self.pending = self.pending, {}
            if last is not None:
                self.outbox.append((time.monotonic(), last))
            self.outbox.append(None)  # the stream then ends, with status OK
            self.ready.notify()
        for future in pending.values():
            future.set_exception(ClientFailed(f"client {self.cid}: {why}"))


LOGGED, EVERY = 20, 1000  # refusals of one peer logged in full, then one in EVERY


class Gateway:
    """The gRPC server: admits clients, carries frames, counts their bytes, logs refusals."""

    def __init__(self, cfg: Config, secrets: Path, welcome: bytes, log=print) -> None:
        self.cfg, self.welcome, self.log = cfg, welcome, log
        self.tokens = keys.Tokens(secrets, cfg.clients)
        self.sessions: dict[int, Session] = {}
        self.lock = threading.Lock()
        self.count = 0
        self.refusals: collections.deque[dict] = collections.deque()
        self.refused: collections.Counter[str] = collections.Counter()  # by peer address
        self.refused_lock = threading.Lock()  # _refuse may run under self.lock
        self.wire_bytes = {"up": 0, "down": 0}  # whole frames, both ways
        self.joined = threading.Condition(self.lock)
        handler = grpc.method_handlers_generic_handler(
            "hosfl.Edge", {"Session": grpc.stream_stream_rpc_method_handler(self._session)}
        )
        limit = int(cfg.max_upload_mb * 2**20)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=cfg.clients + 4),
            handlers=[handler],
            maximum_concurrent_rpcs=cfg.clients + 4,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),
            ],
        )
        try:
            if tls_on(cfg):
                key, cert = keys.tls_pair(secrets)
                port = self.server.add_secure_port(
                    cfg.listen, grpc.ssl_server_credentials([(key, cert)])
                )
            else:
                port = self.server.add_insecure_port(cfg.listen)
        except RuntimeError:  # grpc: "Failed to bind"
            port = 0
        if not port:
            raise ConfigError(f"listen={cfg.listen}: cannot listen there (in use?)")
        self.port = port
        self.server.start()

    # --- one client's stream (a gRPC worker thread) --------------------------------------
    def _refuse(self, cid: int | None, peer: str, why: str) -> None:
        """Log a refusal and keep its metrics row: each peer's first ``LOGGED`` in full, then
        one in every ``EVERY`` with its count, so a flood of bad frames cannot flood the run's
        log and metrics (every one is still counted)."""
        host = peer.rsplit(":", 1)[0]  # a reconnecting peer comes from another port
        with self.refused_lock:
            self.refused[host] += 1
            n = self.refused[host]
        if n > LOGGED and n % EVERY:
            return
        if n > LOGGED:
            why = f"{why} ({n} refusals of {host} so far; one in {EVERY} is logged)"
        row = {"event": "refused", "step": None, "client": cid, "peer": peer, "reason": why}
        self.refusals.append(row)
        self.log(f"hosfl: refused {peer} (client {cid}): {why}")

    def _admit(self, context: grpc.ServicerContext) -> Session | None:
        meta = dict(context.invocation_metadata())
        peer = context.peer()
        try:
            cid = int(meta.get(wire.CLIENT_KEY, ""))
        except ValueError:
            cid = None
        auth = meta.get(wire.AUTH_KEY, "")
        token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else ""
        if cid is None or not self.tokens.check(cid, token):
            self._refuse(cid, peer, "unknown client id or wrong token")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown client id or wrong token")
        with self.lock:
            live = self.sessions.get(cid)
            if live is not None and live.open:
                self._refuse(cid, peer, f"its token is in use by a live session ({live.peer})")
                context.abort(grpc.StatusCode.ALREADY_EXISTS, "this client is already connected")
            self.count += 1
            session = Session(cid, self.count, peer)
            self.sessions[cid] = session
            self.joined.notify_all()
        return session

    def _session(self, frames, context: grpc.ServicerContext):
        session = self._admit(context)
        context.add_callback(lambda: session.close("disconnected"))
        reader = threading.Thread(target=self._read, args=(session, frames), daemon=True)
        reader.start()
        first = wire.Frame(wire.WELCOME, session.cid, 0, self.welcome).pack()
        self.wire_bytes["down"] += len(first)
        yield first
        link = wire.Link.from_env()  # tests: an emulated downlink
        while (queued := session.next_frame()) is not None:
            when, frame = queued
            self.wire_bytes["down"] += len(frame)
            if link is not None:
                link.hold(when, len(frame))
            yield frame

    def _read(self, session: Session, frames) -> None:
        try:
            for data in frames:
                self.wire_bytes["up"] += len(data)
                try:
                    frame = wire.parse(data)
                except ProtocolError as e:
                    self._refuse(session.cid, session.peer, f"a bad frame: {e}")
                    continue
                if frame.cid != session.cid:
                    why = f"a frame for client {frame.cid} from client {session.cid}'s session"
                    self._refuse(session.cid, session.peer, why)
                elif frame.kind == wire.ERROR and session.ready_at is None:
                    # the client could not build the run (its task does not import there...)
                    why = frame.payload.decode("utf-8", "replace")[:300]
                    self._refuse(session.cid, session.peer, f"cannot build the run: {why}")
                    session.close("could not build the run")
                elif frame.kind == wire.READY and session.ready_at is None:
                    with self.joined:
                        session.ready_at = time.monotonic()
                        self.joined.notify_all()
                elif frame.kind not in (wire.MESSAGE, wire.NOTHING, wire.ERROR):
                    self._refuse(session.cid, session.peer, f"a frame of kind {frame.kind}")
                elif not session.answer(frame):
                    why = f"a reply to request {frame.seq}, which is not awaited (replayed?)"
                    self._refuse(session.cid, session.peer, why)
        except grpc.RpcError:
            pass  # the stream ended: the callback closes the session
        finally:
            session.close("disconnected")

    # --- the engine's side ----------------------------------------------------------------
    def session(self, cid: int) -> Session:
        with self.lock:
            session = self.sessions.get(cid)
        if session is None or not session.open or session.ready_at is None:
            raise ClientFailed(f"client {cid} is not connected")
        return session

    def wait_for(self, clients: int, timeout: float) -> int:
        """Wait up to ``timeout`` seconds until ``clients`` are connected; how many are."""
        deadline = time.monotonic() + timeout
        with self.joined:
            while True:
                live = sum(s.open and s.ready_at is not None for s in self.sessions.values())
                left = deadline - time.monotonic()
                if live >= clients or left <= 0:
                    return live
                self.joined.wait(min(left, 1.0))

    def stop(self) -> None:
        with self.lock:
            sessions = list(self.sessions.values())
        for s in sessions:
            s.close("the run is over", last=wire.Frame(wire.BYE, s.cid, 0).pack())
        self.server.stop(grace=10.0).wait()  # the streams end as soon as BYE is sent


def tls_on(cfg: Config) -> bool:
    host = cfg.listen.rsplit(":", 1)[0]
    return cfg.tls == "on" or (cfg.tls == "auto" and host not in LOOPBACK)


def secrets_folder(cfg: Config, out: Path) -> Path:
    return Path(cfg.secrets) if cfg.secrets else out / "secrets"


class NetEngine(RemoteEngine):
    """Clients are ``hosfl client`` programs that connect to this server."""

    @classmethod
    def for_run(cls, run) -> NetEngine:
        return cls(run.cfg, run.fed.server, run.ledger, run.measure_step, run.journal, run.out,
                   run.log)  # fmt: skip

    def __init__(
        self,
        cfg: Config,
        method: Method,
        ledger: ByteLedger,
        measure_step: int | None,
        journal: Journal | None,
        out: Path,
        log=print,
    ) -> None:
        super().__init__(cfg, method, ledger, measure_step, journal)
        secrets = keys.issue(
            secrets_folder(cfg, out), cfg.clients, (cfg.listen.rsplit(":", 1)[0],), tls_on(cfg)
        )
        welcome = json.dumps(cfg.to_dict()).encode()
        self.gateway = Gateway(cfg, secrets, welcome, log)
        self._seen: dict[int, int] = {}  # client id -> the session number last synced
        host = cfg.listen.rsplit(":", 1)[0]
        tls = f"--ca {secrets / keys.CERT}" if tls_on(cfg) else "--no-tls"
        need = cfg.min_clients or cfg.clients
        log(
            f"hosfl serve: listening on {host}:{self.gateway.port} "
            f"({'TLS' if tls_on(cfg) else 'no TLS: loopback'}); waiting up to "
            f"{cfg.join_timeout:g} s for {need} of {cfg.clients} clients. "
            "Start client N with:\n"
            f"  hosfl client --server {host}:{self.gateway.port} --id N "
            f"--token {secrets}/client-N.token {tls}"
        )
        live = self.gateway.wait_for(need, cfg.join_timeout)
        if live < need:
            self.gateway.stop()
            raise ConfigError(
                f"{live} of the {need} clients needed joined within join_timeout="
                f"{cfg.join_timeout:g} s (min_clients sets how many are needed)"
            )
        log(f"hosfl serve: {live} of {cfg.clients} clients connected; training")

    @property
    def wire_bytes(self) -> dict[str, int]:
        return dict(self.gateway.wire_bytes)

    def _drain(self) -> None:
        while self.gateway.refusals:
            self.events.append(self.gateway.refusals.popleft())

    def ask(self, requests):
        self._drain()
        return super().ask(requests)

    # --- the transport ----------------------------------------------------------------------
    def _post(self, cid: int, data: bytes) -> futures.Future:
        return self.gateway.session(cid).send(wire.MESSAGE, data)

    def _collect(self, cid: int, handles: list, timeout: float) -> list[bytes | None]:
        done, late = futures.wait(handles, timeout=timeout)
        if late:
            raise ClientFailed(f"client {cid} did not answer within {timeout:g} s")
        return [h.result() for h in handles]  # raises the ClientFailed of a failed one

    def _reconnected(self, cid: int) -> bool:
        try:
            number = self.gateway.session(cid).number
        except ClientFailed:
            return False
        fresh = self._seen.get(cid) != number
        self._seen[cid] = number
        return fresh

    def _restart(self, cid: int) -> None:
        """A client that failed is disconnected; its program reconnects by itself."""
        try:
            self.gateway.session(cid).close("dropped by the server after a failure")
        except ClientFailed:
            pass

    def _release(self) -> None:
        self._drain()
        self.gateway.stop()

