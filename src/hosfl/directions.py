"""Seeds -> probe directions, the same bits on every machine: ``rademacher`` (±1 from a
counter hash, in integer arithmetic that CPUs and accelerators compute alike), ``gaussian``
(a CPU generator per (seed, parameter)), and ``lowrank`` (each matrix's U·Vᵀ/√r with ±1
factors, V kept for ``zo_lazy`` steps: ``Directions``); ``round_bf16`` (stochastic rounding
of a perturbed weight, seeded like its direction)."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch

EXACT_DIRECTIONS = ("rademacher", "lowrank")  # directions whose bits, and updates, match anywhere


_GOLDEN = 0x9E3779B97F4A7C15
_MASK63 = (1 << 63) - 1


def _stream_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed for (probe seed, parameter index); splitmix64 finaliser."""
    x = (seed * _GOLDEN + index + 1) & ((1 << 64) - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (x ^ (x >> 31)) & _MASK63


_M32 = 0xFFFFFFFF


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """(a · c) mod 2³² for int64 ``a`` in [0, 2³²): split so that no product passes 2⁴⁹."""
    return (((a >> 16) * (c & 0xFFFF)) << 16) + (a & 0xFFFF) * c & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (xorshift-multiply, "lowbias32" constants), in int64 ops."""
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x = _mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


_U16, _U15 = np.uint32(16), np.uint32(15)
_SIGN, _ONE = np.uint32(0x80000000), np.uint32(0x3F800000)  # float32's sign bit, and 1.0
_C1, _C2 = np.uint32(0x7FEB352D), np.uint32(0x846CA68B)


def _counter_bits_np(key: int, start: int, stop: int) -> np.ndarray:
    """``_counter_bits`` on the CPU: the same function in numpy's uint32, whose multiply wraps
    mod 2³² as the hash wants (one operation where the int64 form needs five): ~12× faster,
    the same bits (tested)."""
    x = np.arange(start, stop, dtype=np.uint32)
    return _mix_np(x, np.uint32(key & _M32), np.uint32(key >> 32 & _M32))


def _mix_np(x: np.ndarray, k1: np.uint32 | np.ndarray, k2: np.uint32 | np.ndarray) -> np.ndarray:
    """hash(hash(x ⊕ k₁) ⊕ k₂) in place, keys one for all or one per element."""
    for k in (k1, k2):
        x ^= k
        x ^= x >> _U16
        x *= _C1
        x ^= x >> _U15
        x *= _C2
        x ^= x >> _U16
    return x


def _counter_bits(key: int, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """32 random bits (int64) for element indices start..stop-1: hash(hash(i ⊕ k₁) ⊕ k₂),
    k = (k₂, k₁). Indices must be below 2³² (a parameter of fewer than 4 Gi elements)."""
    if stop > 1 << 32:
        raise ValueError(f"the counter hash covers 2**32 elements per parameter, not {stop}")
    if device.type == "cpu":
        return torch.from_numpy(_counter_bits_np(key, start, stop).astype(np.int64))
    return _counter_bits_torch(key, start, stop, device)


def _counter_bits_torch(key: int, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """The hash in torch's int64 ops, on any device (an accelerator's path)."""
    i = torch.arange(start, stop, dtype=torch.int64, device=device)
    return _hash32(_hash32(i ^ (key & _M32)) ^ (key >> 32 & _M32))


def slices(n: int, step: int) -> Iterator[tuple[int, int]]:
    """(start, stop) ranges covering 0..n-1, ``step`` elements each (the last one shorter)."""
    for a in range(0, n, step):
        yield a, min(n, a + step)


def _hash_slices(n: int, device: torch.device) -> Iterator[tuple[int, int]]:
    """Element ranges for counter-hash work: the hash's int64 temporaries are 2-3× a float32
    tensor's size, so a large parameter is hashed a slice at a time (64 Ki elements on a CPU,
    where the slice stays in cache; 16 Mi on an accelerator, where launches cost more). Each
    element's bits depend only on its index, so the slicing never changes them."""
    return slices(n, 1 << 16 if device.type == "cpu" else 1 << 24)


