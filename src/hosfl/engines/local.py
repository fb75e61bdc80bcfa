"""In-process engine: client roles are objects in this process; messages are handed over by
reference and every delivery is recorded in the byte ledger at its exact encoded size."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from hosfl.methods.base import ClientRole
from hosfl.metrics.ledger import DOWN, UP, ByteLedger
from hosfl.protocol import Message


class LocalEngine:
    def __init__(self, clients: Sequence[ClientRole], ledger: ByteLedger) -> None:
        self.clients = list(clients)
        self.ledger = ledger

    def carry(self, direction: str, msg: Message, copies: int = 1) -> Message:
        """Move one message (to ``copies`` recipients); what the receiver gets is returned."""
        self.ledger.record(direction, msg, copies)
        return msg

    def ask(self, requests: Mapping[int, Message]) -> dict[int, Message]:
        """Send each client its request and collect the replies, in client order."""
        replies = {}
        for cid in sorted(requests):
            reply = self.clients[cid].handle(self.carry(DOWN, requests[cid]))
            if reply is None:
                raise RuntimeError(f"client {cid} did not answer {type(requests[cid]).__name__}")
            replies[cid] = self.carry(UP, reply)
        return replies

    def broadcast(self, msg: Message) -> None:
        """Deliver ``msg`` to every client; no replies."""
        received = self.carry(DOWN, msg, copies=len(self.clients))
        for client in self.clients:
            client.handle(received)
