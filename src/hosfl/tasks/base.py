"""What every task provides to the federation."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import nn

from hosfl.data.partition import split


class Task(ABC):
    name: str
    classes: int
    cuts: tuple[str, ...]  # valid cut points, earliest first ("encoder.2" names stage encoder_2)
    defaults: dict[str, Any] = {}  # config values of this task where the user sets none

    @abstractmethod
    def load(self, split: str, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and integer labels of ``split`` ('train' or 'test')."""

    @abstractmethod
    def build(self, seed: int) -> nn.Sequential:
        """The whole model as a sequence of named stages, initialised from ``seed``."""

    def sources(self, limit: int = 0) -> np.ndarray | None:
        """Where each training example comes from (partition=by-source), if the data says."""
        return None

    def partition(self, cfg: Any, labels: torch.Tensor) -> list[np.ndarray]:
        """The training indices of each of ``cfg.clients`` clients."""
        return split(
            cfg.partition,
            labels.numpy(),
            cfg.clients,
            cfg.seed,
            cfg.alpha,
            cfg.shards_per_client,
            self.sources(cfg.train_subset),
        )

    def split_model(self, cut: str, seed: int) -> tuple[nn.Sequential, nn.Sequential]:
        """Client part = stages up to and including ``cut``; server part = the rest."""
        if cut not in self.cuts:
            raise ValueError(
                f"cut={cut!r} is not a cut point of {self.name} (valid: {', '.join(self.cuts)})"
            )
        stages = list(self.build(seed).named_children())
        at = [n for n, _ in stages].index(cut.replace(".", "_")) + 1
        return nn.Sequential(OrderedDict(stages[:at])), nn.Sequential(OrderedDict(stages[at:]))


class MissingPackage(RuntimeError):
    """A task whose model or data needs a package that is not installed."""


def need(module: str, install: str) -> Any:
    """Import ``module`` or say which install command brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingPackage(f"this task needs {module!r}: {install}") from None
