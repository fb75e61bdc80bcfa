"""First-order split learning, SplitFed V1 (Thapa et al., AAAI 2022), as HO-SFL's baseline.

    t:  server samples K clients
        each client m: z_m = f_c(x_m; θ_c), keeping the autograd graph    -> z_m, y_m up
        server: same step as HO-SFL                                       -> λ_m down
        each client m: g_m = ∂(λ_mᵀ z_m)/∂θ_c by backprop;
                       θ_m = θ_c − lr·g_m (one local SGD step)           -> θ_m up (4·d_c bytes)
        server (FedAvg): θ_c ← 1/K Σ_m θ_m                                -> θ_c down to all

The server role is HO-SFL's: the two methods differ only on the client and in what syncs it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

from hosfl.config import Config
from hosfl.methods.base import NO_SEEDS, ClientRole, Federation, Shard, load_flat_
from hosfl.methods.hosfl import Server, cut_shape
from hosfl.protocol import (
    CutGradient,
    Message,
    ModelWeights,
    ProtocolError,
    SmashedData,
    StepPlan,
)


class Client(ClientRole):
    def __init__(self, shard: Shard, model: nn.Module, cfg: Config) -> None:
        self.shard, self.model, self.cfg = shard, model, cfg
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._pending: tuple[int, torch.Tensor] | None = None

    def handle(self, msg: Message) -> Message | None:
        if isinstance(msg, StepPlan):  # forward with autograd: the client keeps activations
            x, y = self.shard.batch(msg.step, self.cfg.batch_size)
            z = self.model.train()(x)
            self._pending = (msg.step, z)
            return SmashedData(msg.step, z.detach(), y)
        if isinstance(msg, CutGradient):  # backprop λ, one local SGD step, weights up
            if self._pending is None or self._pending[0] != msg.step:
                raise ProtocolError(f"client {self.shard.cid}: λ for step {msg.step} unasked")
            step, z = self._pending
            self._pending = None
            grads = torch.autograd.grad(z, self.params, grad_outputs=msg.lam)
            with torch.no_grad():
                local = parameters_to_vector(self.params) - self.cfg.client_lr * (
                    parameters_to_vector(grads)
                )
            return ModelWeights(step, local)
        if isinstance(msg, ModelWeights):  # the FedAvg-ed model
            load_flat_(self.params, msg.weights)
            return None
        raise ProtocolError(f"client {self.shard.cid}: unexpected {type(msg).__name__}")


def build(
    cfg: Config,
    client_model: nn.Module,
    server_model: nn.Module,
    shards: list[Shard],
    classes: int,
) -> Federation:
    if cfg.client_optimizer != "sgd" or cfg.momentum:
        raise ValueError(
            "sfl-v1: clients take one plain SGD step (client_optimizer=sgd, momentum=0)"
        )
    clients: list[ClientRole] = [Client(s, client_model, cfg) for s in shards]
    server = Server(server_model, cfg, classes, cut_shape(client_model, shards[0]))
    return Federation(server, clients, client_model, server_model, client_optimizer=None)


def step(t: int, server: Server, engine) -> tuple[float, Message]:
    clients, _ = server.plan(t)
    plan = StepPlan(t, NO_SEEDS)  # no probes: no seeds
    smashed = engine.ask({m: plan for m in clients})
    lams, loss = server.train(smashed, t)
    local = engine.ask(lams)
    avg = torch.stack([local[c].weights for c in sorted(local)]).mean(0)
    update = ModelWeights(t, avg)
    engine.broadcast(update)
    return loss, update
