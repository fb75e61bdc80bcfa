"""``hosfl client``: one client of a network run, on its own device.

It connects to ``hosfl serve`` (TLS unless told otherwise), presents the token the server
issued to its id, receives the run's config, builds its own shard and replica from it
(``ClientProcess``: its own data, its own θ_c, nothing else) and answers the server's
messages until the run is over. A lost connection is retried (the replica is kept, so the
server only has to send the steps it missed); the program gives up after ``retry_for``
seconds without a connection. Its peak memory is printed at the start and at each step it
takes part in.
"""

from __future__ import annotations

import json
import queue
import sys
import time

import grpc

from hosfl.config import Config, ConfigError
from hosfl.edge import keys, wire
from hosfl.edge.process import ClientProcess
from hosfl.metrics.memory import process_peak_rss
from hosfl.packages import MissingPackage
from hosfl.protocol import ProtocolError, StepPlan, decode

# what a client may set for itself: where and how it computes, never what it computes
LOCAL_KEYS = ("device", "client_device", "client_threads")


class Stop(Exception):
    """The client cannot go on: refused by the server, or a config it cannot build."""


class EdgeClient:
    def __init__(
        self,
        server: str,
        cid: int,
        token: str,
        ca: bytes | None,
        overrides: dict[str, str],
        log=print,
    ) -> None:
        unknown = set(overrides) - set(LOCAL_KEYS)
        if unknown:
            raise ConfigError(
                f"a client may set only {', '.join(LOCAL_KEYS)} (not {', '.join(sorted(unknown))}):"
                " the server's config decides what is trained"
            )
        self.server, self.cid, self.token, self.ca = server, cid, token, ca
        self.overrides, self.log = overrides, log
        self.process: ClientProcess | None = None
        self.config: dict | None = None
        self.connected = time.monotonic()
        self.waiting = False

    def _channel(self) -> grpc.Channel:
        options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        if self.ca is None:
            return grpc.insecure_channel(self.server, options=options)
        creds = grpc.ssl_channel_credentials(root_certificates=self.ca)
        return grpc.secure_channel(self.server, creds, options=options)

    def _build(self, payload: bytes) -> None:
        """The run's config from the server's welcome; the replica is kept across reconnects
        to the same run."""
        try:
            config = json.loads(payload)
        except ValueError:
            raise ProtocolError("the server's config is not JSON") from None
        self.connected = time.monotonic()
        if config == self.config:
            return
        if not isinstance(config, dict):
            raise ProtocolError("the server's config is not a JSON object")
        cfg = Config.from_dict({**config, **self.overrides}, source="the server's config")
        cfg.validate()
        try:
            self.process = ClientProcess(cfg.to_dict(), self.cid, cfg.client_threads or 1)
        except ValueError as e:  # a task that does not import here, a cut it does not have...
            raise ConfigError(str(e)) from None
        self.config = config
        self.log(f"client {self.cid}: ready ({cfg.task}, {cfg.method}); {_peak()}")

    def _answer(self, frame: wire.Frame) -> wire.Frame:
        try:
            reply = self.process.handle(frame.payload)
        except Exception as e:  # reported to the server, which drops this client from the step
            return wire.Frame(wire.ERROR, self.cid, frame.seq, f"{type(e).__name__}: {e}".encode())
        if reply is None:
            return wire.Frame(wire.NOTHING, self.cid, frame.seq)
        return wire.Frame(wire.MESSAGE, self.cid, frame.seq, reply)

    def session(self) -> bool:
        """One connection, until the run is over (True) or the connection is lost (False)."""
        outbox = Outbox()
        link = wire.Link.from_env()  # tests: an emulated uplink

        def frames():
            while (queued := outbox.get()) is not None:
                when, data = queued
                if link is not None:
                    link.hold(when, len(data))
                yield data

        metadata = ((wire.CLIENT_KEY, str(self.cid)), (wire.AUTH_KEY, f"Bearer {self.token}"))
        channel = self._channel()
        unbuilt: Exception | None = None  # why this client cannot build the server's run
        try:
            stub = channel.stream_stream(wire.METHOD)  # bytes both ways: no (de)serializer
            for data in stub(frames(), metadata=metadata):
                frame = wire.parse(data)
                if frame.kind == wire.BYE:
                    return True
                if frame.kind == wire.WELCOME:
                    try:
                        self._build(frame.payload)
                    except (ConfigError, MissingPackage) as e:
                        # said to the server (its log names the reason), which ends the session
                        unbuilt = e
                        outbox.put(wire.Frame(wire.ERROR, self.cid, 0, str(e).encode()).pack())
                        continue
                    outbox.put(wire.Frame(wire.READY, self.cid, 0).pack())
                    continue
                if self.process is None:
                    raise ProtocolError("the server sent a message before its config")
                outbox.put(self._answer(frame).pack())
                if _is_plan(frame.payload):
                    self.log(f"client {self.cid}: step {decode(frame.payload).step}; {_peak()}")
            if unbuilt is not None:
                raise unbuilt
            return False
        except ProtocolError as e:
            self.log(f"client {self.cid}: the server sent a bad frame ({e}); reconnecting")
            return False
        except (ConfigError, MissingPackage) as e:
            raise Stop(f"client {self.cid} cannot build the server's run: {e}") from None
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise Stop(f"the server refused client {self.cid}: {e.details()}") from None
            if e.code() == grpc.StatusCode.ALREADY_EXISTS:
                # the server has not yet seen this id's earlier session end (a client that was
                # killed and restarted, a link that dropped without a goodbye): wait it out
                self.log(f"client {self.cid}: the server still holds an earlier session; retrying")
                return False
            if self.config is not None or not self.waiting:
                self.log(f"client {self.cid}: no connection ({e.code().name}: {e.details()})")
            self.waiting = self.config is None  # said once before the first session
            return False
        finally:
            outbox.put(None)
            channel.close()

    def run(self, retry_for: float) -> None:
        """Sessions until the run is over; raises Stop after ``retry_for`` seconds without
        a connection that got anywhere."""
        self.connected = time.monotonic()  # (or the start) when the last session began
        wait = 0.5
        while True:
            if self.session():
                self.log(f"client {self.cid}: the run is over; {_peak()}")
                return
            if time.monotonic() - self.connected > retry_for:
                raise Stop(f"client {self.cid}: no server for {retry_for:g} s; giving up")
            time.sleep(wait)
            wait = min(wait * 2, 5.0)


