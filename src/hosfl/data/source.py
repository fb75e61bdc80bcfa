"""Training and test data as the methods see it: a pair of tensors (inputs, targets) or any
map-style ``torch.utils.data.Dataset`` whose items are (input, target).

A tensor pair is indexed at once; a Dataset is read item by item and collated with torch's
``default_collate``, so nothing forces a dataset into memory: a client reads only its batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

Data = tuple[torch.Tensor, torch.Tensor] | Dataset


def check(data: object, what: str) -> Data:
    """``data`` if it is a tensor pair of equal length or a sized Dataset; else ValueError."""
    if isinstance(data, tuple):
        if len(data) != 2 or not all(isinstance(t, torch.Tensor) for t in data):
            raise ValueError(f"{what}: a tuple must be (inputs, targets) tensors")
        if len(data[0]) != len(data[1]):
            raise ValueError(f"{what}: {len(data[0])} inputs but {len(data[1])} targets")
        return data
    if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        raise ValueError(f"{what}: expected (inputs, targets) tensors or a map-style Dataset")
    if len(data) == 0:
        raise ValueError(f"{what}: the dataset is empty")
    return data


def size(data: Data) -> int:
    return len(data[0]) if isinstance(data, tuple) else len(data)


def take(data: Data, idx: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The (inputs, targets) batch of examples ``idx``, in that order."""
    if isinstance(data, tuple):
        pick = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        return data[0][pick], data[1][pick]
    x, y = default_collate([data[int(i)] for i in idx])[:2]
    return x, torch.as_tensor(y)


def targets(data: Data) -> torch.Tensor:
    """Every example's target (for partitioning): a Dataset's ``targets`` attribute where it
    has one, else read item by item once."""
    if isinstance(data, tuple):
        return data[1]
    if isinstance(getattr(data, "targets", None), torch.Tensor | list | np.ndarray):
        return torch.as_tensor(np.asarray(data.targets))
    return torch.stack([torch.as_tensor(data[i][1]) for i in range(len(data))])


def limit(data: Data, n: int) -> Data:
    """The first ``n`` examples (all if n is 0 or more than there are)."""
    if not n or n >= size(data):
        return data
    if isinstance(data, tuple):
        return data[0][:n], data[1][:n]
    return torch.utils.data.Subset(data, range(n))


def batches(data: Data, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The whole of ``data`` in order, ``batch`` examples at a time."""
    n = size(data)
    for start in range(0, n, batch):
        yield take(data, np.arange(start, min(start + batch, n)))
