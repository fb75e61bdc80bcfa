"""Clients that attack, for robustness studies (``benchmarks/attacks.py``, tests): a wrapper
of any method's client role that answers as the honest client would, then changes its reply.

    with attacking(HOSFL, {0, 1}, "scale-scalars", 50.0):
        hosfl.run(cfg)

Every attack stays inside the protocol's type checks (finite values, right shapes, labels in
range): what remains is what an aggregation rule must bound. The attacks, by name:

- ``scale-scalars`` (F): the probe scalars times F (a negative F flips their sign);
- ``constant-scalars`` (C): every probe scalar C;
- ``alie`` (z): "a little is enough" (Baruch et al., NeurIPS 2019), each probe scalar moved
  by −z standard deviations of the client's own honest scalars so far, in the direction that
  opposes its honest value: inside the spread of honest uploads, never an outlier;
- ``scale-z`` (F): the smashed data times F;
- ``random-z`` (F): the smashed data replaced by Gaussian noise of F times its norm;
- ``flip-labels``: label c sent as C − 1 − c (C classes);
- ``scale-weights`` (F): a first-order client's uploaded weights times F.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from hosfl.methods.base import ClientRole, Method
from hosfl.protocol import Message, ModelWeights, ProbeReport, ProbeScalars, SmashedData

ATTACKS = ("scale-scalars", "constant-scalars", "alie", "scale-z", "random-z", "flip-labels",
           "scale-weights")


class Malicious(ClientRole):
    """``role``'s honest answers, changed by ``attack`` (see the module docstring)."""

    def __init__(self, role: ClientRole, attack: str, value: float, classes: int) -> None:
        if attack not in ATTACKS:
            raise ValueError(f"attack {attack!r}: one of {', '.join(ATTACKS)}")
        self.role, self.attack, self.value, self.classes = role, attack, value, classes
        self.shard = role.shard
        self.seen: list[float] = []  # its honest probe scalars (alie)
        self.gen = torch.Generator().manual_seed(1_000_003 * (role.shard.cid + 1))

    @property
    def state(self) -> object:
        return self  # answered on its own, never batched with the honest clients

    def synced(self):
        return self.role.synced()

    def catch_up(self, msg):
        return self.role.catch_up(msg)

    def restore(self, msg):
        return self.role.restore(msg)

    def handle(self, msg: Message) -> Message | None:
        reply = self.role.handle(msg)
        if isinstance(reply, ProbeScalars):
            return self._scalars(reply)
        if isinstance(reply, SmashedData):
            return self._smashed(reply)
        if isinstance(reply, ModelWeights) and self.attack == "scale-weights":
            return ModelWeights(reply.step, reply.weights * self.value)
        return reply

    def _scalars(self, reply: ProbeScalars) -> ProbeScalars:
        v = reply.values
        if self.attack == "scale-scalars":
            v = v * self.value
        elif self.attack == "constant-scalars":
            v = torch.full_like(v, self.value)
        elif self.attack == "alie":
            self.seen = (self.seen + v.tolist())[-256:]
            sd = statistics.pstdev(self.seen) if len(self.seen) > 1 else 0.0
            v = v - self.value * sd * torch.where(v >= 0, 1.0, -1.0)
        else:
            return reply
        if isinstance(reply, ProbeReport):
            return ProbeReport(reply.step, v.float(), reply.sizes)
        return ProbeScalars(reply.step, v.float())

    def _smashed(self, reply: SmashedData) -> SmashedData:
        z, y = reply.z, reply.y
        if self.attack == "scale-z":
            z = z * self.value
        elif self.attack == "random-z":
            noise = torch.randn(z.shape, generator=self.gen).to(z)
            z = noise * (self.value * float(z.norm()) / max(float(noise.norm()), 1e-30))
        elif self.attack == "flip-labels" and self.classes:
            y = self.classes - 1 - y
        else:
            return reply
        return SmashedData(reply.step, z, y)


@contextmanager
def attacking(
    method: type[Method], clients: set[int], attack: str, value: float = 0.0
) -> Iterator[None]:
    """Within the block, the roles ``method`` makes for ``clients`` attack (in-process runs:
    the roles an engine builds in this process)."""
    honest: Callable = method.client
    own = "client" in vars(method)

    def client(self: Method, shard) -> ClientRole:
        role = honest(self, shard)
        if shard.cid not in clients:
            return role
        return Malicious(role, attack, value, self.task.classes)

    method.client = client
    try:
        yield
    finally:
        if own:
            method.client = honest
        else:
            del method.client
