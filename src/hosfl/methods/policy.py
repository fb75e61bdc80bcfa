"""Admission policy: what the server accepts from clients beyond the type checks. ``Scale``
bounds an upload's magnitude by recent honest ones; ``blown_up`` tells a diverged computation
(every reply non-finite) from a few bad clients."""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch

from hosfl.protocol import Message, ProbeScalars, SmashedData, finite


class Seen:
    """The sizes a control has seen (``seen``), all of its state: what a checkpoint keeps."""

    seen: list[float]

    def state_dict(self) -> dict[str, Any]:
        return {"seen": list(self.seen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = [float(v) for v in state["seen"]]


class Scale(Seen):
    """What honest clients have been sending: the magnitudes (largest absolute value) of the
    last ``window`` admitted uploads of one kind. An upload more than ``factor`` times their
    median, taken together with the other uploads of its own step, is rejected: a client that
    stays inside the type checks (finite, right shape) cannot push 1e30 into the average. The
    median resists poisoning as long as honest uploads are the majority."""

    def __init__(self, window: int = 64) -> None:
        self.window, self.seen = window, []

    def screen(self, sizes: dict[int, float], factor: float) -> dict[int, str]:
        """The clients whose upload is out of bounds, with the reason; the others are noted."""
        pool = self.seen + list(sizes.values())
        out = {}
        if factor and len(pool) >= 3:
            ref = statistics.median(pool)
            out = {
                c: f"magnitude {v:.3g} is more than {factor:g}× the median of recent uploads "
                f"({ref:.3g})"
                for c, v in sizes.items()
                if v > factor * max(ref, 1e-30)
            }
        self.seen = (self.seen + [v for c, v in sizes.items() if c not in out])[-self.window :]
        return out


def largest(t: torch.Tensor) -> float:
    """max |t| (0 if empty), read off ``aminmax`` without a copy of |t|."""
    if not t.numel():
        return 0.0
    low, high = t.aminmax()
    return max(-float(low), float(high))


def rms(t: torch.Tensor) -> float:
    """√(mean t²) (0 if empty), accumulated in float64 without a float64 copy of ``t``."""
    if not t.numel():
        return 0.0
    return float(torch.linalg.vector_norm(t, dtype=torch.float64)) / math.sqrt(t.numel())


def magnitude(msg: Message) -> float | None:
    if isinstance(msg, SmashedData):
        return largest(msg.z)
    if isinstance(msg, ProbeScalars):
        return largest(msg.values)
    return None


def blown_up(replies: dict[int, Message]) -> bool:
    """True if every reply carries a non-finite value: the clients' own computation diverged
    (a divergence to report, not a few bad clients to drop)."""
    return bool(replies) and all(
        isinstance(r, Message)
        and any(
            not finite(t)
            for t in (getattr(r, name) for name in r.SCHEMA)
            if isinstance(t, torch.Tensor)
        )
        for r in replies.values()
    )


class Caps(Seen):
    """The sizes the clients' uploads of one kind may have: at most ``factor`` times the median
    of the step's clients' sizes (a cold start that needs no history) and, once ``warmup``
    steps are seen, at most ``factor`` times ``history`` times the median of the sizes admitted
    over the last ``window`` client uploads. One client cannot move the step (it is bounded by
    the others), nor a majority of one step (it is bounded by the run's past)."""

    def __init__(self, factor: float, history: float = 3.0, window: int = 64, warmup: int = 8):
        self.factor, self.history, self.window, self.warmup = factor, history, window, warmup
        self.seen: list[float] = []

    def cap(self, sizes: list[float]) -> float:
        cap = self.factor * statistics.median(sizes) if sizes else float("inf")
        if len(self.seen) >= self.warmup:
            cap = min(cap, self.factor * self.history * statistics.median(self.seen))
        return cap

    def scales(self, sizes: dict[int, float]) -> dict[int, float]:
        """Each client's scale (1: within the cap), its capped size noted."""
        cap = self.cap(list(sizes.values()))
        out = {c: 1.0 if s <= cap or s == 0 else cap / s for c, s in sizes.items()}
        self.seen = (self.seen + [sizes[c] * out[c] for c in sizes])[-self.window :]
        return out
