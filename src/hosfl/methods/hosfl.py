"""HO-SFL, Algorithm 1 (Chen et al., arXiv 2603.14773): one step reads like the paper.

    t:  server samples K clients, draws P seeds s_1..s_P
        each client m: z_m = f_c(x_m; θ_c) (no autograd)                     -> z_m, y_m up
        server: backprop ℓ(f_s(z_m; θ_s), y_m); θ_s step; λ_m = ∂ℓ_m/∂z_m    -> λ_m down
        each client m: v_mp = λ_mᵀ (f_c(x_m; θ_c + μ u_p) − z_m), p = 1..P    -> P scalars up
        server: v̄_p = 1/K Σ_m v_mp                                           -> (seeds, v̄) down
        every client: θ_c ← optimizer step along ĝ = 1/(Pμ) Σ_p v̄_p u_p

The engine moves the messages; this file only computes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hosfl import zo
from hosfl.config import Config
from hosfl.methods.base import ClientRole, Federation, Shard, make_optimizer, sample_clients
from hosfl.protocol import (
    CutGradient,
    Message,
    ProbeScalars,
    ProtocolError,
    ScalarBroadcast,
    SmashedData,
    StepPlan,
)


class Replica:
    """A client's copy of θ_c and its optimizer; applies broadcasts strictly in step order.

    In-process all M clients share one Replica (they hold the identical θ_c by construction),
    so applying a broadcast that was already applied is a no-op."""

    def __init__(self, model: nn.Module, cfg: Config) -> None:
        self.model = model.eval()  # BatchNorm statistics frozen, dropout off while probing
        self.params = zo.trainable(model)
        self.mu = cfg.mu
        self.optimizer = make_optimizer(
            cfg.client_optimizer, self.params, cfg.client_lr, cfg.momentum
        )
        self.step = 0  # the next step this replica needs

    def apply(self, msg: ScalarBroadcast) -> None:
        if msg.step < self.step:
            return
        if msg.step > self.step:
            raise ProtocolError(f"replica at step {self.step} got the update of step {msg.step}")
        zo.apply_update_(
            self.params, msg.seeds.tolist(), msg.values.tolist(), self.mu, self.optimizer
        )
        self.step += 1


class Client(ClientRole):
    def __init__(self, shard: Shard, replica: Replica, cfg: Config) -> None:
        self.shard, self.replica, self.cfg = shard, replica, cfg
        self._pending: tuple[int, torch.Tensor, torch.Tensor, list[int]] | None = None

    @torch.no_grad()
    def handle(self, msg: Message) -> Message | None:
        if isinstance(msg, StepPlan):  # forward pass, smashed data up
            x, y = self.shard.batch(msg.step, self.cfg.batch_size)
            z = self.replica.model(x)
            self._pending = (msg.step, x, z, msg.seeds.tolist())
            return SmashedData(msg.step, z, y)
        if isinstance(msg, CutGradient):  # P probes, P scalars up
            if self._pending is None or self._pending[0] != msg.step:
                raise ProtocolError(f"client {self.shard.cid}: λ for step {msg.step} unasked")
            step, x, z, seeds = self._pending
            self._pending = None
            values = []
            for seed in seeds:
                with zo.perturbed(self.replica.model, seed, self.cfg.mu):
                    values.append(zo.estimate(msg.lam, self.replica.model(x), z))
            return ProbeScalars(step, torch.tensor(values, dtype=torch.float32))
        if isinstance(msg, ScalarBroadcast):  # every client applies the same update
            self.replica.apply(msg)
            return None
        raise ProtocolError(f"client {self.shard.cid}: unexpected {type(msg).__name__}")


class Server:
    def __init__(self, model: nn.Module, cfg: Config, classes: int) -> None:
        self.model, self.cfg, self.classes = model, cfg, classes
        self.optimizer = make_optimizer(
            cfg.server_optimizer, model.parameters(), cfg.server_lr, cfg.momentum
        )

    def plan(self, step: int) -> tuple[list[int], StepPlan]:
        clients = sample_clients(self.cfg, step)
        rng = np.random.default_rng([self.cfg.seed, 1, step])
        seeds = torch.from_numpy(rng.integers(0, 2**31, size=self.cfg.P, dtype=np.int64))
        return clients, StepPlan(step, seeds.to(torch.int32))

    def train(self, smashed: dict[int, SmashedData]) -> tuple[dict[int, CutGradient], float]:
        """One optimizer step on θ_s over the K clients' batches; λ_m for each client.

        Each client's loss is backpropagated on its own so that z_m.grad is exactly ∂ℓ_m/∂z_m
        (the λ of the paper); θ_s's accumulated gradient is then divided by K."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        lams, total = {}, 0.0
        for cid, msg in smashed.items():
            if msg.y.numel() and (msg.y.min() < 0 or msg.y.max() >= self.classes):
                raise ProtocolError(f"client {cid}: labels outside 0..{self.classes - 1}")
            z = msg.z.detach().clone().requires_grad_(True)
            loss = F.cross_entropy(self.model(z), msg.y)
            loss.backward()
            lams[cid] = CutGradient(msg.step, z.grad)
            total += loss.item()
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.div_(len(smashed))
        self.optimizer.step()
        return lams, total / len(smashed)

    def aggregate(self, plan: StepPlan, scalars: dict[int, Message]) -> ScalarBroadcast:
        """v̄ = mean over clients, accumulated in float64, sent as float32."""
        for cid, msg in scalars.items():
            if not isinstance(msg, ProbeScalars) or msg.values.shape != plan.seeds.shape:
                raise ProtocolError(f"client {cid}: expected {len(plan.seeds)} probe scalars")
        stacked = torch.stack([scalars[c].values.double() for c in sorted(scalars)])
        return ScalarBroadcast(plan.step, plan.seeds, stacked.mean(0).float())


def build(
    cfg: Config,
    client_model: nn.Module,
    server_model: nn.Module,
    shards: list[Shard],
    classes: int,
    client_class: type = Client,
    server_class: type = Server,
) -> Federation:
    """All clients share one Replica; HOSL and ZO-SFL reuse this with their own roles."""
    replica = Replica(client_model, cfg)
    clients: list[ClientRole] = [client_class(s, replica, cfg) for s in shards]
    server = server_class(server_model, cfg, classes)
    return Federation(server, clients, client_model, server_model, replica.optimizer)


def step(t: int, server: Server, engine) -> tuple[float, Message]:
    """One aggregation; returns the training loss and the broadcast (the step's log entry)."""
    clients, plan = server.plan(t)
    smashed = engine.ask({m: plan for m in clients})
    lams, loss = server.train(smashed)
    scalars = engine.ask(lams)
    update = server.aggregate(plan, scalars)
    engine.broadcast(update)
    return loss, update
