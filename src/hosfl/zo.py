"""Zeroth-order primitives: seeds -> directions, and the four verbs of a HO-SFL client.

    perturbed(model, seed, mu)      run the model at θ + μ·u(seed) without writing θ
    estimate(lam, z_perturbed, b)   v = λᵀ f(θ + μu) − b, with b = project(λ, f(θ)) = λᵀ f(θ)
    apply_update_(params, ...)      ĝ = 1/(Pμ) Σ_p v̄_p u_p, one optimizer step on θ
    replay_(params, history, ...)   apply_update_ for every (seeds, v̄) of a history

Directions are never stored: ``direction(seed, i, p, how)`` regenerates u for parameter i from
(seed, i) (and, for low-rank directions, the step: ``Directions``), so every machine gets the
same bits and no d_c-sized vector ever exists (the largest temporary is one parameter tensor).

Why perturbed() does not add μu to θ and subtract it again, as MeZO does: (θ + μu) − μu is not
θ in floating point, so every probe would leave rounding drift in θ that a client replaying the
(seeds, v̄) log never sees, and replay would stop being bit-exact. Instead each module's
parameters are swapped for θ + μu only while that module runs (a forward pre-hook) and swapped
back after it (a forward hook): θ is never written during a probe and the extra memory is the
parameters of one module.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

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
_C1, _C2 = np.uint32(0x7FEB352D), np.uint32(0x846CA68B)


def _counter_bits_np(key: int, start: int, stop: int) -> np.ndarray:
    """``_counter_bits`` on the CPU: the same function in numpy's uint32, whose multiply wraps
    mod 2³² as the hash wants (one operation where the int64 form needs five): ~12× faster,
    the same bits (tested)."""
    x = np.arange(start, stop, dtype=np.uint32)
    for k in (key & _M32, key >> 32 & _M32):
        x ^= np.uint32(k)
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


def _slices(n: int, step: int) -> Iterator[tuple[int, int]]:
    """(start, stop) ranges covering 0..n-1, ``step`` elements each (the last one shorter)."""
    for a in range(0, n, step):
        yield a, min(n, a + step)


def _hash_slices(n: int, device: torch.device) -> Iterator[tuple[int, int]]:
    """Element ranges for counter-hash work: the hash's int64 temporaries are 2-3× a float32
    tensor's size, so a large parameter is hashed a slice at a time (64 Ki elements on a CPU,
    where the slice stays in cache; 16 Mi on an accelerator, where launches cost more). Each
    element's bits depend only on its index, so the slicing never changes them."""
    return _slices(n, 1 << 16 if device.type == "cpu" else 1 << 24)


