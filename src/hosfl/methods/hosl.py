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
from torch import nn

from hosfl import devices, zo
from hosfl.config import Config
from hosfl.methods.base import ClientRole
from hosfl.methods.replica import HOSFL_ONLY, Replica, ReplicaClient
from hosfl.methods.shard import Shard
from hosfl.methods.split import ZO_SETTINGS, SplitMethod
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
                self.replica.layout, seeds[msg.probe], self.cfg.mu, self.cfg.directions
            ):
                return SmashedData(msg.step, self.replica.model(x), NO_LABELS)
        if isinstance(msg, ScalarBroadcast):
            self._pending = None
            self.replica.apply(msg)
            return None
        raise ProtocolError(f"client {self.shard.cid}: unexpected {type(msg).__name__}")


class HOSL(SplitMethod):
    name = "hosl"
    seed_synced = True
    # the loss differences are the server's own mean: no aggregate, no clip, no estimator
    settings = SplitMethod.settings | ZO_SETTINGS
    refuses = HOSFL_ONLY

    def __init__(self, cfg: Config, client_model: nn.Module, server_model: nn.Module, task):
        super().__init__(cfg, client_model, server_model, task)
        self.hold(Replica(client_model, cfg))  # the record; in-process, every client's

    def client(self, shard: Shard) -> ClientRole:
        self.expect_cut(shard)
        return Client(shard, self.replica, self.cfg)

    @torch.no_grad()
    def losses(self, zs: dict[int, torch.Tensor], ys: dict[int, torch.Tensor]) -> dict:
        """Each client's loss at the server's current θ_s, in eval mode: probing must not
        move BatchNorm statistics (P+1 forwards a step) nor see dropout."""
        was = self.model.training
        self.model.eval()
        here = devices.of(self.model)
        out = {
            m: self.task.loss(self.model(devices.to(zs[m], here)), devices.to(ys[m], here))
            for m in sorted(zs)
        }
        out = {m: v.double() for m, v in out.items()}
        self.model.train(was)
        return out

    @staticmethod
    def why_not_probe(reply: Message, base: SmashedData, t: int) -> str | None:
        if not isinstance(reply, SmashedData) or reply.step != t:
            return f"expected the probed SmashedData of step {t}, got {reply}"
        try:
            reply.validate()
        except ProtocolError as e:
            return str(e)
        if reply.z.shape != base.z.shape:
            return f"probed smashed data of shape {tuple(reply.z.shape)}, not {tuple(base.z.shape)}"
        return None

    def step(self, t: int, engine) -> tuple[float | None, Message]:
        clients, plan = self.plan(t)
        smashed = self.admit(engine.ask({m: plan for m in clients}), t, SmashedData)
        ys = {m: s.y for m, s in smashed.items()}
        base = self.losses({m: s.z for m, s in smashed.items()}, ys)
        values = []
        for p in range(len(plan.seeds)):
            probed = {}
            for m, reply in engine.ask({m: ProbeRequest(t, p) for m in smashed}).items():
                why = self.why_not_probe(reply, smashed[m], t)
                if why is None:
                    probed[m] = reply
                else:
                    self.reject(t, m, why)
            losses = self.losses({m: s.z for m, s in probed.items()}, ys)
            diffs = [losses[m] - base[m] for m in sorted(losses)]
            values.append(float(sum(diffs) / len(diffs)) if diffs else 0.0)
        _, loss = self.train(smashed, t)
        update = ScalarBroadcast(t, plan.seeds, torch.tensor(values, dtype=torch.float64).float())
        self.replica.commit(update, engine)
        return loss, update
