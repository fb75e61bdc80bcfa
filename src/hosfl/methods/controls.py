"""Two controls of HO-SFL's zeroth-order step, applied by the server to v̄ before the journal
(so clients, the journal and replay see only their result): ``Bound`` (``zo_clip``) and
``Rate`` (``zo_lr_rule=output``)."""

from __future__ import annotations

import math
import statistics

import torch

from hosfl.methods.policy import Seen


class Bound(Seen):
    """``zo_clip``: the size of each step's zeroth-order update, ‖v̄‖ (the ZO gradient is
    ĝ = 1/(Pμ) Σ_p v̄_p u_p, so ‖ĝ‖ ≤ √(Pd)·‖v̄‖/(Pμ) whatever the directions), is capped at
    ``factor`` times the median of the last ``window`` steps' sizes, once ``warmup`` steps are
    seen. The server scales v̄ before it is journaled and broadcast, so the clients, the journal
    and replay see the capped values and nothing else changes. The probe scalars are
    heavy-tailed (a loss spike makes λ large): one step far in the tail moved θ_c enough to
    wreck a run; a cap relative to recent steps needs no per-task number. Like ZO-SGD with
    gradient clipping (MeZO's language-model setups clip ĝ at a fixed norm), but relative."""

    def __init__(self, factor: float, window: int = 64, warmup: int = 8) -> None:
        self.factor, self.window, self.warmup = factor, window, warmup
        self.seen: list[float] = []

    def cap(self) -> float:
        """The largest ‖v̄‖ the next step may have (inf: not yet, or off)."""
        if not self.factor or len(self.seen) < self.warmup:
            return math.inf
        return self.factor * float(torch.tensor(self.seen, dtype=torch.float64).median())

    def clip(self, values: torch.Tensor) -> torch.Tensor:
        norm, cap = float(values.double().norm()), self.cap()
        if norm > cap:
            values = (values.double() * (cap / norm)).float()
            norm = cap
        if norm > 0:  # a step with no admissible scalars says nothing of their size
            self.seen = (self.seen + [norm])[-self.window :]
        return values


class Rate(Seen):
    """``zo_lr_rule=output``: the client's SGD rate, set at run time from how far the probes
    move the cut layer, so that one step changes the cut layer's output by ``target`` of its
    size (the method passes zo_step·√(P/d_c)), with no per-task number.

    Linearly, J_c u_p ≈ (f(θ + μu_p) − f(θ))/μ, so the step Δθ = −(lr/(Pμ)) Σ_p v̄_p u_p moves
    the output by J_c Δθ ≈ −(lr/(Pμ²)) Σ_p v̄_p (f(θ + μu_p) − f(θ)); with nearly orthogonal
    probe changes, ‖J_c Δθ‖/‖f(θ)‖ ≈ (lr/(Pμ²))·√(Σ_p v̄_p² r_p²), r_p the size of probe p's
    change relative to ‖f(θ)‖ (each client reports its P sizes; the server takes the median
    over clients, so one client cannot set it). The rate giving ``target`` is kept for each of
    the first ``warmup`` steps; each step uses the median of those seen so far, at most
    ``base`` (the first-order rate), and from then on the median of all ``warmup``: SGD's step
    still shrinks with the gradient. The server scales v̄ by rate / ``base`` (the replicas'
    SGD rate) before the journal, so the clients, the journal and replay are unchanged.

    Why √(P/d_c) (benchmarks/step_size.py, docs/FINDINGS.md): the rates the cut sweeps found
    good move the output by 9.5 % a step on the CNN (d_c = 4 800), 1-4 % on EfficientNet's
    blocks.2 (15 792) and 0.08 % on MiniLM's encoder.5 (10.8 M), while 1 % wrecks MiniLM and
    1 % costs the CNN half its gain: no one fraction serves all, but ρ·√(d_c/P) is 2-3 at
    each of those good rates."""

    def __init__(self, target: float, base: float, mu: float, warmup: int = 20) -> None:
        self.target, self.base, self.mu, self.warmup = target, base, mu, warmup
        self.seen: list[float] = []

    def rate(self) -> float:
        """The rate of the next step (the cap until a step has been sized)."""
        if not self.seen:
            return self.base
        return min(self.base, statistics.median(self.seen))

    def scale(self, values: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """v̄ scaled so that the replicas' SGD step at ``base`` is the step at ``rate()``;
        ``sizes`` (P,) is the median size of each probe's change over the step's clients."""
        v, r = values.double(), sizes.double()
        moved = float((v * v * r * r).sum().sqrt())  # ‖output change‖ / ‖f(θ)‖ per unit rate·Pμ²
        if len(self.seen) < self.warmup and moved > 0:
            self.seen.append(self.target * len(v) * self.mu**2 / moved)
        if not self.base:
            return values
        return (v * (self.rate() / self.base)).float()
