"""A client's data and the clients of a step: ``Shard`` (one client's examples, its batch of
each step), ``sample_clients`` (the K of a step), and the batches of several clients as one
(batched simulation)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from hosfl import devices
from hosfl.config import Config
from hosfl.data import source

if TYPE_CHECKING:
    from hosfl.methods.base import ClientRole


def sample_clients(cfg: Config, step: int) -> list[int]:
    """The K clients of ``step``, sorted; drawn from ``default_rng([seed, 0, step])``."""
    rng = np.random.default_rng([cfg.seed, 0, step])
    return sorted(rng.choice(cfg.clients, size=cfg.sampled, replace=False).tolist())


class Shard:
    """One client's private data: indices into the training data (tensors or a Dataset).

    The batch of step t is drawn from ``default_rng([seed, 2, client, t])``: the same on every run
    and every machine, with no per-client generator state to keep."""

    def __init__(
        self,
        cid: int,
        data: source.Data,
        idx: np.ndarray,
        seed: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.cid, self.data, self.idx, self.seed = cid, data, idx, seed
        self.device = torch.device(device)  # where the client computes: batches go there

    def batch(self, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, 2, self.cid, step])
        x, y = source.take(self.data, rng.choice(self.idx, min(size, len(self.idx)), False))
        return devices.to(x, self.device), devices.to(y, self.device)


def concatenated(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]] | None:
    """The clients' batches as one (batched simulation) and each one's size; None where
    they cannot be one batch (examples of different shapes)."""
    if any(t.shape[1:] != tensors[0].shape[1:] for t in tensors):
        return None
    return torch.cat(tensors), [len(t) for t in tensors]


def forward_group(
    roles: list[ClientRole], step: int, forward
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None:
    """Each role's batch of ``step`` and its rows of one ``forward`` of the concatenated
    batches, as (x_m, y_m, z_m); None where the batches cannot be one."""
    batches = [r.shard.batch(step, r.cfg.batch_size) for r in roles]
    joined = concatenated([x for x, _ in batches])
    if joined is None:
        return None
    zs = forward(joined[0]).split(joined[1])
    return [(x, y, z) for (x, y), z in zip(batches, zs, strict=True)]
