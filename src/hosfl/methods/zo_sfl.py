"""ZO-SFL: zeroth-order on both sides. The client is HOSL's (probes through the true loss);
the server trains θ_s with its own seeded probes instead of backprop:

    server: w_q from its own seeds s'_q,
            v'_q = 1/K Σ_m ℓ(f_s(z_m; θ_s + μ w_q), y_m) − ℓ(f_s(z_m; θ_s), y_m)
            θ_s step along 1/(Pμ) Σ_q v'_q w_q

Every server forward runs in eval mode: the P+1 forwards must see one function, so
BatchNorm statistics do not move and dropout is off (as on a HO-SFL client).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from hosfl import devices, zo
from hosfl.config import Config
from hosfl.methods.hosl import HOSL
from hosfl.methods.replica import zo_lr
from hosfl.methods.split import ZO_SETTINGS
from hosfl.protocol import SmashedData


class ZOSFL(HOSL):
    name = "zo-sfl"
    # a zeroth-order server: its rate and optimizer, no average, schedule or autocast
    settings = ZO_SETTINGS | {"server_optimizer", "server_lr", "outlier_factor", "cut_dtype"}

    def __init__(self, cfg: Config, client_model: nn.Module, server_model: nn.Module, task):
        super().__init__(cfg, client_model, server_model, task)
        d_s = sum(p.numel() for p in zo.trainable(server_model))
        for group in self.optimizer.param_groups:  # a zeroth-order server: a client's rule
            group["lr"] = zo_lr(cfg, d_s, cfg.server_lr)

    @torch.no_grad()
    def train(self, smashed: dict[int, SmashedData], t: int) -> tuple[dict, float | None]:
        smashed = self.admit(smashed, t, SmashedData)
        if not smashed:
            return {}, None
        rng = np.random.default_rng([self.cfg.seed, 3, t])
        seeds = rng.integers(0, 2**31, size=self.cfg.P).tolist()
        self.model.eval()

        here = devices.of(self.model)
        batches = [(devices.to(s.z, here), devices.to(s.y, here)) for s in smashed.values()]

        def loss() -> torch.Tensor:
            return sum(self.task.loss(self.model(z), y).double() for z, y in batches)

        base = loss()
        values = []
        for s in seeds:
            with zo.perturbed(self.model, s, self.cfg.mu, self.cfg.directions):
                values.append(float((loss() - base) / len(smashed)))
        params = zo.trainable(self.model)
        zo.apply_update_(params, seeds, values, self.cfg.mu, self.optimizer, self.cfg.directions)
        return {}, float(base) / len(smashed)