def rademacher(seed: int, index: int, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """±1 entries, element i = sign bit of hash(hash(i ⊕ k₁) ⊕ k₂), (k₁, k₂) from (seed, index).

    Integer ops only, computed where the parameter lives: every device (CPU, CUDA, another
    machine) gets the same bits, unlike torch's per-device generators."""
    key, n = _stream_seed(seed, index), math.prod(shape)
    out = torch.empty(n, dtype=torch.float32, device=device)
    for a, b in _hash_slices(n, out.device):
        if out.device.type == "cpu":  # numpy's uint32 hash, no int64 round trip
            sign = (_counter_bits_np(key, a, b) >> np.uint32(31)).astype(np.float32)
            out[a:b] = torch.from_numpy(1 - 2 * sign)
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


def direction(
    seed: int, index: int, like: torch.Tensor, kind: str | Directions = "gaussian"
) -> torch.Tensor:
    """u shaped like parameter number ``index``, regenerated from ``seed`` (``Directions``:
    how; a name is that kind at step 0)."""
    how = Directions(kind) if isinstance(kind, str) else kind
    if how.kind == "lowrank" and like.dim() >= 2:
        m = like.shape[0]
        n = like.numel() // m
        if how.rank < min(m, n):
            u = rademacher(seed, index, torch.Size((m, how.rank)), like.device)
            uv = u @ how.basis(index, n, like.device).T
            return uv.mul_(_f32(1 / math.sqrt(how.rank))).reshape(like.shape).to(like.dtype)
    if how.kind in EXACT_DIRECTIONS:
        return rademacher(seed, index, like.shape, like.device).to(like.dtype)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(_stream_seed(seed, index))
    u = torch.randn(like.shape, generator=gen, dtype=torch.float32)
    return u.to(device=like.device, dtype=like.dtype)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters a zeroth-order client perturbs and updates, in a fixed order."""
    return [p for p in model.parameters() if p.requires_grad]


@contextmanager
def perturbed(
    model: nn.Module, seed: int, mu: float, kind: str | Directions = "gaussian", bf16: bool = False
) -> Iterator[None]:
    """Within the block, ``model(x)`` computes f(x; θ + μ·u(seed)); θ itself is untouched.
    With ``bf16`` (a bfloat16 forward) θ + μu is stochastically rounded to bfloat16."""
    index = {id(p): i for i, p in enumerate(trainable(model))}
    handles, swaps = [], []
    for module in model.modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) in index]
        if not own:
            continue
        saved: dict[str, torch.Tensor] = {}
        swaps.append((own, saved))

        def swap_in(mod: nn.Module, args: object, own=own, saved=saved) -> None:
            for name, p in own:
                saved[name] = p.data
                # θ + μu built in u's own buffer: one parameter-sized temporary, not three
                w = direction(seed, index[id(p)], p, kind).mul_(mu).add_(p.data)
                p.data = round_bf16(w, seed, index[id(p)]) if bf16 else w

        def swap_back(mod: nn.Module, args: object, out: object, own=own, saved=saved) -> None:
            for name, p in own:
                p.data = saved.pop(name)

        handles.append(module.register_forward_pre_hook(swap_in))
        handles.append(module.register_forward_hook(swap_back))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for own, saved in swaps:  # a forward that raised never ran its swap back: θ again
            for name, p in own:
                if name in saved:
                    p.data = saved.pop(name)


def unperturbable(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The trainable parameters that reach f(x) but that ``perturbed`` cannot perturb: read
    outside their own module's forward (``F.linear(x, self.lin.weight)``, a ``ParameterDict``
    indexed in a parent's forward). A probe would see no change from them while the update
    still moved them: pure noise. One forward with autograd (which parameters f depends on)
    and one probe (which ones were swapped)."""
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    swapped: set[int] = set()
    hooks = [
        m.register_forward_pre_hook(
            lambda mod, args: swapped.update(id(p) for p in mod.parameters(recurse=False))
        )
        for m in model.modules()
    ]
    was = model.training
    model.eval()
    try:
        with torch.enable_grad():
            out = model(x)
            outs = [t.float().sum() for t in (out if isinstance(out, tuple | list) else [out])
                    if isinstance(t, torch.Tensor) and t.requires_grad]  # fmt: skip
            params = [p for p in model.parameters() if id(p) in names]
            grads = (torch.autograd.grad(outs, params, allow_unused=True) if outs
                     else [None] * len(params))  # fmt: skip
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return [names[id(p)] for p, g in zip(params, grads, strict=True)
            if g is not None and id(p) not in swapped]  # fmt: skip


def jvp(
    model: nn.Module, x: torch.Tensor, seed: int, mu: float, kind: str | Directions
) -> torch.Tensor:
    """μ·J_c u: the change of f(x; θ) along μ·u(seed), exact to float rounding, by one
    forward-mode pass (``torch.func.jvp``) instead of f(θ + μu) − f(θ). λᵀ of it is the probe
    scalar of ``estimator=jvp``: the same seeds, scalars, journal and update as finite
    differences, without their O(μ) bias or the rounding of a difference of two forwards
    (Baydin et al., "Gradients without backpropagation", 2022)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    primals = {n: p.detach() for n, p in named}
    tangents = {n: direction(seed, i, p, kind).mul_(mu) for i, (n, p) in enumerate(named)}

    def f(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(model, params, (x,), strict=False)

    # fused attention kernels have no forward-mode derivative: attention runs as plain math
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(f, (primals,), (tangents,))[1]


_DOT_SLICE = 1 << 17  # elements per float64 slice of λᵀz (1 MiB each)


def project(lam: torch.Tensor, z: torch.Tensor) -> float:
    """λᵀ z, accumulated in float64 (a product of two float32 numbers is exact there), one
    slice at a time: float64 copies of a whole cut-layer tensor would double the client's peak
    where z is large (an early cut of a vision model)."""
    lam, z = lam.reshape(-1), z.reshape(-1)
    total = sum(
        torch.dot(lam[a:b].double(), z[a:b].double()) for a, b in _slices(lam.numel(), _DOT_SLICE)
    )  # summed where the tensors are: one host synchronisation, the float below
    return float(total)


def distance(a: torch.Tensor, b: torch.Tensor | None = None) -> float:
    """‖a − b‖ (‖a‖ without b), in float64 one slice at a time, as ``project``."""
    a = a.reshape(-1)
    b = None if b is None else b.reshape(-1)
    total = sum(
        (a[i:j].double() - (0 if b is None else b[i:j].double())).square().sum()
        for i, j in _slices(a.numel(), _DOT_SLICE)
    )
    return math.sqrt(float(total))


def estimate(lam: torch.Tensor, z_perturbed: torch.Tensor, base: float) -> float:
    """The probe scalar v = λᵀ (f(θ + μu) − f(θ)) = λᵀ f(θ + μu) − ``base``, base = λᵀ f(θ).

    Taking λᵀ f(θ) once lets the client drop f(θ) before probing: during the probes it holds
    its inputs and λ, and nothing else beyond an inference forward."""
    return project(lam, z_perturbed) - base


EXACT_DIRECTIONS = ("rademacher", "lowrank")  # directions whose bits, and updates, match anywhere


def _f32(x: float) -> float:
    """``x`` rounded to the nearest float32, as a Python float: a scalar that a float32 kernel
    then reads exactly, whatever its own conversion of a double would be."""
    return float(np.float32(x))


class ExactOptimizer:
    """The client optimizer of a zeroth-order replica (SGD, SGD with momentum, Adam), written
    so that every IEEE-754 machine computes the same bits.

    Each tensor operation below rounds once and none can be fused with another: every kernel
    is a single add, multiply, divide or square root of float32 values (correctly rounded by
    IEEE-754, vectorised or not, on a CPU or a GPU), every scalar is rounded to float32 on the
    host first (so no kernel converts a double its own way), and an ``add`` only ever adds
    (alpha 1: a fused multiply-add by 1 is exact). torch.optim's kernels do not promise this:
    ``add_(x, alpha=-lr)``, ``addcmul_`` and ``lerp_`` are fused on some CPUs and not others.

        sgd       θ ← θ − lr·g                   (lr folded into g: see apply_update_)
        momentum  b ← β·b + g;  θ ← θ − lr·b      (b = g at the first step, as torch.optim)
        adam      m ← β₁·m + (1−β₁)·g;  v ← β₂·v + (1−β₂)·g·g
                  θ ← θ − (lr/(1−β₁ᵗ))·m / (√(v/(1−β₂ᵗ)) + ε)

    ``param_groups[0]["lr"]`` is the learning rate (read by the runner and the update check);
    ``state_dict()`` / ``load_state_dict()`` hold the step count and the buffers.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        kind: str,
        lr: float,
        momentum: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        if kind not in ("sgd", "adam"):
            raise ValueError(f"unknown optimizer {kind!r} (valid: sgd, adam)")
        if not (lr >= 0 and math.isfinite(lr)) or not 0 <= momentum < 1:
            raise ValueError(f"lr={lr!r}, momentum={momentum!r}: need lr >= 0, 0 <= momentum < 1")
        self.params, self.kind = list(params), kind
        self.param_groups = [{"lr": lr, "momentum": momentum, "betas": betas, "eps": eps}]
        self.t = 0
        self.buffers: dict[int, dict[str, torch.Tensor]] = {}

    @property
    def folds_lr(self) -> bool:
        """Plain SGD: the rate is folded into the update's coefficients."""
        return self.kind == "sgd" and not self.param_groups[0]["momentum"]

    def begin(self) -> None:
        self.t += 1

    @torch.no_grad()
    def update_(self, i: int, p: torch.Tensor, g: torch.Tensor) -> None:
        """One step of parameter ``i`` (``p``) along its estimate ``g`` (float32, p's shape)."""
        group = self.param_groups[0]
        lr = group["lr"]
        if self.folds_lr:
            p.add_(g)  # g is already −lr·ĝ: one rounding
            return
        state = self.buffers.setdefault(i, {})
        if self.kind == "sgd":
            if "momentum" not in state:
                state["momentum"] = g.clone()
            else:
                state["momentum"].mul_(_f32(group["momentum"])).add_(g)
            p.sub_(state["momentum"] * _f32(lr))
            return
        b1, b2 = group["betas"]
        if "m" not in state:
            state["m"], state["v"] = torch.zeros_like(p), torch.zeros_like(p)
        m, v = state["m"], state["v"]
        m.mul_(_f32(b1)).add_(g * _f32(1 - b1))
        v.mul_(_f32(b2)).add_((g * g).mul_(_f32(1 - b2)))
        denom = (v / _f32(1 - b2**self.t)).sqrt_().add_(_f32(group["eps"]))
        p.sub_((m * _f32(lr / (1 - b1**self.t))).div_(denom))

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "t": self.t,
            "group": dict(self.param_groups[0]),
            "buffers": {i: dict(b) for i, b in self.buffers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"optimizer state of a {state.get('kind')!r}, not {self.kind!r}")
        self.t = int(state["t"])
        group = dict(state["group"])
        group["betas"] = tuple(group["betas"])
        self.param_groups = [group]
        # a checkpoint is loaded on the CPU: each buffer goes where its parameter lives
        self.buffers = {int(i): {k: v.to(self.params[int(i)].device, copy=True)
                                 for k, v in b.items()}
                        for i, b in state["buffers"].items()}  # fmt: skip


def _plain_sgd_lrs(optimizer: torch.optim.Optimizer) -> dict[int, float] | None:
    """Learning rate per parameter when ``optimizer`` is stateless SGD, else None."""
    if type(optimizer) is not torch.optim.SGD:
        return None
    lrs = {}
    for group in optimizer.param_groups:
        if group["momentum"] or group["weight_decay"] or group["maximize"]:
            return None
        lrs.update({id(p): float(group["lr"]) for p in group["params"]})
    return lrs


def apply_update_(
    params: Sequence[torch.Tensor],
    seeds: Sequence[int],
    scalars: Sequence[float],
    mu: float,
    optimizer: ExactOptimizer | torch.optim.Optimizer,
    kind: str | Directions = "gaussian",
) -> None:
    """One optimizer step along ĝ = 1/(Pμ) Σ_p v̄_p u_p, built one parameter at a time.

    With an ``ExactOptimizer`` (a replica whose directions are exact, ``rademacher`` or
    ``lowrank``) the same bits on every IEEE-754 machine: the coefficients c_p = v̄_p/(Pμ),
    times −lr for plain SGD, are computed in float64 on the host and rounded once to float32;
    Σ_p c_p·u_p is accumulated in float64, where each product of a float32 c_p and a float32
    u_p (±1, or a low-rank entry) is exact (so a fused
    multiply-add gives what a multiply then an add gives) and each addition rounds once, in a
    fixed order; the sum is rounded once to float32, and the optimizer's own operations each
    round once (``ExactOptimizer``). The largest temporaries are one parameter's float64 sum and
    its direction: no d_c-sized vector exists.

    With a torch.optim optimizer (Gaussian directions, and ZO-SFL's server): stateless SGD
    updates each parameter as soon as its ĝ_i is built (θ_i −= lr·ĝ_i); other optimizers get ĝ
    as ``.grad``. Fast, and exact on one machine, but not across CPU kinds: torch fuses
    ``add_(x, alpha)`` on some and not on others."""
    if len(seeds) != len(scalars) or not seeds:
        raise ValueError(f"need as many seeds as scalars, got {len(seeds)} and {len(scalars)}")
    if isinstance(optimizer, ExactOptimizer):
        _exact_update_(params, seeds, scalars, mu, optimizer, kind)
        return
    coef = [float(v) / (len(seeds) * mu) for v in scalars]
    lrs = _plain_sgd_lrs(optimizer)
    with torch.no_grad():
        for i, p in enumerate(params):
            g = torch.zeros_like(p)
            for s, c in zip(seeds, coef, strict=True):
                g.add_(direction(s, i, p, kind), alpha=c)
            if lrs is not None:
                p.add_(g, alpha=-lrs[id(p)])
            else:
                p.grad = g
        if lrs is None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def _exact_update_(
    params, seeds, scalars, mu, optimizer: ExactOptimizer, kind: str | Directions
) -> None:
    scale = -optimizer.param_groups[0]["lr"] if optimizer.folds_lr else 1.0
    coef = [_f32(scale * float(v) / (len(seeds) * mu)) for v in scalars]
    optimizer.begin()
    for i, p in enumerate(params):
        acc = torch.zeros(p.shape, dtype=torch.float64, device=p.device)
        for s, c in zip(seeds, coef, strict=True):
            acc.add_(direction(s, i, p, kind).double(), alpha=c)
        g = acc.to(p.dtype)
        del acc
        optimizer.update_(i, p, g)


def replay_(
    params: Sequence[torch.Tensor],
    history: Iterable[tuple[Sequence[int], Sequence[float]]],
    mu: float,
    optimizer: ExactOptimizer | torch.optim.Optimizer,
    kind: str | Directions = "gaussian",
    start: int = 0,
) -> int:
    """Bring a client model forward through a (seeds, v̄) history whose first row is step
    ``start``; returns the steps applied."""
    n = 0
    for seeds, scalars in history:
        at = kind.at(start + n) if isinstance(kind, Directions) else kind
        apply_update_(params, seeds, scalars, mu, optimizer, at)
        n += 1
    return n
