"""Real edge clients over the network: `hosfl serve` and `hosfl client` processes on loopback
give the in-process run's weights; clients that die, join late or fall silent; and a server
that admits only its own clients' credentials, checks every frame and never unpickles."""

import json
import os
import pickle
import queue
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch

from hosfl.edge import keys, wire
from hosfl.engines.net import NetEngine
from hosfl.engines.remote import ClientFailed
from hosfl.journal import Journal
from hosfl.metrics.ledger import ByteLedger
from hosfl.protocol import ProtocolError, StateQuery, Synced, decode, encode
from hosfl.runner import build, run

HOSFL = [sys.executable, "-m", "hosfl.cli"]
# the server part on one thread, as the reference; the test tasks importable by path
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(__file__),
                                                   os.environ.get("PYTHONPATH")]))}  # fmt: skip


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(**settings) -> list[str]:
    return [f"{k}={v}" for k, v in settings.items()]


def _client(listen: str, cid: int, secrets, tls: bool = False) -> subprocess.Popen:
    security = ["--ca", str(secrets / keys.CERT)] if tls else ["--no-tls"]
    cmd = [*HOSFL, "client", "--server", listen, "--id", str(cid), "--token",
           str(keys.token_path(secrets, cid)), "--retry-for", "60", *security]  # fmt: skip
    return subprocess.Popen(cmd, env=ENV, stderr=subprocess.PIPE, text=True)


def _rows(journal) -> int:
    try:
        with sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM steps").fetchone()[0]
    except sqlite3.Error:
        return 0


def _wait_rows(journal, n: int, server: subprocess.Popen) -> None:
    while _rows(journal) < n:
        assert server.poll() is None, server.communicate()
        time.sleep(0.1)


