"""Where a run's tensors live.

``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) places the whole of an in-process run;
``client_device`` and ``server_device`` (empty: ``device``) place the two parts apart (under
``engine=ray``: the client processes, and the driver's server part with its record of θ_c).
Models are moved once when a run is built; a message carries its tensors wherever they were
made, and the receiving side moves what it reads to its own device (``to``): in-process that
is a no-op when both parts share a device, and no message ever needs a host copy but the
scalars the protocol sends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn


def resolve(name: str) -> torch.device:
    """The torch device ``name`` stands for on this machine; ValueError if it has none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"{name!r}: hosfl runs on cpu or cuda devices")
    if not torch.cuda.is_available():
        raise ValueError(f"{name!r}: this PyTorch sees no CUDA device (torch.cuda.is_available())")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{name!r}: there are {torch.cuda.device_count()} CUDA devices here")
    return device


def of(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (the CPU for an empty module)."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; a copy from the CPU is staged in pinned memory so that it does not
    hold up the host (the GPU waits for it, not the Python code that queued it)."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@contextmanager
def seeded(device: torch.device, *key: int) -> Iterator[None]:
    """Within the block, torch's generator on ``device`` (what dropout and other random layers
    draw from) starts from a seed of ``key`` (the run's seed, a purpose, the client, the step):
    a forward's randomness is a function of where it is in the run, so two runs of one config
    and a resumed run draw the same masks. The generator's state outside is kept."""
    seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0])
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        gen = torch.cuda.default_generators[cuda[0]] if cuda else torch.default_generator
        gen.manual_seed(seed >> 1)
        yield