def rademacher(seed: int, index: int, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """±1 entries, element i = sign bit of hash(hash(i ⊕ k₁) ⊕ k₂), (k₁, k₂) from (seed, index).

    Integer ops only, computed where the parameter lives: every device (CPU, CUDA, another
    machine) gets the same bits, unlike torch's per-device generators."""
    key, n = _stream_seed(seed, index), math.prod(shape)
    out = torch.empty(n, dtype=torch.float32, device=device)
    for a, b in _hash_slices(n, out.device):
        if out.device.type == "cpu":  # numpy's uint32 hash; the sign bit onto 1.0's bits
            bits = _counter_bits_np(key, a, b) & _SIGN | _ONE
            out[a:b] = torch.from_numpy(bits.view(np.float32))
        else:
            out[a:b] = 1 - 2 * (_counter_bits(key, a, b, out.device) >> 31)
    return out.reshape(shape)


def round_bf16(w: torch.Tensor, seed: int, index: int) -> torch.Tensor:
    """``w`` (float32) stochastically rounded to a bfloat16 value, held in float32: up or down
    to a neighbour with probability in proportion to the distance, so E[round(w)] = w.

    A perturbation μu far below bfloat16's resolution (2⁻⁸ relative) would vanish under
    round-to-nearest, and the zeroth-order estimate with it (biased toward 0 on large weights);
    stochastically rounded, θ + μu stays unbiased and its bfloat16 cast is exact. The random
    bits come from the counter hash keyed by (probe seed, parameter index): replicas round
    alike."""
    key = _stream_seed(seed, index + (1 << 32))  # a stream apart from the directions'
    flat = w.reshape(-1)
    out = torch.empty_like(flat)
    for a, b in _hash_slices(flat.numel(), w.device):
        noise = _counter_bits(key, a, b, w.device) & 0xFFFF
        bits = flat[a:b].view(torch.int32).to(torch.int64) & _M32
        bits = (bits + noise) & 0xFFFF0000  # on the magnitude: away from zero w.p. the remainder
        bits = torch.where(bits >= 1 << 31, bits - (1 << 32), bits)
        out[a:b] = bits.to(torch.int32).view(torch.float32)
    return out.reshape(w.shape)


@dataclass(frozen=True)
class Directions:
    """How a probe's direction u is drawn, and at which step (``lowrank`` needs the step).

    ``gaussian``: N(0, I) from a CPU generator; ``rademacher``: ±1 from a counter hash on the
    parameter's own device; ``lowrank``: each matrix's u is U·Vᵀ/√r (a weight of shape
    (m, ...) read as an m × n matrix, n the product of the other sizes), U (m × r) drawn
    afresh for every probe and V (n × r) kept for ``lazy`` steps, both ±1 from the counter
    hash (Chen et al., "Enhancing zeroth-order fine-tuning for language models with low-rank
    structures" (LoZO), ICLR 2025: low-rank directions, V lazily resampled). Vectors, and
    matrices with r ≥ min(m, n), get ±1 entries. Each entry of U·Vᵀ is a sum of r products
    of ±1, an integer exact in float32 whatever the order of the sum, times the float32 1/√r:
    the same bits on every machine, and E[u_i²] = 1 as for ±1. Over one basis
    E[u uᵀ] = I ⊗ VVᵀ/r (the step stays in the rows' r-dimensional span of V); over the
    bases, E[u uᵀ] = I. ``salt`` (the run's seed) makes each run draw its own bases."""

    kind: str = "gaussian"
    rank: int = 0
    lazy: int = 1
    salt: int = 0
    step: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("gaussian", "rademacher", "lowrank"):
            raise ValueError(f"unknown directions {self.kind!r} (gaussian, rademacher, lowrank)")
        if self.kind == "lowrank" and not (self.rank >= 1 and self.lazy >= 1):
            raise ValueError(f"lowrank directions need rank >= 1 and lazy >= 1, got {self}")

    @classmethod
    def of(cls, cfg) -> Directions:
        """The directions a config asks for (at step 0)."""
        return cls(cfg.directions, cfg.zo_rank, cfg.zo_lazy, cfg.seed)

    def at(self, step: int) -> Directions:
        return replace(self, step=step)

    def basis(self, index: int, n: int, device: torch.device) -> torch.Tensor:
        """V (n × r) of parameter ``index`` for this step's window of ``lazy`` steps."""
        window = _stream_seed(self.salt, self.step // self.lazy)
        return rademacher(window, index + (2 << 32), torch.Size((n, self.rank)), device)


class Memo:
    """The directions of one step, made once for the in-process clients that share a replica
    (each of the K sampled clients probes along the same P directions, and the update steps
    along them again). Only the in-process engine opens one (``remembering``), and not on the
    memory-metered step: a device's client regenerates each direction where it needs it, and
    holds no more than one. A direction is a function of its key, so what is kept is what would
    be made again: the same bits."""

    def __init__(self, limit_bytes: int = 1 << 29) -> None:
        self.limit, self.step = limit_bytes, -1
        self.kept: dict[tuple, torch.Tensor] = {}
        self.bytes = 0

    def get(
        self, key: tuple, step: int, make: Callable[[], torch.Tensor], copy: bool = True
    ) -> torch.Tensor:
        """The tensor of ``key`` (made by ``make`` on the first call of ``step``); a copy, or
        with ``copy=False`` the kept tensor itself, which the caller must not write."""
        if step != self.step:  # another step: its directions are others
            self.kept.clear()
            self.step, self.bytes = step, 0
        u = self.kept.get(key)
        if u is None:
            u = make()
            if self.bytes + u.nbytes <= self.limit:
                self.kept[key] = u
                self.bytes += u.nbytes
        return u.clone() if copy else u


_open = threading.local()


@contextmanager
def remembering(memo: Memo) -> Iterator[None]:
    """Within the block (on this thread), ``direction`` reads and fills ``memo``."""
    before = getattr(_open, "memo", None)
    _open.memo = memo
    try:
        yield
    finally:
        _open.memo = before


def simulated() -> bool:
    """Whether a ``Memo`` is open on this thread: an in-process simulation's client, not a
    device's and not the memory-metered step, so it may hold a step's directions, or a whole
    perturbed copy of θ, at once."""
    return getattr(_open, "memo", None) is not None


_TOGETHER = 1 << 16  # parameters up to this size are hashed together by ``prefill``


def prefill(seeds: Sequence[int], params: Sequence[torch.Tensor], how: Directions) -> None:
    """Into the open ``Memo``: the ±1 direction of every small float32 CPU parameter for every
    seed of a step, hashed in one numpy pass (each element keyed by its own (seed, index))
    instead of one pass per parameter and seed: the bits ``direction`` would make, in fewer
    calls (a small model's probes spent more on the calls than on the hashing). Nothing
    without an open memo (a device's client makes each direction where it needs it), for
    other directions, or for other parameters (made as before)."""
    memo = getattr(_open, "memo", None)
    if memo is None or how.kind != "rademacher":
        return
    cpu32 = (torch.device("cpu"), torch.float32)
    small = [(i, p) for i, p in enumerate(params)
             if (p.device, p.dtype) == cpu32 and p.numel() <= _TOGETHER]  # fmt: skip
    todo = [(s, i, p) for s in seeds for i, p in small]
    keys = [(how, s, i, p.shape, p.dtype, p.device) for s, i, p in todo]
    if not todo or (memo.step == how.step and all(k in memo.kept for k in keys)):
        return
    sizes = np.array([p.numel() for _, _, p in todo], dtype=np.int64)
    starts = np.cumsum(sizes) - sizes
    streams = [_stream_seed(s, i) for s, i, _ in todo]
    k1 = np.repeat(np.array([k & _M32 for k in streams], dtype=np.uint32), sizes)
    k2 = np.repeat(np.array([k >> 32 & _M32 for k in streams], dtype=np.uint32), sizes)
    x = np.arange(int(sizes.sum()), dtype=np.uint32) - np.repeat(starts.astype(np.uint32), sizes)
    flat = torch.from_numpy((_mix_np(x, k1, k2) & _SIGN | _ONE).view(np.float32))
    for key, (_, _, p), a, n in zip(keys, todo, starts.tolist(), sizes.tolist(), strict=True):
        memo.get(key, how.step, lambda a=a, n=n, p=p: flat[a : a + n].view(p.shape), copy=False)


def direction(
    seed: int,
    index: int,
    like: torch.Tensor,
    kind: str | Directions = "gaussian",
    copy: bool = True,
) -> torch.Tensor:
    """u shaped like parameter number ``index``, regenerated from ``seed`` (``Directions``:
    how; a name is that kind at step 0); from the open ``Memo``, if any (with ``copy=False``
    the memo's own tensor, which the caller only reads)."""
    how = Directions(kind) if isinstance(kind, str) else kind
    memo = getattr(_open, "memo", None)
    if memo is None:
        return _made(seed, index, like, how)
    key = (how, seed, index, like.shape, like.dtype, like.device)
    return memo.get(key, how.step, lambda: _made(seed, index, like, how), copy)


def shifted(
    seed: int, index: int, like: torch.Tensor, how: Directions, mu: float
) -> torch.Tensor:
    """θ + μu for the parameter ``like`` (θ) as a new tensor: μu built in u's own buffer (one
    parameter-sized temporary), or from the open ``Memo``, where the K clients of a step share
    each μu (the same bits: u·μ then + θ, and a sum does not depend on its order)."""
    memo = getattr(_open, "memo", None)
    if memo is None:
        return direction(seed, index, like, how).mul_(mu).add_(like)
    key = ("μu", mu, how, seed, index, like.shape, like.dtype, like.device)
    mu_u = memo.get(
        key, how.step, lambda: direction(seed, index, like, how, copy=False).mul(mu), copy=False
    )  # u itself from the memo: the update steps along the same u
    return torch.add(like, mu_u)


def _made(seed: int, index: int, like: torch.Tensor, how: Directions) -> torch.Tensor:
    if how.kind == "lowrank" and like.dim() >= 2:
        m = like.shape[0]
        n = like.numel() // m
        if how.rank < min(m, n):
            u = rademacher(seed, index, torch.Size((m, how.rank)), like.device)
            uv = u @ how.basis(index, n, like.device).T
            return uv.mul_(f32(1 / math.sqrt(how.rank))).reshape(like.shape).to(like.dtype)
    if how.kind in EXACT_DIRECTIONS:
        return rademacher(seed, index, like.shape, like.device).to(like.dtype)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(_stream_seed(seed, index))
    u = torch.randn(like.shape, generator=gen, dtype=torch.float32)
    return u.to(device=like.device, dtype=like.dtype)


def f32(x: float) -> float:
    """``x`` rounded to the nearest float32, as a Python float: a scalar that a float32 kernel
    then reads exactly, whatever its own conversion of a double would be."""
    return float(np.float32(x))
