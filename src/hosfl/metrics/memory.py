"""Peak memory of a client's own work, not of the process.

On CPU, ``LiveTensorMeter`` is a ``TorchDispatchMode`` that sees every tensor created while it
is active and tracks the bytes of their storages until the last tensor on a storage dies
(``weakref.finalize``; PyTorch keeps a tensor's Python object alive while autograd still holds
it, so activations saved for backward stay counted). Views and in-place results that reuse a
storage the meter did not see allocated (parameters, inputs) are not counted again. The same
meter can be entered several times (a client's calls within one step): what is still alive from
an earlier call counts towards the peak of a later one. tracemalloc does not see tensor memory
and the process RSS mixes in everything else, hence this.

On CUDA, ``torch.cuda`` peak statistics around the same calls do the job.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorMeter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, list[int]] = {}  # storage address -> [tensors alive, bytes]
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self._live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key = _key(t)
            if key == 0 or (key in inputs and key not in self._live):
                continue  # empty, or a view / in-place result on memory allocated elsewhere
            if key in self._live:
                self._live[key][0] += 1
            else:
                nbytes = t.untyped_storage().nbytes()
                self._live[key] = [1, nbytes]
                self.current += nbytes
                self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._release, key)
        return out


def _key(t: torch.Tensor) -> int:
    """The address of ``t``'s storage; 0 for a wrapper that has none (forward-mode AD's dual
    tensors: their primal and tangent are real tensors, allocated by ops this mode sees)."""
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:
        return 0


class CudaPeakMeter:
    """The same role on a CUDA device, from ``torch.cuda``'s allocator statistics: the peak
    allocated bytes above what was allocated when the meter was first entered, over every
    entry. Whatever else runs on the device between entries (the server's part, in-process)
    counts if it is still allocated during one."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.base, self.peak = device, None, 0

    def __enter__(self) -> CudaPeakMeter:
        torch.cuda.synchronize(self.device)
        if self.base is None:
            self.base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        torch.cuda.synchronize(self.device)
        self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device) - self.base)


def meter(device: torch.device) -> LiveTensorMeter | CudaPeakMeter:
    """A peak-memory meter for work on ``device``."""
    return CudaPeakMeter(device) if device.type == "cuda" else LiveTensorMeter()


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers: what it holds before any work."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def process_peak_rss() -> int:
    """This process's peak resident memory in bytes (the whole process: Python, torch, data)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS: bytes; Linux: KiB
