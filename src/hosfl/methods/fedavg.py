"""FedAvg (McMahan et al., AISTATS 2017): the whole model on every client, first order.

    t:  server samples K clients                             -> global θ down to each
        each client m: E local steps on its own batches      -> θ_m up
        server: θ ← 1/K Σ_m θ_m

No split: a client holds and backpropagates through the whole model (d = d_c + d_s). The
local optimizer is ``client_optimizer`` (with ``momentum``), created afresh each round as in
FedAvg: no optimizer state crosses rounds. The global θ lives in the model itself, so a
checkpoint of the model parts is all a resume needs.
"""

from __future__ import annotations

import torch
from torch import nn

from hosfl import devices, zo
from hosfl.config import Config
from hosfl.methods.base import ClientRole, Diverged, Method, make_optimizer
from hosfl.methods.shard import Shard
from hosfl.methods.weights import flatten, load_flat_, shared_state
from hosfl.protocol import Message, ModelWeights, ProtocolError, finite


class Client(ClientRole):
    def __init__(self, shard: Shard, model: nn.Module, task, cfg: Config) -> None:
        self.shard, self.model, self.task, self.cfg = shard, model, task, cfg

    def handle(self, msg: Message) -> Message | None:
        if not isinstance(msg, ModelWeights):
            raise ProtocolError(f"client {self.shard.cid}: unexpected {type(msg).__name__}")
        params, state = zo.trainable(self.model), shared_state(self.model)
        load_flat_(state, msg.weights)
        cfg = self.cfg
        optimizer = make_optimizer(cfg.client_optimizer, params, cfg.client_lr, cfg.momentum)
        self.model.train()
        for e in range(cfg.local_steps):
            x, y = self.shard.batch(msg.step * cfg.local_steps + e, cfg.batch_size)
            optimizer.zero_grad(set_to_none=True)
            with devices.seeded(x.device, cfg.seed, 4, self.shard.cid, msg.step, e):
                loss = self.task.loss(self.model(x), y)
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            return ModelWeights(msg.step, flatten(state))


class FedAvg(Method):
    name = "fedavg"
    settings = frozenset({"client_optimizer", "client_lr", "momentum", "local_steps"})

    def __init__(self, cfg: Config, client_model: nn.Module, server_model: nn.Module, task):
        super().__init__(cfg, client_model, server_model, task)
        # the whole model runs where the client part does
        self.model = nn.Sequential(client_model, server_model).to(devices.of(client_model))
        self.client_holds = self.model
        self.params = zo.trainable(self.model)

    def client(self, shard: Shard) -> ClientRole:
        return Client(shard, self.model, self.task, self.cfg)

    def step(self, t: int, engine) -> tuple[float | None, Message]:
        self.sampled = self.sample(t)
        weights = flatten(shared_state(self.model))
        replies = engine.ask({m: ModelWeights(t, weights) for m in self.sampled})
        local = self.admit(replies, t, ModelWeights)
        local = {m: w for m, w in local.items() if w.weights.shape == weights.shape}
        if local:
            avg = torch.stack([local[m].weights for m in sorted(local)]).mean(0)
            if not finite(avg):
                raise Diverged("the averaged weights are not finite")
            load_flat_(shared_state(self.model), avg)
        return None, ModelWeights(t, weights if not local else avg)
