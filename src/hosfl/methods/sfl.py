"""First-order split learning, SplitFed V1 (Thapa et al., AAAI 2022), as HO-SFL's baseline.

    t:  server samples K clients                                          -> θ_c down to each
        each client m: z_m = f_c(x_m; θ_c), keeping the autograd graph    -> z_m, y_m up
        server: same step as HO-SFL                                       -> λ_m down
        each client m: g_m = ∂(λ_mᵀ z_m)/∂θ_c by backprop;
                       θ_m = θ_c − lr·g_m (one local SGD step)           -> θ_m up (4·d_c bytes)
        server (FedAvg): θ_c ← 1/K Σ_m θ_m

A client receives the averaged θ_c when it is next sampled (as in FedAvg), so the download is
counted K times a step, not M. The server role is HO-SFL's: the two methods differ only on the
client and in what syncs it. Uploaded weights are checked like every other message (their
number, finite values); a step with none admitted leaves θ_c as it is.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

from hosfl import devices, zo
from hosfl.config import Config
from hosfl.methods.base import NO_SEEDS, ClientRole, Diverged
from hosfl.methods.shard import Shard
from hosfl.methods.split import SplitMethod
from hosfl.methods.weights import flatten, load_flat_, rebind_buffers_, shared_state
from hosfl.protocol import (
    CutGradient,
    Message,
    ModelWeights,
    ProtocolError,
    SmashedData,
    StepPlan,
    finite,
)


class Client(ClientRole):
    def __init__(self, shard: Shard, model: nn.Module, cfg: Config) -> None:
        self.shard, self.model, self.cfg = shard, model, cfg
        self.params = zo.trainable(model)
        self._received: torch.Tensor | None = None  # the statistics of the FedAvg-ed model
        self._pending: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def handle(self, msg: Message) -> Message | None:
        if isinstance(msg, ModelWeights):  # the FedAvg-ed model, fetched when sampled
            load_flat_(shared_state(self.model), msg.weights)
            self._received = msg.weights[sum(p.numel() for p in self.params) :]
            return None
        if isinstance(msg, StepPlan):  # forward with autograd: the client keeps activations
            x, y = self.shard.batch(msg.step, self.cfg.batch_size)
            # in-process the clients share one model: each starts from the received statistics
            # and keeps what its own batch made of them, as a client process does
            if self._received is not None:
                rebind_buffers_(self.model, self._received)
            with devices.seeded(x.device, self.cfg.seed, 4, self.shard.cid, msg.step):
                z = self.model.train()(x)
            self._pending = (msg.step, z, flatten(shared_state(self.model)[len(self.params) :]))
            return SmashedData(msg.step, z.detach(), y)
        if isinstance(msg, CutGradient):  # backprop λ, one local SGD step, weights up
            if self._pending is None or self._pending[0] != msg.step:
                raise ProtocolError(f"client {self.shard.cid}: λ for step {msg.step} unasked")
            step, z, stats = self._pending
            self._pending = None
            lam = devices.to(msg.lam, z.device)
            grads = torch.autograd.grad(z, self.params, grad_outputs=lam)
            with torch.no_grad():
                local = parameters_to_vector(self.params) - self.cfg.client_lr * (
                    parameters_to_vector(grads)
                )
            return ModelWeights(step, torch.cat([local, stats.to(local.device)]))
        raise ProtocolError(f"client {self.shard.cid}: unexpected {type(msg).__name__}")


class SplitFedV1(SplitMethod):
    name = "sfl-v1"
    # aggregate: mean (FedAvg) or bounded (each client's change to θ_c capped as the scalars are)
    settings = SplitMethod.settings | {"client_lr", "client_optimizer", "aggregate"}
    refuses = {"aggregate": ("median", "trimmed", "clipped")}

    def __init__(self, cfg: Config, client_model: nn.Module, server_model: nn.Module, task):
        if cfg.client_optimizer != "sgd" or cfg.momentum:
            raise ValueError(
                f"{self.name}: clients take one plain SGD step (client_optimizer=sgd, momentum=0)"
            )
        super().__init__(cfg, client_model, server_model, task)
        self.params = zo.trainable(client_model)

    def client(self, shard: Shard) -> ClientRole:
        self.expect_cut(shard)
        return Client(shard, self.client_model, self.cfg)

    def send_model(self, t: int, clients: list[int], engine) -> None:
        # kept as the clients' starting point: in-process their forwards move the shared
        # model's BatchNorm statistics before the average
        self.sent = flatten(shared_state(self.client_model))
        engine.tell({m: ModelWeights(t, self.sent) for m in clients})

    def average(self, t: int, local: dict[int, Message]) -> ModelWeights | None:
        """FedAvg of the admitted local models into the server's θ_c."""
        local = self.admit(local, t, ModelWeights)
        if not local:
            return None
        cids = sorted(local)
        caps = self.caps[ModelWeights]
        if caps is None:
            avg = torch.stack([local[c].weights for c in cids]).mean(0)
        else:  # aggregate=bounded: each client's change at most the step's median and 3× recent
            here = self.sent.double()  # what every client started the step from
            deltas = torch.stack([local[c].weights.double() - here for c in cids])
            scale = caps.scales(dict(zip(cids, deltas.norm(dim=1).tolist(), strict=True)))
            factors = torch.tensor([scale[c] for c in cids], dtype=torch.float64)[:, None]
            avg = (here + (deltas * factors).mean(0)).float()
        if not finite(avg):
            raise Diverged("the averaged client weights are not finite")
        load_flat_(shared_state(self.client_model), avg)
        return ModelWeights(t, avg)

    def step(self, t: int, engine) -> tuple[float | None, Message | None]:
        clients, _ = self.plan(t)
        self.send_model(t, clients, engine)
        smashed = engine.ask({m: StepPlan(t, NO_SEEDS) for m in clients})
        lams, loss = self.train(smashed, t)
        return loss, self.average(t, engine.ask(lams))
