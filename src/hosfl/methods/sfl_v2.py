"""SplitFed V2 (Thapa et al., AAAI 2022): the server trains on the sampled clients one after
another, taking a step on each; the clients' models are FedAvg-ed as in SplitFed V1.

    t:  server samples K clients; for each client m in turn:
            client: z_m with autograd                -> z_m, y_m up
            server: backprop on z_m alone, θ_s step  -> λ_m down
            client: backprop, one local SGD step     -> θ_m up
        server (FedAvg): θ_c ← 1/K Σ_m θ_m           -> θ_c down to all
"""

from __future__ import annotations

import torch

from hosfl.methods.base import NO_SEEDS
from hosfl.methods.hosfl import Server
from hosfl.methods.sfl import build
from hosfl.protocol import Message, ModelWeights, StepPlan

__all__ = ["build", "step"]


def step(t: int, server: Server, engine) -> tuple[float, Message]:
    clients, _ = server.plan(t)
    local, losses = {}, []
    for m in clients:
        smashed = engine.ask({m: StepPlan(t, NO_SEEDS)})
        lam, loss = server.train(smashed, t)
        local.update(engine.ask(lam))
        losses.append(loss)
    update = ModelWeights(t, torch.stack([local[c].weights for c in sorted(local)]).mean(0))
    engine.broadcast(update)
    return sum(losses) / len(losses), update
