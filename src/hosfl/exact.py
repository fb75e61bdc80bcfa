"""Optimizer steps with the same bits on every machine (``ExactOptimizer``): SGD, momentum
and Adam written as float32 element-wise operations with scalars rounded to float32 first, so
a replica on another kind of CPU or on a GPU applies an update exactly as the server does."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from hosfl.directions import f32


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
                state["momentum"].mul_(f32(group["momentum"])).add_(g)
            p.sub_(state["momentum"] * f32(lr))
            return
        b1, b2 = group["betas"]
        if "m" not in state:
            state["m"], state["v"] = torch.zeros_like(p), torch.zeros_like(p)
        m, v = state["m"], state["v"]
        m.mul_(f32(b1)).add_(g * f32(1 - b1))
        v.mul_(f32(b2)).add_((g * g).mul_(f32(1 - b2)))
        denom = (v / f32(1 - b2**self.t)).sqrt_().add_(f32(group["eps"]))
        p.sub_((m * f32(lr / (1 - b1**self.t))).div_(denom))

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
