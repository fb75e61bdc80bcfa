"""SplitFed V2 (Thapa et al., AAAI 2022): the server trains on the sampled clients one after
another, taking a step on each; the clients' models are FedAvg-ed as in SplitFed V1.

    t:  server samples K clients                     -> θ_c down to each
        for each client m in turn:
            client: z_m with autograd                -> z_m, y_m up
            server: backprop on z_m alone, θ_s step  -> λ_m down
            client: backprop, one local SGD step     -> θ_m up
        server (FedAvg): θ_c ← 1/K Σ_m θ_m
"""

from __future__ import annotations

from hosfl.methods.base import NO_SEEDS
from hosfl.methods.sfl import SplitFedV1
from hosfl.protocol import Message, StepPlan


class SplitFedV2(SplitFedV1):
    name = "sfl-v2"

    def step(self, t: int, engine) -> tuple[float | None, Message | None]:
        clients, _ = self.plan(t)
        self.send_model(t, clients, engine)
        local, losses = {}, []
        for m in clients:
            lam, loss = self.train(engine.ask({m: StepPlan(t, NO_SEEDS)}), t)
            local.update(engine.ask(lam))
            if loss is not None:
                losses.append(loss)
        return (sum(losses) / len(losses) if losses else None), self.average(t, local)
