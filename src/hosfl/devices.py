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

import ctypes
import functools
import platform
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


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_MMAP_MAX = 32 << 20  # glibc's largest mmap threshold on a 64-bit machine


@functools.cache
def keep_freed_memory(limit: int = 256 << 20) -> bool:
    """Have glibc serve blocks up to 32 MiB from the heap and keep up to ``limit`` bytes of its
    freed top for the next allocations, instead of handing freed memory back to the OS (this
    process only; once; True where it took effect). glibc's own thresholds move with what the
    process happened to allocate and free before: in a fresh process a forward of the default
    task's CNN (B = 32) faults about 750 pages in again, zeroed, every time (none with this),
    and its time swings between 1.24 and 2.08 ms from one moment to the next (1.23-1.28 ms
    with this). A run of a bundled task was not faster for it (loading its data or weights
    frees a large block, which raises glibc's thresholds), but it no longer depends on that: a
    Ray client process, a small dataset, a benchmark's floor measured alone. Keeping the top
    alone is not enough: glibc then maps every block over 128 KiB afresh. The price is up to
    ``limit`` bytes of freed memory held by the process."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        # blocks up to 32 MiB from the heap, and the heap's free top kept up to ``limit``
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, limit)
        )
    except (OSError, AttributeError):
        return False


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


def generator(device: torch.device) -> torch.Generator:
    """torch's default generator on ``device``: what dropout and other random layers draw from."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index or 0]
    return torch.default_generator


@contextmanager
def seeded(device: torch.device, *key: int) -> Iterator[None]:
    """Within the block, torch's generator on ``device`` (what dropout and other random layers
    draw from) starts from a seed of ``key`` (the run's seed, a purpose, the client, the step):
    a forward's randomness is a function of where it is in the run, so two runs of one config
    and a resumed run draw the same masks. The generator's state outside is kept."""
    seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0])
    # what torch.random.fork_rng keeps (the CPU's state, and the device's), without its
    # per-call checks: a server step seeds once per client
    gens = list(dict.fromkeys([torch.default_generator, generator(device)]))
    kept = [g.get_state() for g in gens]
    gens[-1].manual_seed(seed >> 1)
    try:
        yield
    finally:
        for g, state in zip(gens, kept, strict=True):
            g.set_state(state)
