"""Zeroth-order primitives: seeds -> directions, and the four verbs of a HO-SFL client.

    perturbed(model, seed, mu)      run the model at θ + μ·u(seed) without writing θ
    estimate(lam, z_perturbed, b)   v = λᵀ f(θ + μu) − b, with b = project(λ, f(θ)) = λᵀ f(θ)
    apply_update_(params, ...)      ĝ = 1/(Pμ) Σ_p v̄_p u_p, one optimizer step on θ
    replay_(params, history, ...)   apply_update_ for every (seeds, v̄) of a history

Directions are never stored: ``direction(seed, i, p, how)`` (``directions.py``) regenerates u
for parameter i from (seed, i) (and, for low-rank directions, the step: ``Directions``), so
every machine gets the same bits and no d_c-sized vector ever exists (the largest temporary is
one parameter tensor). ``exact.py``'s ``ExactOptimizer`` applies updates with the same bits on
every machine.

Why perturbed() does not add μu to θ and subtract it again, as MeZO does: (θ + μu) − μu is not
θ in floating point, so every probe would leave rounding drift in θ that a client replaying the
(seeds, v̄) log never sees, and replay would stop being bit-exact. Instead each module's
parameters are swapped for θ + μu only while that module runs (a forward pre-hook) and swapped
back after it (a forward hook): θ is never written during a probe and the extra memory is the
parameters of one module. An in-process simulation's client, whose memory is no device's,
swaps every parameter at once (``at_once``): the same bits without a hook on each module's call.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from hosfl.directions import Directions, direction, f32, round_bf16, shifted, slices
from hosfl.exact import ExactOptimizer


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters a zeroth-order client perturbs and updates, in a fixed order."""
    return [p for p in model.parameters() if p.requires_grad]


class Layout:
    """A model's trainable parameters (``params``, in ``trainable`` order) and where they live,
    for ``perturbed``: each module that owns some, with each one's (name, parameter, index in
    ``params``). Walking the modules costs more than a small model's probe of the perturbation
    itself, so a replica, whose parameters are fixed, builds its layout once."""

    def __init__(self, model: nn.Module) -> None:
        self.params = trainable(model)
        index = {id(p): i for i, p in enumerate(self.params)}
        self.owners = [
            (module, own)
            for module in model.modules()
            if (own := [(n, p, index[id(p)]) for n, p in module.named_parameters(recurse=False)
                        if id(p) in index])  # fmt: skip
        ]


@contextmanager
def perturbed(
    model: nn.Module | Layout,
    seed: int,
    mu: float,
    kind: str | Directions = "gaussian",
    bf16: bool = False,
    at_once: bool = False,
) -> Iterator[None]:
    """Within the block, ``model(x)`` computes f(x; θ + μ·u(seed)); θ itself is untouched.
    With ``bf16`` (a bfloat16 forward) θ + μu is stochastically rounded to bfloat16. ``model``
    may be given as its ``Layout``. Each module's parameters are swapped only while it runs,
    or with ``at_once`` all of them for the whole block (a whole perturbed copy of θ alive)."""
    layout = model if isinstance(model, Layout) else Layout(model)
    how = Directions(kind) if isinstance(kind, str) else kind

    def moved(i: int, p: torch.Tensor) -> torch.Tensor:
        w = shifted(seed, i, p.data, how, mu)
        return round_bf16(w, seed, i) if bf16 else w

    if at_once:
        kept = [p.data for p in layout.params]
        try:
            for i, p in enumerate(layout.params):
                p.data = moved(i, p)
            yield
        finally:
            for p, data in zip(layout.params, kept, strict=True):
                p.data = data
        return
    handles, swaps = [], []
    for module, own in layout.owners:
        saved: dict[str, torch.Tensor] = {}
        swaps.append((own, saved))

        def swap_in(mod: nn.Module, args: object, own=own, saved=saved) -> None:
            for name, p, i in own:
                saved[name] = p.data
                p.data = moved(i, p)

        def swap_back(mod: nn.Module, args: object, out: object, own=own, saved=saved) -> None:
            for name, p, _ in own:
                p.data = saved.pop(name)

        handles.append(module.register_forward_pre_hook(swap_in))
        handles.append(module.register_forward_hook(swap_back))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for own, saved in swaps:  # a forward that raised never ran its swap back: θ again
            for name, p, _ in own:
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
    where z is large (an early cut of a vision model). A float64 ``lam`` is read as it is (the
    batched simulation converts each client's λ once for its P probes)."""
    lam, z = lam.reshape(-1), z.reshape(-1)
    if lam.numel() <= _DOT_SLICE:
        return float(torch.dot(lam.double(), z.double()))
    total = sum(
        torch.dot(lam[a:b].double(), z[a:b].double()) for a, b in slices(lam.numel(), _DOT_SLICE)
    )  # summed where the tensors are: one host synchronisation, the float below
    return float(total)


def distance(a: torch.Tensor, b: torch.Tensor | None = None) -> float:
    """‖a − b‖ (‖a‖ without b), in float64 one slice at a time, as ``project``."""
    a = a.reshape(-1)
    b = None if b is None else b.reshape(-1)
    total = sum(
        (a[i:j].double() - (0 if b is None else b[i:j].double())).square().sum()
        for i, j in slices(a.numel(), _DOT_SLICE)
    )
    return math.sqrt(float(total))


def estimate(lam: torch.Tensor, z_perturbed: torch.Tensor, base: float) -> float:
    """The probe scalar v = λᵀ (f(θ + μu) − f(θ)) = λᵀ f(θ + μu) − ``base``, base = λᵀ f(θ).

    Taking λᵀ f(θ) once lets the client drop f(θ) before probing: during the probes it holds
    its inputs and λ, and nothing else beyond an inference forward."""
    return project(lam, z_perturbed) - base


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
                g.add_(direction(s, i, p, kind, copy=False), alpha=c)
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
    coef = [f32(scale * float(v) / (len(seeds) * mu)) for v in scalars]
    optimizer.begin()
    for i, p in enumerate(params):
        acc = torch.zeros(p.shape, dtype=torch.float64, device=p.device)
        for s, c in zip(seeds, coef, strict=True):  # float32 u read in float64: c·u exact
            acc.add_(direction(s, i, p, kind, copy=False), alpha=c)
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
