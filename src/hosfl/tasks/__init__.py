"""Tasks: a dataset, a model cut into a client part and a server part, and a metric.

``get(name)`` returns the task; ``task.split_model(cut, seed)`` returns (client, server).
"""

from __future__ import annotations

import copy

from torch import nn

from hosfl.tasks.base import Task
from hosfl.tasks.fmnist_cnn import FashionMnistCNN, FashionMnistCNNWide
from hosfl.tasks.language import RteOpt125m, SentimentMiniLM, Sst2Opt125m
from hosfl.tasks.vision import Cifar10ResNet18, FashionMnistEffNet

_REGISTRY: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    _REGISTRY[task.name] = task
    return task


def get(name: str) -> Task:
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r} (valid: {', '.join(_REGISTRY)})")
    return _REGISTRY[name]


def for_config(cfg) -> Task:
    """The task of ``cfg`` with the config's settings of the task applied (sequence length)."""
    task = get(cfg.task)
    if cfg.seq_len and hasattr(task, "seq_len"):
        task = copy.copy(task)
        task.seq_len = cfg.seq_len
    return task


def prepare(cfg) -> tuple[Task, nn.Sequential, nn.Sequential]:
    """The task of ``cfg`` and its (client, server) parts, frozen and adapted as ``cfg`` says."""
    from hosfl import adapt

    task = for_config(cfg)
    client, server = task.split_model(cfg.cut, cfg.seed)
    for part in (client, server):
        adapt.freeze(part, cfg.freeze)
    if cfg.lora in ("client", "both"):
        client = adapt.lora(client, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.seed)
    if cfg.lora in ("server", "both"):
        server = adapt.lora(server, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.seed + 1)
    return task, client, server


for _task in (
    FashionMnistCNN(),
    FashionMnistCNNWide(),
    FashionMnistEffNet(),
    SentimentMiniLM(),
    Cifar10ResNet18(),
    Sst2Opt125m(),
    RteOpt125m(),
):
    register_task(_task)

__all__ = ["Task", "for_config", "get", "prepare", "register_task"]
