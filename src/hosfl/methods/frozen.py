"""Frozen client: server-only fine-tuning. The client runs inference and trains nothing.

    t:  server samples K clients
        each client m: z_m = f_c(x_m; θ_c) (no autograd)   -> z_m, y_m up
        server: backprop, θ_s step; λ is not sent

It needs exactly the client memory of HO-SFL and is the control that shows whether the
client's zeroth-order training earns its cost.
"""

from __future__ import annotations

import torch
from torch import nn

from hosfl.config import Config
from hosfl.methods.base import NO_SEEDS, ClientRole, Federation, Shard
from hosfl.methods.hosfl import Server, cut_shape
from hosfl.protocol import Message, ProtocolError, SmashedData, StepPlan


class Client(ClientRole):
    def __init__(self, shard: Shard, model: nn.Module, cfg: Config) -> None:
        self.shard, self.model, self.cfg = shard, model.eval(), cfg

    @torch.no_grad()
    def handle(self, msg: Message) -> Message | None:
        if isinstance(msg, StepPlan):
            x, y = self.shard.batch(msg.step, self.cfg.batch_size)
            return SmashedData(msg.step, self.model(x), y)
        raise ProtocolError(f"client {self.shard.cid}: unexpected {type(msg).__name__}")


def build(
    cfg: Config, client_model: nn.Module, server_model: nn.Module, shards: list[Shard], classes: int
) -> Federation:
    clients: list[ClientRole] = [Client(s, client_model, cfg) for s in shards]
    return Federation(
        Server(server_model, cfg, classes, cut_shape(client_model, shards[0])),
        clients,
        client_model,
        server_model,
        client_optimizer=None,
    )


def step(t: int, server: Server, engine) -> tuple[float, Message | None]:
    clients, _ = server.plan(t)
    smashed = engine.ask({m: StepPlan(t, NO_SEEDS) for m in clients})
    _, loss = server.train(smashed, t)
    return loss, None