class Outbox(queue.Queue):
    """Frames to send, each with when it was queued (for an emulated link); None ends."""

    def put(self, data: bytes | None) -> None:
        super().put(None if data is None else (time.monotonic(), data))


def _is_plan(payload: bytes) -> bool:
    return len(payload) > 5 and payload[5] == StepPlan.TYPE_ID


def _peak() -> str:
    return f"peak RSS {process_peak_rss() / 2**20:.1f} MiB"


def main(args) -> int:
    """``hosfl client`` (the parsed arguments of cli.py)."""
    overrides = dict(_pair(o) for o in args.overrides)
    ca = None
    if not args.no_tls:
        if not args.ca:
            raise ConfigError("give --ca SERVER.crt (the server's certificate), or --no-tls")
        try:
            ca = open(args.ca, "rb").read()
        except OSError as e:
            raise ConfigError(f"cannot read --ca {args.ca}: {e.strerror}") from None
    token = keys.read_token(args.token)
    log = (lambda *a: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    client = EdgeClient(args.server, args.id, token, ca, overrides, log)
    try:
        client.run(args.retry_for)
    except Stop as e:
        print(f"hosfl: error: {e}", file=sys.stderr)
        return 2
    return 0


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise ConfigError(f"expected key=value, got {text!r}")
    return key.strip(), value.strip()
