"""What every task provides to the federation."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict

import torch
from torch import nn


class Task(ABC):
    name: str
    classes: int
    cuts: tuple[str, ...]  # valid cut points, earliest first

    @abstractmethod
    def load(self, split: str, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and integer labels of ``split`` ('train' or 'test')."""

    @abstractmethod
    def build(self, seed: int) -> nn.Sequential:
        """The whole model as a sequence of named stages, initialised from ``seed``."""

    def split_model(self, cut: str, seed: int) -> tuple[nn.Sequential, nn.Sequential]:
        """Client part = stages up to and including ``cut``; server part = the rest."""
        if cut not in self.cuts:
            raise ValueError(
                f"cut={cut!r} is not a cut point of {self.name} (valid: {', '.join(self.cuts)})"
            )
        stages = list(self.build(seed).named_children())
        at = [n for n, _ in stages].index(cut) + 1
        return nn.Sequential(OrderedDict(stages[:at])), nn.Sequential(OrderedDict(stages[at:]))
