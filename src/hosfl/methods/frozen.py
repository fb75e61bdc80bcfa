"""Frozen client: server-only fine-tuning. The client runs inference and trains nothing.

    t:  server samples K clients
        each client m: z_m = f_c(x_m; θ_c) (no autograd)   -> z_m, y_m up
        server: backprop, θ_s step; λ is not sent

It needs exactly the client memory of HO-SFL and is the control that shows whether the
client's zeroth-order training earns its cost.
"""

from __future__ import annotations

import torch

from hosfl.config import Config
from hosfl.methods.base import NO_SEEDS, ClientRole
from hosfl.methods.shard import Shard, forward_group
from hosfl.methods.split import SplitMethod
from hosfl.protocol import Message, ProtocolError, SmashedData, StepPlan


class Client(ClientRole):
    def __init__(self, shard: Shard, model: torch.nn.Module, cfg: Config) -> None:
        self.shard, self.model, self.cfg = shard, model.eval(), cfg

    @property
    def state(self) -> object:
        return self.model  # in-process every client runs the one client part

    @torch.no_grad()
    def handle(self, msg: Message) -> Message | None:
        if isinstance(msg, StepPlan):
            x, y = self.shard.batch(msg.step, self.cfg.batch_size)
            return SmashedData(msg.step, self.model(x), y)
        raise ProtocolError(f"client {self.shard.cid}: unexpected {type(msg).__name__}")

    @classmethod
    @torch.no_grad()
    def handle_group(cls, roles: list[Client], msgs: list[Message]) -> list[Message | None]:
        """The step's forwards as one forward of the concatenated batches (batched
        simulation); each client's rows are its z_m."""
        step = msgs[0].step
        if not all(isinstance(m, StepPlan) and m.step == step for m in msgs):
            return super().handle_group(roles, msgs)
        rows = forward_group(roles, step, roles[0].model)
        if rows is None:
            return super().handle_group(roles, msgs)
        return [SmashedData(step, z, y) for _, y, z in rows]


class Frozen(SplitMethod):
    name = "frozen"

    @property
    def client_lr(self) -> None:
        return None

    def client(self, shard: Shard) -> ClientRole:
        self.expect_cut(shard)
        return Client(shard, self.client_model, self.cfg)

    def step(self, t: int, engine) -> tuple[float | None, Message | None]:
        clients, _ = self.plan(t)
        smashed = engine.ask({m: StepPlan(t, NO_SEEDS) for m in clients})
        _, loss = self.train(smashed, t)
        return loss, None
