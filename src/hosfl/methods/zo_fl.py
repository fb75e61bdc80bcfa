"""ZO-FL with seed/scalar aggregation (DeComFL, FedKSeed style): the whole model on every
client, trained with zeroth-order probes of the loss; only seeds and scalars travel.

    t:  server samples K clients, draws P seeds                    -> seeds down
        each client m: v_mp = ℓ(θ + μ u_p; batch_m) − ℓ(θ; batch_m) -> P scalars up
        server: v̄_p = 1/K Σ_m v_mp                                  -> (seeds, v̄) down to all
        every client: θ step along 1/(Pμ) Σ_p v̄_p u_p
"""

from __future__ import annotations

import torch
from torch import nn

from hosfl import devices, zo
from hosfl.config import Config
from hosfl.methods.base import ClientRole
from hosfl.methods.replica import HOSFL_ONLY, Replica, ReplicaClient, probed
from hosfl.methods.shard import Shard
from hosfl.methods.split import ZO_SETTINGS, SplitMethod
from hosfl.protocol import Message, ProbeScalars, ProtocolError, ScalarBroadcast, StepPlan


class Client(ReplicaClient):
    def __init__(self, shard: Shard, replica: Replica, cfg: Config, task) -> None:
        super().__init__(shard, replica, cfg)
        self.task = task

    @torch.no_grad()
    def handle(self, msg: Message) -> Message | None:
        if isinstance(msg, StepPlan):
            x, y = self.shard.batch(msg.step, self.cfg.batch_size)
            model = self.replica.model
            base = self.task.loss(model(x), y).double()
            values = []
            for seed in msg.seeds.tolist():
                with zo.perturbed(model, seed, self.cfg.mu, self.cfg.directions):
                    values.append(self.task.loss(model(x), y).double() - base)
            return ProbeScalars(msg.step, torch.stack(values).float().cpu())
        if isinstance(msg, ScalarBroadcast):
            self.replica.apply(msg)
            return None
        raise ProtocolError(f"client {self.shard.cid}: unexpected {type(msg).__name__}")


class ZOFL(SplitMethod):
    """The server only samples, draws seeds and averages: the whole model is the replica,
    moved by the (seeds, v̄) broadcasts, never by a server optimizer."""

    name = "zo-fl"
    seed_synced = True
    settings = ZO_SETTINGS | {"aggregate", "outlier_factor"}
    refuses = HOSFL_ONLY

    def __init__(self, cfg: Config, client_model: nn.Module, server_model: nn.Module, task):
        super().__init__(cfg, client_model, server_model, task)
        # the whole model is the replica, run where the client part runs
        whole = nn.Sequential(client_model, server_model).to(devices.of(client_model))
        self.hold(Replica(whole, cfg))
        self._checked = False

    def client(self, shard: Shard) -> ClientRole:
        if not self._checked:
            probed(self.replica.model, shard.batch(0, 1)[0], "model")
            self._checked = True
        return Client(shard, self.replica, self.cfg, self.task)

    def step(self, t: int, engine) -> tuple[float | None, Message]:
        clients, plan = self.plan(t)
        update = self.aggregate(plan, engine.ask({m: plan for m in clients}))
        self.replica.commit(update, engine)
        return None, update
