"""A seed-synced client model: the ``Replica`` every client holds a copy of (θ_c and its
optimizer, moved only by (seeds, v̄) broadcasts, strictly in step order), the server's record
of it (``commit``: refuse a non-finite or absurd update, broadcast it, apply it), the client
role that keeps one, and the rate rule of a zeroth-order part (``zo_lr``). HO-SFL, HOSL,
ZO-SFL and ZO-FL each hold one: composed, not inherited."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from hosfl import directions as dirs
from hosfl import zo
from hosfl.config import Config
from hosfl.methods.base import ClientRole, Diverged, make_optimizer
from hosfl.methods.shard import Shard
from hosfl.methods.weights import digest
from hosfl.protocol import CatchUp, ProtocolError, ReplicaState, ScalarBroadcast, Synced, finite

ABSURD = 100.0  # an update moving θ_c by more than this many times |θ_c| is never committed


def zo_lr(cfg: Config, d: int, first_order_lr: float) -> float:
    """The learning rate of a zeroth-order part of d parameters: ``first_order_lr``, or with
    ``zo_lr_rule=dimension`` (and ``lesser``, which HO-SFL lowers further where its probes
    say so: ``controls.Rate``) zo_lr_scale·P/d, at most ``zo_lr_max`` (when set) and at most
    ``first_order_lr`` (never a larger step than first order's).

    The update moves each weight by lr·ĝ with E‖ĝ‖² ≈ (d/P)‖∇‖², so the harm it does grows as
    lr²·d/P where every weight matters alike (50·P/d_c is the rate tuned by hand for both
    Fashion-MNIST CNNs: 0.05 at d_c = 4 800, 0.03 at 10 600; P = 5). Where a few weights matter
    far more than the rest (a pretrained network's early depthwise convolutions behind
    BatchNorm) the harm is large even where d is small, and ``zo_lr_max`` caps the rate."""
    if cfg.zo_lr_rule in ("dimension", "lesser"):
        rule = cfg.zo_lr_scale * cfg.P / max(d, 1)
        return min(first_order_lr, rule, cfg.zo_lr_max or math.inf)
    return first_order_lr


# what only HO-SFL's client step has, that the other zeroth-order methods refuse (``refuses``)
HOSFL_ONLY = {"directions": ("lowrank",), "zo_lr_rule": ("output",)}


def probed(model: nn.Module, x: torch.Tensor, part: str) -> None:
    """Refuse, naming them, the parameters of ``model`` that zeroth-order probes cannot
    perturb (``zo.unperturbable``): their update would be noise."""
    bad = zo.unperturbable(model, x)
    if bad:
        raise ValueError(
            f"the {part}'s parameter(s) {', '.join(bad)} are read outside their own module's "
            "forward (F.linear(x, self.lin.weight), a ParameterDict...), where a probe cannot "
            "perturb them: call the module itself, or freeze them (freeze=NAME)"
        )


class Replica:
    """A client's copy of θ_c and its optimizer; applies broadcasts strictly in step order.

    In-process all M clients share one Replica (they hold the identical θ_c by construction),
    so applying a broadcast that was already applied is a no-op."""

    def __init__(self, model: nn.Module, cfg: Config) -> None:
        self.model = model.eval()  # BatchNorm statistics frozen, dropout off while probing
        self.layout = zo.Layout(model)  # θ_c's parameters and where the probes swap θ + μu in
        self.params = self.layout.params
        self.cfg = cfg
        lr = zo_lr(cfg, sum(p.numel() for p in self.params), cfg.client_lr)
        self.directions = dirs.Directions.of(cfg)
        if cfg.directions in dirs.EXACT_DIRECTIONS:  # the same bits on every machine
            self.optimizer = zo.ExactOptimizer(self.params, cfg.client_optimizer, lr, cfg.momentum)
        else:
            self.optimizer = make_optimizer(cfg.client_optimizer, self.params, lr, cfg.momentum)
        self.step = 0  # the next step this replica needs
        self.size = sum(p.numel() for p in self.params)

    def apply(self, msg: ScalarBroadcast) -> None:
        if msg.step < self.step:
            return
        if msg.step > self.step:
            raise ProtocolError(f"replica at step {self.step} got the update of step {msg.step}")
        zo.apply_update_(
            self.params,
            msg.seeds.tolist(),
            msg.values.tolist(),
            self.cfg.mu,
            self.optimizer,
            self.directions.at(msg.step),
        )
        self.step += 1

    def catch_up(self, msg: CatchUp) -> Synced:
        """Replay the missed (seeds, v̄) rows that this replica still needs."""
        if msg.seeds.shape != msg.values.shape or msg.seeds.shape[1:] != (self.cfg.P,):
            raise ProtocolError(f"catch-up rows of shape {tuple(msg.values.shape)}")
        if msg.step > self.step:
            raise ProtocolError(f"replica at step {self.step}, catch-up from step {msg.step}")
        for i in range(self.step - msg.step, len(msg.seeds)):
            self.apply(ScalarBroadcast(msg.step + i, msg.seeds[i], msg.values[i]))
        return self.synced()

    @torch.no_grad()
    def norm(self) -> float:
        return math.sqrt(sum(float(p.double().pow(2).sum()) for p in self.params))

    def synced(self) -> Synced:
        """Where this replica is: its next step and its digest."""
        return Synced(self.step, digest(self.params))

    def _buffers(self) -> list[tuple[int, str]]:
        """(parameter index, buffer name) of every optimizer buffer shaped like a parameter,
        in a fixed order; a buffer not yet created stands for zeros, which is how each of these
        optimizers starts."""
        opt = self.optimizer
        if isinstance(opt, zo.ExactOptimizer):
            names = {"sgd": ["momentum"] if opt.param_groups[0]["momentum"] else [],
                     "adam": ["m", "v"]}[opt.kind]  # fmt: skip
        elif isinstance(opt, torch.optim.Adam):
            names = ["exp_avg", "exp_avg_sq"]
        else:
            names = ["momentum_buffer"] if opt.param_groups[0]["momentum"] else []
        return [(i, n) for i in range(len(self.params)) for n in names]

    def _buffer(self, i: int, name: str) -> torch.Tensor | None:
        opt = self.optimizer
        if isinstance(opt, zo.ExactOptimizer):
            return opt.buffers.get(i, {}).get(name)
        return opt.state.get(self.params[i], {}).get(name)

    def _steps(self) -> int:
        """The optimizer's own step count (Adam's bias correction needs it)."""
        opt = self.optimizer
        if isinstance(opt, zo.ExactOptimizer):
            return opt.t
        state = opt.state.get(self.params[0], {})
        return int(state["step"]) if "step" in state else 0

    @torch.no_grad()
    def export(self) -> ReplicaState:
        """θ_c and the optimizer's state, flat: what a drifted client is sent."""
        weights = torch.cat([p.detach().reshape(-1) for p in self.params])
        buffers = [torch.tensor([float(self._steps())], device=weights.device)]
        for i, name in self._buffers():
            b = self._buffer(i, name)
            buffers.append((b if b is not None else torch.zeros_like(self.params[i])).reshape(-1))
        return ReplicaState(self.step, weights.float(), torch.cat(buffers).float())

    @torch.no_grad()
    def restore(self, msg: ReplicaState) -> Synced:
        """Take the server's record: θ_c and the optimizer state of step ``msg.step``."""
        sizes = [p.numel() for p in self.params]
        want = 1 + sum(sizes[i] for i, _ in self._buffers())
        if msg.weights.shape != (sum(sizes),) or msg.state.shape != (want,):
            raise ProtocolError(
                f"replica state of {msg.weights.numel()} weights and {msg.state.numel()} "
                f"optimizer values, expected {sum(sizes)} and {want}"
            )
        at = 0
        for p in self.params:
            p.copy_(msg.weights[at : at + p.numel()].view_as(p))
            at += p.numel()
        steps, at = int(msg.state[0]), 1
        opt = self.optimizer
        for i, name in self._buffers():
            p = self.params[i]
            value = msg.state[at : at + p.numel()].view_as(p).to(p.device, copy=True)
            at += p.numel()
            if isinstance(opt, zo.ExactOptimizer):
                opt.buffers.setdefault(i, {})[name] = value
            else:
                opt.state[p][name] = value
        if isinstance(opt, zo.ExactOptimizer):
            opt.t = steps
        elif isinstance(opt, torch.optim.Adam):
            for p in self.params:
                opt.state[p]["step"] = torch.tensor(float(steps))
        self.step = msg.step
        return self.synced()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])

    def commit(self, update: ScalarBroadcast, engine) -> None:
        """Send the step's update to the clients and apply it to the record (in-process the
        record is the clients' replica: the second application is a no-op)."""
        if not finite(update.values):
            raise Diverged("the averaged probe scalars are not finite")
        moved = self.movement(update)
        # |θ_c| (a pass over d_c weights) only where the bound may bite: max(|θ_c|, 1) ≥ 1
        if not moved <= ABSURD and not moved <= ABSURD * max(norm := self.norm(), 1.0):
            raise Diverged(
                f"the step's update would move θ_c by about {moved:.3g} "
                f"(|θ_c| = {norm:.3g}); it was not committed"
            )
        engine.broadcast(update)
        self.apply(update)

    def movement(self, update: ScalarBroadcast) -> float:
        """The expected size of the step's change to θ_c under SGD (with momentum, up to
        1/(1-β) of it): lr·‖ĝ‖, E‖ĝ‖² = d·Σ_p v̄_p² / (Pμ)² for Gaussian or ±1 directions.
        Adam moves each weight by about lr at most: its size is lr·√d."""
        d, lr = self.size, self.optimizer.param_groups[0]["lr"]
        opt = self.optimizer
        if not isinstance(opt, torch.optim.SGD | zo.ExactOptimizer) or (
            isinstance(opt, zo.ExactOptimizer) and opt.kind != "sgd"
        ):
            return lr * math.sqrt(d)
        v = update.values.double()
        p = len(v)
        return (
            lr * math.sqrt(d * float((v * v).sum())) / (p * self.cfg.mu) / (1 - self.cfg.momentum)
        )


class ReplicaClient(ClientRole):
    """A client whose model moves only by (seeds, v̄) updates of its Replica (HO-SFL, HOSL,
    ZO-SFL, ZO-FL): in-process, clients sharing the Replica are updated by one delivery."""

    def __init__(self, shard: Shard, replica: Replica, cfg: Config) -> None:
        self.shard, self.replica, self.cfg = shard, replica, cfg

    @property
    def state(self) -> object:
        return self.replica

    def synced(self) -> Synced:
        return self.replica.synced()

    def catch_up(self, msg: CatchUp) -> Synced:
        return self.replica.catch_up(msg)

    def restore(self, msg: ReplicaState) -> Synced:
        return self.replica.restore(msg)
