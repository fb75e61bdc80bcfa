"""ZO-SFL: zeroth-order on both sides. The client is HOSL's (probes through the true loss);
the server trains θ_s with its own seeded probes instead of backprop:

    server: w_q from its own seeds s'_q,
            v'_q = 1/K Σ_m ℓ(f_s(z_m; θ_s + μ w_q), y_m) − ℓ(f_s(z_m; θ_s), y_m)
            θ_s step along 1/(Pμ) Σ_q v'_q w_q
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hosfl import zo
from hosfl.config import Config
from hosfl.methods import hosfl, hosl
from hosfl.methods.base import Federation, Shard
from hosfl.methods.hosfl import Server
from hosfl.protocol import SmashedData

step = hosl.step


class ZOServer(Server):
    def __init__(self, model: nn.Module, cfg: Config, classes: int, z_shape: tuple) -> None:
        super().__init__(model, cfg, classes, z_shape)
        d_s = sum(p.numel() for p in zo.trainable(model))
        for group in self.optimizer.param_groups:  # a zeroth-order server: a client's rule
            group["lr"] = hosfl.zo_lr(cfg, d_s, cfg.server_lr)

    @torch.no_grad()
    def train(self, smashed: dict[int, SmashedData], t: int) -> tuple[dict, float | None]:
        smashed = self.admit(smashed, t, SmashedData)
        if not smashed:
            return {}, None
        rng = np.random.default_rng([self.cfg.seed, 3, t])
        seeds = rng.integers(0, 2**31, size=self.cfg.P).tolist()

        def loss() -> torch.Tensor:
            return sum(F.cross_entropy(self.model(s.z), s.y).double() for s in smashed.values())

        base = loss()
        values = []
        for s in seeds:
            with zo.perturbed(self.model, s, self.cfg.mu, self.cfg.directions):
                values.append(float((loss() - base) / len(smashed)))
        params = zo.trainable(self.model)
        zo.apply_update_(params, seeds, values, self.cfg.mu, self.optimizer, self.cfg.directions)
        return {}, float(base) / len(smashed)


def build(
    cfg: Config, client_model: nn.Module, server_model: nn.Module, shards: list[Shard], classes: int
) -> Federation:
    return hosfl.build(
        cfg,
        client_model,
        server_model,
        shards,
        classes,
        client_class=hosl.Client,
        server_class=ZOServer,
    )
