"""The shape of a step, as the in-process engine sees it: in order, each exchange between the
server and its clients (an ``ask`` and its replies, a ``tell``, a ``broadcast``), the bytes
one client receives and sends in it, the client's compute, and the server's compute before
it. ``hosfl timeline`` turns this into wall clock under a device and link profile.

Figures are medians over the last ``WINDOW`` steps that share their most common shape (an
evaluation or a checkpoint lands in the server time before a step's first exchange of a few
steps only), the memory-metered step left out. In batched simulation a group's time is split
evenly between its clients: a device's own time is the per-client simulation's.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter, deque

FIELDS = ("server_ms", "down_bytes", "up_bytes", "client_ms")
WINDOW = 1000  # steps kept: a long run's memory stays bounded


class Exchanges:
    def __init__(self, skip_step: int | None = None) -> None:
        self.skip_step = skip_step
        self.step: int | None = None
        self.last_end: float | None = None  # when the server got control back
        self.current: list[tuple] = []  # this step's (kind, down, up, clients, *FIELDS)
        self.steps: deque[list[tuple]] = deque(maxlen=WINDOW)

    def record(self, kind: str, step: int, start: float, down: str, up: str | None,
               clients: int, per_client: list[tuple[int, int, float]]) -> None:  # fmt: skip
        """One exchange to ``clients`` that began at ``start`` (perf_counter) and ends now,
        with (bytes received, bytes sent, seconds of its own work) of each recipient measured
        (a broadcast's: one per state the in-process clients share)."""
        if step != self.step:
            self._close()
            self.step = step
        n = max(len(per_client), 1)
        server_ms = 1000 * (start - self.last_end) if self.last_end is not None else 0.0
        self.current.append((kind, down, up, clients, server_ms,
                             sum(d for d, _, _ in per_client) / n,
                             sum(u for _, u, _ in per_client) / n,
                             1000 * sum(s for _, _, s in per_client) / n))  # fmt: skip
        self.last_end = time.perf_counter()

    def _close(self) -> None:
        if self.current and self.step != self.skip_step:
            self.steps.append(self.current)
        self.current = []

    def as_list(self) -> list[dict]:
        """The step's exchanges in order (medians over the steps of the common shape)."""
        self._close()
        if not self.steps:
            return []
        shapes = Counter(tuple(e[:4] for e in s) for s in self.steps)
        common = shapes.most_common(1)[0][0]
        chosen = [s for s in self.steps if tuple(e[:4] for e in s) == common]
        out = []
        for i, (kind, down, up, clients) in enumerate(common):
            row = {"kind": kind, "down": down, "up": up, "clients": clients}
            for j, name in enumerate(FIELDS):
                row[name] = statistics.median(s[i][4 + j] for s in chosen)
            out.append(row)
        return out
