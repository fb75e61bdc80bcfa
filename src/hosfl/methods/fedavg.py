"""FedAvg (McMahan et al., AISTATS 2017): the whole model on every client, first order.

    t:  server samples K clients                             -> global θ down to each
        each client m: E local SGD steps on its own batches  -> θ_m up
        server: θ ← 1/K Σ_m θ_m

No split: a client holds and backpropagates through the whole model (d = d_c + d_s).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parameters_to_vector

from hosfl import zo
from hosfl.config import Config
from hosfl.methods.base import ClientRole, Federation, Shard, load_flat_, sample_clients
from hosfl.protocol import Message, ModelWeights, ProtocolError


class Client(ClientRole):
    def __init__(self, shard: Shard, model: nn.Module, cfg: Config) -> None:
        self.shard, self.model, self.cfg = shard, model, cfg

    def handle(self, msg: Message) -> Message | None:
        if not isinstance(msg, ModelWeights):
            raise ProtocolError(f"client {self.shard.cid}: unexpected {type(msg).__name__}")
        params = zo.trainable(self.model)
        load_flat_(params, msg.weights)
        optimizer = torch.optim.SGD(params, lr=self.cfg.client_lr)
        self.model.train()
        for e in range(self.cfg.local_steps):
            x, y = self.shard.batch(msg.step * self.cfg.local_steps + e, self.cfg.batch_size)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(self.model(x), y).backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            return ModelWeights(msg.step, parameters_to_vector(params))


class Server:
    def __init__(self, model: nn.Module, cfg: Config) -> None:
        self.model, self.cfg = model, cfg
        with torch.no_grad():
            self.weights = parameters_to_vector(zo.trainable(model)).clone()


def build(
    cfg: Config, client_model: nn.Module, server_model: nn.Module, shards: list[Shard], classes: int
) -> Federation:
    whole = nn.Sequential(client_model, server_model)
    clients: list[ClientRole] = [Client(s, whole, cfg) for s in shards]
    return Federation(
        Server(whole, cfg),
        clients,
        client_model,
        server_model,
        client_optimizer=None,
        client_holds=whole,
    )


def step(t: int, server: Server, engine) -> tuple[float | None, Message]:
    local = engine.ask({m: ModelWeights(t, server.weights) for m in sample_clients(server.cfg, t)})
    server.weights = torch.stack([local[m].weights for m in sorted(local)]).mean(0)
    load_flat_(zo.trainable(server.model), server.weights)
    return None, ModelWeights(t, server.weights)
