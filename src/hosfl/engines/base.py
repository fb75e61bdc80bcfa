"""The contract of an engine: it carries encoded messages between the method (the server,
this process) and the client roles, counts their bytes, and knows no method.

A method calls only ``ask``, ``tell`` and ``broadcast``; the runner sets
``before_broadcast`` (the journal commit), uses the engine as a context manager (``with
engine:`` lets its clients go on every path) and reads the figures after ``close``. A new
engine is one file beside ``local.py`` and ``ray.py`` implementing this Protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from hosfl.protocol import Message


class Engine(Protocol):
    before_broadcast: Callable[[Message], None]  # runs before a broadcast leaves the server
    client_peak_bytes: int  # peak tensor bytes of one client's work at the metered step
    verified: int | None  # clients checked in step with the server's record (None: no record)
    events: list[dict]  # what the engine did that the run's metrics should show (resyncs)

    def ask(self, requests: Mapping[int, Message]) -> dict[int, Message]:
        """Send client ``cid`` its request, for each; the replies of those that answered."""

    def tell(self, messages: Mapping[int, Message]) -> None:
        """Send client ``cid`` its message, for each; no reply is expected."""

    def broadcast(self, msg: Message) -> None:
        """The step's update, to every client (or to the step's clients, the others
        catching up later); ``before_broadcast`` runs first."""

    def close(self) -> None:
        """End of run: release the clients, fill in the figures."""

    def client_ms_per_step(self, sampled: int) -> float:
        """Client compute per sampled client per step, in milliseconds."""

    def __enter__(self) -> Engine: ...

    def __exit__(self, *exc: object) -> None:
        """Let the clients go (processes, a Ray instance, a bound port) on every path."""


class Releasing:
    """``with engine:``: the engine's clients are let go once, however the block ends (a step
    that raised included); ``close`` at the end of a run lets them go too."""

    _released = False

    def __enter__(self) -> Releasing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._release()

    def _release(self) -> None:
        """Let the clients go (nothing in-process)."""
