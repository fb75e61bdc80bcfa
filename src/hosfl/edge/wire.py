"""The frames of the network transport, inside one gRPC bidirectional stream per client.

The client opens the stream (so it can sit behind NAT) with two metadata entries,
``hosfl-client: <id>`` and ``authorization: Bearer <token>``; the server checks them before
anything else. Each gRPC message is then one frame:

    u8 version | u8 kind | u32 client id | u64 sequence number | payload      (little-endian)

The server numbers its requests; a client's reply carries the number it answers and its own
id, and the server accepts a reply only from the session bound to that id, for a request it
sent and has not had answered. Payloads are hosfl codec messages (``protocol.encode``), a
UTF-8 error text, or (the server's first frame) the run's config as JSON: nothing is ever
unpickled, on either side.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass

from hosfl.protocol import ProtocolError

VERSION = 1
HEADER = struct.Struct("<BBIQ")
METHOD = "/hosfl.Edge/Session"  # the one gRPC method: a stream each way
CLIENT_KEY, AUTH_KEY = "hosfl-client", "authorization"

# kinds
WELCOME = 1  # server -> client: the run's config (JSON), the first frame of a session
MESSAGE = 2  # either way: one codec message
NOTHING = 3  # client -> server: the message needed no reply
ERROR = 4  # client -> server: the message raised; UTF-8 text
BYE = 5  # server -> client: the run is over
READY = 6  # client -> server: built from the config, ready for messages (once a session)
KINDS = {WELCOME, MESSAGE, NOTHING, ERROR, BYE, READY}


@dataclass(frozen=True)
class Frame:
    kind: int
    cid: int
    seq: int
    payload: bytes = b""

    def pack(self) -> bytes:
        return HEADER.pack(VERSION, self.kind, self.cid, self.seq) + self.payload


def parse(data: bytes) -> Frame:
    """One frame, its header checked; raises ProtocolError for anything else."""
    if type(data) is not bytes:
        raise ProtocolError(f"a frame must be bytes, not {type(data).__name__}")
    if len(data) < HEADER.size:
        raise ProtocolError(f"frame of {len(data)} bytes is shorter than its header")
    version, kind, cid, seq = HEADER.unpack_from(data)
    if version != VERSION or kind not in KINDS:
        raise ProtocolError(f"not a hosfl frame (version {version}, kind {kind})")
    return Frame(kind, cid, seq, data[HEADER.size :])


LINK_ENV = "HOSFL_TEST_LINK"  # "rtt_ms,mbps": an emulated link for each session, both ways


class Link:
    """Test-only: one direction of one client's connection, emulated on loopback. A frame
    queued at ``queued`` (time.monotonic) starts once the frames before it are through, takes
    its bits ÷ the bandwidth, and arrives rtt/2 later: ``hold`` sleeps until then (frames in
    flight overlap their latency, as on a real link). ``HOSFL_TEST_LINK=rtt_ms,mbps`` in the
    environment of ``hosfl serve`` and ``hosfl client`` gives every session one each way;
    ``hosfl timeline`` predicts a run under the same numbers (the loopback validation)."""

    def __init__(self, rtt_ms: float, mbps: float) -> None:
        if not (rtt_ms >= 0 and mbps > 0):
            raise ValueError(f"{LINK_ENV}: rtt_ms >= 0 and mbps > 0, not {rtt_ms}, {mbps}")
        self.latency, self.rate = rtt_ms / 2000, mbps * 1e6 / 8  # seconds; bytes a second
        self.free = 0.0  # when the link has sent everything queued so far

    def hold(self, queued: float, nbytes: int) -> None:
        self.free = max(queued, self.free) + nbytes / self.rate
        wait = self.free + self.latency - time.monotonic()
        if wait > 0:
            time.sleep(wait)

    @classmethod
    def from_env(cls) -> Link | None:
        text = os.environ.get(LINK_ENV, "")
        if not text:
            return None
        try:
            rtt_ms, mbps = (float(x) for x in text.split(","))
        except ValueError:
            raise ValueError(f"{LINK_ENV}={text!r}: expected rtt_ms,mbps") from None
        return cls(rtt_ms, mbps)
