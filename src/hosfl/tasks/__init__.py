"""Tasks: a dataset, a model cut into a client part and a server part, and a metric.

``get(name)`` returns the task; ``task.split_model(cut, seed)`` returns (client, server).
"""

from __future__ import annotations

from hosfl.tasks.base import Task
from hosfl.tasks.fmnist_cnn import FashionMnistCNN, FashionMnistCNNWide

_REGISTRY: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    _REGISTRY[task.name] = task
    return task


def get(name: str) -> Task:
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r} (valid: {', '.join(_REGISTRY)})")
    return _REGISTRY[name]


register_task(FashionMnistCNN())
register_task(FashionMnistCNNWide())

__all__ = ["Task", "get", "register_task"]
