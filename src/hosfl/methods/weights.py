"""Model state as it travels or is compared: digests of a replica, and the flat weight (and
BatchNorm statistics) vectors that first-order clients and the server exchange."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import nn

from hosfl import zo


def digest(params: list[torch.Tensor]) -> int:
    """A 63-bit hash of the parameters' bytes: replicas agree bit for bit iff (almost surely)
    their digests agree."""
    h = hashlib.blake2b(digest_size=8)
    for p in params:
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def _moved(name: str, b: torch.Tensor | None) -> bool:
    return b is not None and (b.is_floating_point() or name == "num_batches_tracked")


def shared_state(model: nn.Module) -> list[torch.Tensor]:
    """What a first-order client and the server exchange: the trainable parameters, then the
    buffers that training moves (BatchNorm's running statistics and counts), which the server
    averages like the weights (FedAvg of the whole state)."""
    return zo.trainable(model) + [
        b for m in model.modules() for n, b in m._buffers.items() if _moved(n, b)
    ]


@torch.no_grad()
def rebind_buffers_(model: nn.Module, flat: torch.Tensor) -> None:
    """The moved buffers of ``shared_state`` set from ``flat``, as new tensors: a backward
    still to come keeps the ones its forward read (BatchNorm saves them)."""
    at = 0
    for m in model.modules():
        for n, b in list(m._buffers.items()):
            if _moved(n, b):
                m._buffers[n] = flat[at : at + b.numel()].view(b.shape).to(b, copy=True)
                at += b.numel()


@torch.no_grad()
def flatten(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """The tensors as one float32 vector (integer counts are exact in it up to 2²⁴)."""
    flat = [t.detach().reshape(-1).float() for t in tensors]
    return torch.cat(flat) if flat else torch.empty(0)


@torch.no_grad()
def load_flat_(params: Iterable[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy a flat weight vector into ``params`` in place. (torch's vector_to_parameters
    makes the parameters views of the vector instead, so a client training on them would
    write into the message it received.)"""
    offset = 0
    for p in params:
        p.copy_(flat[offset : offset + p.numel()].view(p.shape))
        offset += p.numel()
    if offset != flat.numel():
        raise ValueError(f"weight vector of {flat.numel()} values for {offset} parameters")
