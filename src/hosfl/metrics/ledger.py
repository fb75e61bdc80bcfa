"""Bytes that really crossed the network, by direction and payload type.

Engines call ``record`` with every message they deliver; sizes come from the message itself
(``Message.payload_bytes``), which equals the length of its encoding in the run's
``cut_dtype`` (the format smashed data and λ travel in).
"""

from __future__ import annotations

from collections import Counter

from hosfl.protocol import Message

UP, DOWN = "up", "down"


class ByteLedger:
    def __init__(self, cut_dtype: str = "float32") -> None:
        self.cut_dtype = cut_dtype
        self.bytes: dict[str, Counter[str]] = {UP: Counter(), DOWN: Counter()}
        self.messages: dict[str, Counter[str]] = {UP: Counter(), DOWN: Counter()}
        self.by_message: dict[str, Counter[str]] = {UP: Counter(), DOWN: Counter()}  # bytes

    @classmethod
    def from_dict(cls, saved: dict[str, dict[str, int]], cut_dtype: str = "float32") -> ByteLedger:
        """A ledger holding the byte counts ``as_dict`` returned (a resumed run goes on)."""
        ledger = cls(cut_dtype)
        for direction, counts in saved.items():
            ledger.bytes[direction].update({k: int(v) for k, v in counts.items()})
        return ledger

    def record(self, direction: str, msg: Message, copies: int = 1) -> None:
        sizes = msg.payload_bytes(self.cut_dtype)
        for payload, n in sizes.items():
            self.bytes[direction][payload] += n * copies
        self.messages[direction][type(msg).__name__] += copies
        self.by_message[direction][type(msg).__name__] += sum(sizes.values()) * copies

    def total(self, direction: str | None = None) -> int:
        dirs = (direction,) if direction else (UP, DOWN)
        return sum(sum(self.bytes[d].values()) for d in dirs)

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {d: dict(sorted(c.items())) for d, c in self.bytes.items()}
