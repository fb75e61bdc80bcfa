"""What the methods share: client data access, the federation they build, optimizers."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from hosfl.config import Config
from hosfl.protocol import Message

NO_SEEDS = torch.empty(0, dtype=torch.int32)  # the StepPlan of a method that does not probe


def make_optimizer(
    name: str, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.0
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r} (valid: sgd, adam)")


class Shard:
    """One client's private data: indices into the shared training tensors.

    The batch of step t is drawn from ``default_rng([seed, 2, client, t])``: the same on every run
    and every machine, with no per-client generator state to keep."""

    def __init__(self, cid: int, x: torch.Tensor, y: torch.Tensor, idx: np.ndarray, seed: int):
        self.cid, self.x, self.y, self.idx, self.seed = cid, x, y, idx, seed

    def batch(self, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, 2, self.cid, step])
        pick = torch.from_numpy(rng.choice(self.idx, size=min(size, len(self.idx)), replace=False))
        return self.x[pick], self.y[pick]


class ClientRole(ABC):
    @abstractmethod
    def handle(self, msg: Message) -> Message | None:
        """Answer one message from the server (None for broadcasts)."""

    @property
    def state(self) -> object:
        """What a broadcast updates. In-process, clients that share it (one ``Replica`` for
        all) are updated by one delivery; the ledger still counts a copy per client."""
        return self


@dataclass
class Federation:
    """What a method's ``build`` returns: the server role, one role per client, the two parts
    of the model evaluated at the end (shared in memory in-process), and what one client holds
    in memory (the client part, or the whole model for the federated-learning baselines)."""

    server: object
    clients: list[ClientRole]
    client_model: nn.Module
    server_model: nn.Module
    client_optimizer: torch.optim.Optimizer | None  # None: clients keep no optimizer state
    client_holds: nn.Module | None = None  # None: client_model

    def __post_init__(self) -> None:
        if self.client_holds is None:
            self.client_holds = self.client_model


def sample_clients(cfg: Config, step: int) -> list[int]:
    """The K clients of ``step``, sorted; drawn from ``default_rng([seed, 0, step])``."""
    rng = np.random.default_rng([cfg.seed, 0, step])
    return sorted(rng.choice(cfg.clients, size=cfg.sampled, replace=False).tolist())


@torch.no_grad()
def load_flat_(params: Iterable[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy a flat weight vector into ``params`` in place. (torch's vector_to_parameters
    makes the parameters views of the vector instead, so a client training on them would
    write into the message it received.)"""
    offset = 0
    for p in params:
        p.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    if offset != flat.numel():
        raise ValueError(f"weight vector of {flat.numel()} values for {offset} parameters")
