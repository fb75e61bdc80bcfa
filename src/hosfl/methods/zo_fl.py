"""ZO-FL with seed/scalar aggregation (DeComFL, FedKSeed style): the whole model on every
client, trained with zeroth-order probes of the loss; only seeds and scalars travel.

    t:  server samples K clients, draws P seeds                    -> seeds down
        each client m: v_mp = ℓ(θ + μ u_p; batch_m) − ℓ(θ; batch_m) -> P scalars up
        server: v̄_p = 1/K Σ_m v_mp                                  -> (seeds, v̄) down to all
        every client: θ step along 1/(Pμ) Σ_p v̄_p u_p
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hosfl import zo
from hosfl.config import Config
from hosfl.methods.base import ClientRole, Federation, Shard
from hosfl.methods.hosfl import Replica, ReplicaClient, Server
from hosfl.protocol import Message, ProbeScalars, ProtocolError, ScalarBroadcast, StepPlan


class Client(ReplicaClient):
    @torch.no_grad()
    def handle(self, msg: Message) -> Message | None:
        if isinstance(msg, StepPlan):
            x, y = self.shard.batch(msg.step, self.cfg.batch_size)
            model = self.replica.model
            base = F.cross_entropy(model(x), y).double()
            values = []
            for seed in msg.seeds.tolist():
                with zo.perturbed(model, seed, self.cfg.mu, self.cfg.directions):
                    values.append(F.cross_entropy(model(x), y).double() - base)
            return ProbeScalars(msg.step, torch.stack(values).float())
        if isinstance(msg, ScalarBroadcast):
            self.replica.apply(msg)
            return None
        raise ProtocolError(f"client {self.shard.cid}: unexpected {type(msg).__name__}")


def build(
    cfg: Config, client_model: nn.Module, server_model: nn.Module, shards: list[Shard], classes: int
) -> Federation:
    whole = nn.Sequential(client_model, server_model)
    replica = Replica(whole, cfg)
    clients: list[ClientRole] = [Client(s, replica, cfg) for s in shards]
    # The server role only samples, draws seeds and averages: the top layers it is handed are
    # part of ``whole`` and trained by the clients' updates, never by its own optimizer.
    return Federation(
        Server(server_model, cfg, classes, z_shape=()),  # no smashed data in ZO-FL
        clients,
        client_model,
        server_model,
        replica.optimizer,
        client_holds=whole,
    )


def step(t: int, server: Server, engine) -> tuple[float | None, Message]:
    clients, plan = server.plan(t)
    scalars = engine.ask({m: plan for m in clients})
    update = server.aggregate(plan, scalars)
    engine.broadcast(update)
    return None, update
