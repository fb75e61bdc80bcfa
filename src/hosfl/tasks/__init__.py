"""Tasks: a dataset, a model cut into a client part and a server part, and a metric.

``get(name)`` returns the task: a built-in or registered name, or an import path
``package.module:factory`` (a callable returning a Task, called once per process), which is
how the CLI, TOML configs and Ray workers on other machines build a user's own task.
``task.split_model(cut, seed)`` returns (client, server).
"""

from __future__ import annotations

import copy
import importlib

from torch import nn

from hosfl.tasks.base import ModelTask, Task
from hosfl.tasks.fmnist_cnn import FashionMnistCNN, FashionMnistCNNWide
from hosfl.tasks.language import RteOpt125m, SentimentMiniLM, Sst2Opt125m
from hosfl.tasks.vision import Cifar10ResNet18, FashionMnistEffNet

_REGISTRY: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Make ``task`` known by ``task.name`` in this process (``Config(task=name)``)."""
    if not isinstance(task, Task):
        raise TypeError(f"register_task takes a Task, not {type(task).__name__}")
    _REGISTRY[task.name] = task
    return task


def get(name: str) -> Task:
    if name not in _REGISTRY and ":" in name:
        _REGISTRY[name] = _from_path(name)
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown task {name!r} (valid: {', '.join(_REGISTRY)}, or package.module:factory)"
        )
    return _REGISTRY[name]


def _from_path(path: str) -> Task:
    module, _, attr = path.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"task={path!r}: cannot import it ({e})") from None
    task = factory() if callable(factory) and not isinstance(factory, Task) else factory
    if not isinstance(task, Task):
        raise ValueError(f"task={path!r} gave a {type(task).__name__}, not a hosfl Task")
    task.name = path  # what a run folder's config names, so resume and workers find it
    return task


def for_config(cfg) -> Task:
    """The task of ``cfg`` with the config's settings of the task applied (sequence length)."""
    task = get(cfg.task)
    if cfg.seq_len and hasattr(task, "seq_len"):
        task = copy.copy(task)
        task.seq_len = cfg.seq_len
    return task


def prepare(cfg) -> tuple[Task, nn.Module, nn.Module]:
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
BUILT_IN = tuple(_REGISTRY)

__all__ = ["ModelTask", "Task", "for_config", "get", "prepare", "register_task"]
