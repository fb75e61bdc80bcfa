"""HOSL-style split learning (arXiv 2601.10940, made federated): the client estimates its
gradient with zeroth-order probes through the true loss, one server round trip per probe.

    t:  server samples K clients, draws P seeds
        each client m: z_m = f_c(x_m; θ_c)                        -> z_m, y_m up
        for p = 1..P:  client m: z_mp = f_c(x_m; θ_c + μ u_p)     -> z_mp up
                       server: v_p = 1/K Σ_m ℓ(f_s(z_mp), y_m) − ℓ(f_s(z_m), y_m)
        server: backprop on the z_m, θ_s step (first order)
        server -> every client: (seeds, v̄); θ_c step along 1/(Pμ) Σ_p v̄_p u_p

Against HO-SFL: P more smashed-data uploads per client per step instead of one λ download,
and the estimate is of the loss itself rather than of the linear surrogate λᵀ f_c. The server
computes the loss differences itself, so it sends them down once, averaged, in the broadcast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hosfl import zo
from hosfl.config import Config
from hosfl.methods import hosfl
from hosfl.methods.base import Federation, Shard
from hosfl.methods.hosfl import Replica, ReplicaClient, Server
from hosfl.protocol import (
    Message,
    ProbeRequest,
    ProtocolError,
    ScalarBroadcast,
    SmashedData,
    StepPlan,
)

NO_LABELS = torch.empty(0, dtype=torch.int64)


class Client(ReplicaClient):
    def __init__(self, shard: Shard, replica: Replica, cfg: Config) -> None:
        super().__init__(shard, replica, cfg)
        self._pending: tuple[int, torch.Tensor, list[int]] | None = None

    @torch.no_grad()
    def handle(self, msg: Message) -> Message | None:
        if isinstance(msg, StepPlan):
            x, y = self.shard.batch(msg.step, self.cfg.batch_size)
            self._pending = (msg.step, x, msg.seeds.tolist())
            return SmashedData(msg.step, self.replica.model(x), y)
        if isinstance(msg, ProbeRequest):
            if self._pending is None or self._pending[0] != msg.step:
                raise ProtocolError(f"client {self.shard.cid}: probe for step {msg.step} unasked")
            _, x, seeds = self._pending
            with zo.perturbed(
                self.replica.model, seeds[msg.probe], self.cfg.mu, self.cfg.directions
            ):
                return SmashedData(msg.step, self.replica.model(x), NO_LABELS)
        if isinstance(msg, ScalarBroadcast):
            self._pending = None
            self.replica.apply(msg)
            return None
        raise ProtocolError(f"client {self.shard.cid}: unexpected {type(msg).__name__}")


@torch.no_grad()
def _losses(model: nn.Module, zs: dict[int, torch.Tensor], ys: dict[int, torch.Tensor]):
    return {m: F.cross_entropy(model(zs[m]), ys[m]).double() for m in sorted(zs)}


def build(
    cfg: Config, client_model: nn.Module, server_model: nn.Module, shards: list[Shard], classes: int
) -> Federation:
    return hosfl.build(cfg, client_model, server_model, shards, classes, client_class=Client)


def step(t: int, server: Server, engine) -> tuple[float, Message]:
    clients, plan = server.plan(t)
    smashed = engine.ask({m: plan for m in clients})
    ys = {m: s.y for m, s in smashed.items()}
    base = _losses(server.model, {m: s.z for m, s in smashed.items()}, ys)
    values = []
    for p in range(len(plan.seeds)):
        probed = engine.ask({m: ProbeRequest(t, p) for m in clients})
        losses = _losses(server.model, {m: s.z for m, s in probed.items()}, ys)
        values.append(sum(losses[m] - base[m] for m in clients) / len(clients))
    _, loss = server.train(smashed, t)
    update = ScalarBroadcast(t, plan.seeds, torch.stack(values).float())
    engine.broadcast(update)
    return loss, update