def _identical(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("method", "task"),
    # sfl-v1 on a model with BatchNorm on both sides: the statistics come back over the wire
    [("hosfl", "fmnist-cnn"), ("sfl-v1", "test_library:digits_bn")],
)
def test_server_and_client_processes_give_the_in_process_weights_over_tls(
    method, task, small_cfg, tmp_path
):
    settings = dict(clients=3, sampled=2, steps=12, eval_every=6, client_threads=1,
                    method=method, task=task)  # fmt: skip
    secrets = keys.issue(tmp_path / "secrets", 3)
    listen = f"127.0.0.1:{_port()}"
    server = subprocess.Popen(
        [*HOSFL, "serve", *_args(**small_cfg(**settings).to_dict() | dict(
            out=tmp_path / "net", listen=listen, secrets=secrets, tls="on"))],  # fmt: skip
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    clients = [_client(listen, cid, secrets, tls=True) for cid in range(3)]
    out, _ = server.communicate(timeout=300)
    assert server.returncode == 0, out
    logs = [c.communicate(timeout=60)[1] for c in clients]
    assert all(c.returncode == 0 for c in clients), "\n=====\n".join([out, *logs])
    assert "peak RSS" in logs[0] and "the run is over" in logs[0]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = run(small_cfg(**settings, out=str(tmp_path / "local")), log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    remote = torch.load(tmp_path / "net" / "checkpoint.pt", weights_only=True)
    assert _identical(remote["client"], local.client_model.state_dict())
    assert _identical(remote["server"], local.server_model.state_dict())
    summary = json.loads((tmp_path / "net" / "summary.json").read_text())
    assert summary["clients_in_sync"] == (3 if method == "hosfl" else None)  # None: no record
    assert summary["rejected"] == 0
    assert summary["test_acc"] == local.accuracy
    # the transport's own count of frame bytes is the ledger's plus 14 bytes a frame
    for direction in ("up", "down"):
        ledger = sum(summary["bytes"][direction].values())
        assert ledger < summary["wire_bytes"][direction] < 1.05 * ledger
    assert summary["client_peak_rss"] > 50 * 2**20


def test_clients_that_die_join_late_or_fall_silent_and_the_run_completes(small_cfg, tmp_path):
    """Client 2 is killed at step 30 and a new client 2 connects at step 35; client 3 connects
    after step 100; client 4 says it is ready and never answers (dropped at the deadline, then
    disconnected). The late ones are processes that have imported everything and wait for
    their step, so that the test does not depend on how fast a process starts."""
    settings = dict(clients=5, sampled=2, steps=220, eval_every=110, client_threads=1,
                    client_timeout=3, min_clients=4, check_every=20)  # fmt: skip
    secrets = keys.issue(tmp_path / "secrets", 5, tls=False)
    listen = f"127.0.0.1:{_port()}"
    run_dir = tmp_path / "net"
    server = subprocess.Popen(
        [*HOSFL, "serve", *_args(**small_cfg(**settings).to_dict() | dict(
            out=run_dir, listen=listen, secrets=secrets, engine="net"))],  # fmt: skip
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    journal = run_dir / "journal.sqlite"

    def joining(cid: int, at: int) -> subprocess.Popen:
        token = str(keys.token_path(secrets, cid))
        cmd = [sys.executable, "-c", JOIN_AT, listen, str(cid), token, str(journal), str(at)]
        return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, text=True)

    silent = FakeClient(listen, 4, keys.read_token(keys.token_path(secrets, 4)))
    first = [_client(listen, cid, secrets) for cid in range(3)]
    later = {2: joining(2, 35), 3: joining(3, 100)}
    assert wire.parse(silent.next(timeout=120)).kind == wire.WELCOME
    silent.send(wire.Frame(wire.READY, 4, 0).pack())  # ready, and then silent
    _wait_rows(journal, 30, server)
    first[2].kill()
    out, _ = server.communicate(timeout=600)
    assert server.returncode == 0, out
    for p in first[:2]:
        p.communicate(timeout=60)
        assert p.returncode == 0
    logs = {cid: p.communicate(timeout=60)[0] for cid, p in later.items()}
    for cid, at in ((2, 35), (3, 100)):
        assert later[cid].returncode == 0 and f"client {cid}: ready" in logs[cid]
        took_part = [int(line.split()[3].rstrip(";")) for line in logs[cid].splitlines()
                     if line.startswith(f"client {cid}: step")]  # fmt: skip
        assert all(step >= at for step in took_part), logs[cid]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["clients_in_sync"] == 4, out  # every client but the silent one
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    drops = [r for r in rows if r.get("event") == "reject"]
    silent_drops = [r for r in drops if r["client"] == 4]
    assert "did not answer within 3 s" in silent_drops[0]["reason"], drops
    assert all("not connected" in r["reason"] for r in silent_drops[1:])  # not waited for again
    assert any(r["client"] == 2 and 30 <= r["step"] for r in drops), drops  # while it was away
    assert any(r["client"] == 3 and r["step"] < 100 for r in drops)  # sampled, not there yet
    unverified = [r for r in rows if r.get("event") == "unverified"]
    assert [r["client"] for r in unverified] == [4]
    silent.close()


# a client that connects once the server's journal holds a given number of steps
JOIN_AT = """
import sqlite3, sys, time
from hosfl.edge.client import EdgeClient
from hosfl.edge.keys import read_token
listen, cid, token, journal, at = sys.argv[1:]
while True:
    try:
        with sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=5) as db:
            if db.execute("SELECT COUNT(*) FROM steps").fetchone()[0] >= int(at):
                break
    except sqlite3.Error:
        pass
    time.sleep(0.05)
EdgeClient(listen, int(cid), read_token(token), None, {}).run(60)
"""


class FakeClient:
    """A hand-driven client: opens a stream with the given credentials, keeps what the server
    sends in ``received`` and sends whatever bytes it is given."""

    def __init__(self, listen: str, cid: int, token: str) -> None:
        self.channel = grpc.insecure_channel(listen)
        self.outbox: queue.Queue = queue.Queue()
        self.received: queue.Queue = queue.Queue()
        self.error: grpc.RpcError | None = None
        meta = ((wire.CLIENT_KEY, str(cid)), (wire.AUTH_KEY, f"Bearer {token}"))

        def frames():
            while (data := self.outbox.get()) is not None:
                yield data

        def pump():
            try:
                call = self.channel.stream_stream(wire.METHOD)
                for data in call(frames(), metadata=meta, wait_for_ready=True):
                    self.received.put(data)
            except grpc.RpcError as e:
                self.error = e
            self.received.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def next(self, timeout: float = 30) -> bytes | None:
        return self.received.get(timeout=timeout)

    def send(self, data: bytes) -> None:
        self.outbox.put(data)

    def close(self) -> None:
        self.outbox.put(None)
        self.channel.close()


class Exploit:
    """Unpickling this creates a file: what a server that unpickles would do."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def gateway(small_cfg, tmp_path):
    """A network engine in this process with clients 0 and 1 connected by hand."""
    cfg = small_cfg(clients=3, sampled=2, engine="net", listen=f"127.0.0.1:{_port()}",
                    min_clients=2, client_timeout=2, max_upload_mb=0.05)  # fmt: skip
    secrets = keys.issue(tmp_path / "secrets", 3, tls=False)
    tokens = {cid: keys.read_token(keys.token_path(secrets, cid)) for cid in range(3)}
    fed, _, _ = build(cfg)
    journal = Journal(tmp_path / "journal.sqlite")
    made: dict = {}
    starter = threading.Thread(target=lambda: made.setdefault("engine", NetEngine(
        cfg, fed.server, ByteLedger(), None, journal, tmp_path, log=lambda *a: None)))  # fmt: skip
    starter.start()
    fakes = {}
    for cid in (0, 1):  # they wait for the server to listen
        fakes[cid] = FakeClient(cfg.listen, cid, tokens[cid])
        assert wire.parse(fakes[cid].next()).kind == wire.WELCOME
        fakes[cid].send(wire.Frame(wire.READY, cid, 0).pack())
    starter.join()
    engine = made["engine"]
    yield engine, fakes, tokens, cfg, tmp_path
    for fake in fakes.values():
        fake.close()
    engine._release()


def test_only_the_issued_credentials_are_admitted_and_refusals_are_logged(gateway):
    engine, fakes, tokens, cfg, _ = gateway
    cases = {
        "wrong token": (2, "not-the-token"),
        "another client's token": (2, tokens[0]),
        "unknown client id": (7, tokens[1]),
        "a live session's token": (0, tokens[0]),
    }
    for name, (cid, token) in cases.items():
        fake = FakeClient(cfg.listen, cid, token)
        assert fake.next() is None, name  # the stream ends without a frame
        assert fake.error.code() in (
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.ALREADY_EXISTS,
        ), name
        fake.close()
    engine._drain()
    refused = [e for e in engine.events if e["event"] == "refused"]
    assert len(refused) == 4 and "in use by a live session" in refused[-1]["reason"]
    assert engine.gateway.session(0).open  # the live session was not disturbed


def test_a_restarted_client_waits_until_its_earlier_session_has_ended(gateway):
    """A client killed and restarted before the server saw its stream end is refused while the
    old session lives, retries, and is admitted once it ends (not a fatal refusal)."""
    from hosfl.edge.client import EdgeClient

    engine, fakes, tokens, cfg, _ = gateway
    lines: list[str] = []
    client = EdgeClient(cfg.listen, 0, tokens[0], None, {}, log=lines.append)
    threading.Thread(target=client.run, args=(60,), daemon=True).start()
    deadline = time.monotonic() + 60
    while not any("still holds an earlier session" in line for line in lines):
        assert time.monotonic() < deadline, lines
        time.sleep(0.05)
    first = engine.gateway.sessions[0]
    assert first.open  # refused, and the live session was not disturbed
    fakes[0].close()
    while engine.gateway.sessions[0] is first or engine.gateway.sessions[0].ready_at is None:
        assert time.monotonic() < deadline, lines
        time.sleep(0.05)
    assert engine.gateway.session(0).open and not first.open


def test_frames_that_answer_nothing_or_impersonate_are_refused_and_nothing_unpickled(gateway):
    engine, fakes, tokens, cfg, tmp_path = gateway
    marker = tmp_path / "unpickled"
    fake = fakes[0]
    handle = engine._post(0, encode(StateQuery(0)))
    asked = wire.parse(fake.next())
    assert asked.kind == wire.MESSAGE and isinstance(decode(asked.payload), StateQuery)
    reply = encode(Synced(0, 0))
    fake.send(b"\x00" * 3)  # arbitrary bytes
    fake.send(pickle.dumps(Exploit(marker)))  # a pickle instead of a frame
    fake.send(wire.Frame(wire.MESSAGE, 1, asked.seq, reply).pack())  # as another client
    fake.send(wire.Frame(wire.MESSAGE, 0, asked.seq + 5, reply).pack())  # unasked
    fake.send(wire.Frame(wire.MESSAGE, 0, asked.seq, pickle.dumps(Exploit(marker))).pack())
    fake.send(wire.Frame(wire.MESSAGE, 0, asked.seq, reply).pack())  # a replay of the answer
    (payload,) = engine._collect(0, [handle], 5)
    with pytest.raises(ProtocolError, match="not a hosfl"):
        engine._receive(payload)  # the pickle is refused by the codec
    deadline = time.monotonic() + 5
    while len(engine.gateway.refusals) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    engine._drain()
    reasons = [e["reason"] for e in engine.events if e["event"] == "refused"]
    assert len(reasons) == 5, reasons
    assert sum("bad frame" in r for r in reasons) == 2
    assert any("for client 1 from client 0" in r for r in reasons)
    assert sum("not awaited" in r for r in reasons) == 2  # the unasked one and the replay
    assert not marker.exists()


def test_an_oversized_frame_ends_only_its_senders_session(gateway):
    engine, fakes, _, cfg, _ = gateway
    fakes[1].send(wire.Frame(wire.MESSAGE, 1, 1, b"x" * 100_000).pack())  # over 0.05 MiB
    assert fakes[1].next() is None
    assert fakes[1].error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    deadline = time.monotonic() + 5
    while engine.gateway.sessions[1].open and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(ClientFailed, match="not connected"):
        engine._post(1, encode(StateQuery(0)))
    handle = engine._post(0, encode(StateQuery(0)))  # client 0 is served as before
    asked = wire.parse(fakes[0].next())
    fakes[0].send(wire.Frame(wire.MESSAGE, 0, asked.seq, encode(Synced(0, 0))).pack())
    assert decode(engine._collect(0, [handle], 5)[0]) == Synced(0, 0)


def test_a_silent_client_is_dropped_at_the_deadline(gateway):
    engine, fakes, *_ = gateway
    start = time.monotonic()
    with pytest.raises(ClientFailed, match="did not answer within 2 s"):
        engine._collect(0, [engine._post(0, encode(StateQuery(0)))], 2)
    assert time.monotonic() - start < 10


def test_the_client_imports_no_ray_matplotlib_or_server_package():
    code = (
        "import sys, hosfl.edge.client\n"
        "print(sorted(m for m in ('ray', 'matplotlib', 'cryptography', 'transformers',"
        " 'hosfl.engines.net', 'hosfl.engines.ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out


def test_a_client_that_cannot_import_the_task_says_why_on_both_sides(gateway, monkeypatch):
    from hosfl.edge import client as edge

    engine, _, tokens, cfg, _ = gateway

    def unimportable(*a, **k):
        raise ValueError("task='mylab.tasks:bert': cannot import it (No module named 'mylab')")

    monkeypatch.setattr(edge, "ClientProcess", unimportable)
    lines = []
    client = edge.EdgeClient(cfg.listen, 2, tokens[2], None, {}, log=lines.append)
    with pytest.raises(edge.Stop, match="client 2 cannot build the server's run: task='mylab"):
        client.session()
    deadline = time.monotonic() + 10
    while not any("cannot build" in r["reason"] for r in engine.gateway.refusals):
        assert time.monotonic() < deadline, list(engine.gateway.refusals)
        time.sleep(0.05)
    (row,) = [r for r in engine.gateway.refusals if "cannot build" in r["reason"]]
    assert row["client"] == 2 and "No module named 'mylab'" in row["reason"]


def test_a_flood_of_bad_frames_is_counted_but_not_logged_line_by_line(gateway):
    from hosfl.engines.net import EVERY, LOGGED

    engine, fakes, *_ = gateway
    for _ in range(LOGGED + 30):
        fakes[0].send(b"\x00" * 3)  # a bad frame each
    host = "ipv4:127.0.0.1"  # the peer without its port: one count across reconnections
    deadline = time.monotonic() + 10
    while engine.gateway.refused[host] < LOGGED + 30:
        assert time.monotonic() < deadline, engine.gateway.refused
        time.sleep(0.05)
    assert len(engine.gateway.refusals) == LOGGED  # the rest counted, one in EVERY logged
    assert EVERY > 30
