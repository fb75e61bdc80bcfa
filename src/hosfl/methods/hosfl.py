"""HO-SFL, Algorithm 1 (Chen et al., arXiv 2603.14773): one step reads like the paper.

    t:  server samples K clients, draws P seeds s_1..s_P
        each client m: z_m = f_c(x_m; θ_c) (no autograd)                     -> z_m, y_m up
        server: backprop ℓ(f_s(z_m; θ_s), y_m); θ_s step; λ_m = ∂ℓ_m/∂z_m    -> λ_m down
        each client m: v_mp = λ_mᵀ (f_c(x_m; θ_c + μ u_p) − z_m), p = 1..P    -> P scalars up
        server: v̄_p = 1/K Σ_m v_mp                                           -> (seeds, v̄) down
        every client: θ_c ← optimizer step along ĝ = 1/(Pμ) Σ_p v̄_p u_p

The engine moves the messages; this file only computes.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch
from torch import nn

from hosfl import devices, zo
from hosfl.config import Config
from hosfl.methods.base import (
    ZO_SETTINGS,
    ClientRole,
    Diverged,
    Shard,
    SplitMethod,
    concatenated,
    digest,
    forward_group,
    make_optimizer,
)
from hosfl.protocol import (
    CatchUp,
    CutGradient,
    Message,
    ProbeReport,
    ProbeScalars,
    ProtocolError,
    ReplicaState,
    ScalarBroadcast,
    SmashedData,
    StepPlan,
    Synced,
)


def zo_lr(cfg: Config, d: int, first_order_lr: float) -> float:
    """The learning rate of a zeroth-order part of d parameters: ``first_order_lr``, or with
    ``zo_lr_rule=dimension`` zo_lr_scale·P/d, at most ``zo_lr_max`` (when set) and at most
    ``first_order_lr`` (never a larger step than first order's).

    The update moves each weight by lr·ĝ with E‖ĝ‖² ≈ (d/P)‖∇‖², so the harm it does grows as
    lr²·d/P where every weight matters alike (50·P/d_c is the rate tuned by hand for both
    Fashion-MNIST CNNs: 0.05 at d_c = 4 800, 0.03 at 10 600; P = 5). Where a few weights matter
    far more than the rest (a pretrained network's early depthwise convolutions behind
    BatchNorm) the harm is large even where d is small, and ``zo_lr_max`` caps the rate."""
    if cfg.zo_lr_rule == "dimension":
        rule = cfg.zo_lr_scale * cfg.P / max(d, 1)
        return min(first_order_lr, rule, cfg.zo_lr_max or math.inf)
    return first_order_lr


class Bound:
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

    def state_dict(self) -> dict[str, Any]:
        return {"seen": list(self.seen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = [float(v) for v in state["seen"]]


class Rate:
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

    def state_dict(self) -> dict[str, Any]:
        return {"seen": list(self.seen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = [float(v) for v in state["seen"]]


class Replica:
    """A client's copy of θ_c and its optimizer; applies broadcasts strictly in step order.

    In-process all M clients share one Replica (they hold the identical θ_c by construction),
    so applying a broadcast that was already applied is a no-op."""

    def __init__(self, model: nn.Module, cfg: Config) -> None:
        self.model = model.eval()  # BatchNorm statistics frozen, dropout off while probing
        self.params = zo.trainable(model)
        self.cfg = cfg
        lr = zo_lr(cfg, sum(p.numel() for p in self.params), cfg.client_lr)
        self.directions = zo.Directions.of(cfg)
        if cfg.directions in zo.EXACT_DIRECTIONS:  # the same bits on every machine
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


class Client(ReplicaClient):
    def __init__(self, shard: Shard, replica: Replica, cfg: Config) -> None:
        super().__init__(shard, replica, cfg)
        self._pending: tuple[int, torch.Tensor, torch.Tensor, list[int]] | None = None
        self.bf16 = cfg.client_dtype == "bfloat16"

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """f_c(x; θ), in bfloat16 autocast where asked; the smashed data leaves as float32."""
        # no cast cache: it would keep serving θ's bfloat16 copy to the perturbed forwards
        with torch.autocast(
            x.device.type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False
        ):
            return self.replica.model(x).float()

    def _probe(self, x: torch.Tensor, seed: int, step: int) -> torch.Tensor:
        """f(x; θ + μu) (finite differences), or μ·J_c u (``estimator=jvp``), u the
        direction of ``seed`` at ``step``."""
        cfg, how = self.cfg, self.replica.directions.at(step)
        if cfg.estimator == "jvp":
            return zo.jvp(self.replica.model, x, seed, cfg.mu, how)
        with zo.perturbed(self.replica.model, seed, cfg.mu, how, self.bf16):
            return self._forward(x)

    def _value(self, lam: torch.Tensor, probe: torch.Tensor, base: float) -> float:
        """The probe scalar v = λᵀ(f(θ + μu) − f(θ)), or λᵀ(μ·J_c u)."""
        if self.cfg.estimator == "jvp":
            return zo.project(lam, probe)
        return zo.estimate(lam, probe, base)

    def _size(self, probe: torch.Tensor, z: torch.Tensor, norm: float) -> float:
        """``zo_lr_rule=output``: r = ‖f(θ + μu) − f(θ)‖ / ‖f(θ)‖ (or ‖μ·J_c u‖ / ‖f(θ)‖);
        ``norm`` is ‖f(θ)‖, taken once a step."""
        if not norm:
            return 0.0
        if self.cfg.estimator == "jvp":
            return zo.distance(probe) / norm
        return zo.distance(probe, z) / norm

    def _reply(self, step: int, values: list[float], sizes: list[float]) -> ProbeScalars:
        v = torch.tensor(values, dtype=torch.float32)
        if self.cfg.zo_lr_rule != "output":
            return ProbeScalars(step, v)
        return ProbeReport(step, v, torch.tensor(sizes, dtype=torch.float32))

    @torch.no_grad()
    def handle(self, msg: Message) -> Message | None:
        if isinstance(msg, StepPlan):  # forward pass, smashed data up
            if self.replica.step != msg.step:
                raise ProtocolError(
                    f"client {self.shard.cid}: replica at step {self.replica.step}, "
                    f"asked for step {msg.step}"
                )
            x, y = self.shard.batch(msg.step, self.cfg.batch_size)
            z = self._forward(x)
            self._pending = (msg.step, x, z, msg.seeds.tolist())
            return SmashedData(msg.step, z, y)
        if isinstance(msg, CutGradient):  # P probes, P scalars up
            if self._pending is None or self._pending[0] != msg.step:
                raise ProtocolError(f"client {self.shard.cid}: λ for step {msg.step} unasked")
            step, x, z, seeds = self._pending
            self._pending = None
            lam = devices.to(msg.lam, z.device)
            base = zo.project(lam, z)
            sized = self.cfg.zo_lr_rule == "output"  # keeps f(θ) to size each probe's change
            norm = zo.distance(z) if sized else 0.0
            if not sized:
                del z  # f(θ) is not needed beyond λᵀ f(θ): probes run in inference memory
            values, sizes = [], []
            for seed in seeds:
                probe = self._probe(x, seed, step)
                values.append(self._value(lam, probe, base))
                if sized:
                    sizes.append(self._size(probe, z, norm))
                del probe
            return self._reply(step, values, sizes)
        if isinstance(msg, ScalarBroadcast):  # every client applies the same update
            self.replica.apply(msg)
            return None
        raise ProtocolError(f"client {self.shard.cid}: unexpected {type(msg).__name__}")

    @classmethod
    @torch.no_grad()
    def handle_group(cls, roles: list[Client], msgs: list[Message]) -> list[Message | None]:
        """The K clients of a step, which hold one θ_c, as one batch: their forwards are one
        forward of the concatenated batches, and probe p is one forward at θ_c + μu_p from
        which each client's v_mp = λ_mᵀ(f(x_m; θ + μu_p) − z_m) is read off its own rows.
        Each reply is the message that client sends alone (z_m, y_m; its P scalars), equal
        to float rounding: a batch of another size may take other kernel paths."""
        first = msgs[0]
        same = all(type(m) is type(first) and m.step == first.step for m in msgs)
        if not same or not isinstance(first, StepPlan | CutGradient):
            return super().handle_group(roles, msgs)
        if isinstance(first, StepPlan):
            return cls._forward_group(roles, msgs)
        return cls._probe_group(roles, msgs)

    @classmethod
    def _forward_group(cls, roles: list[Client], msgs: list[StepPlan]) -> list[Message | None]:
        step = msgs[0].step
        lead = roles[0]
        if lead.replica.step != step:
            return [lead.handle(msgs[0])]  # its error, as alone
        rows = forward_group(roles, step, lead._forward)
        if rows is None:
            return super().handle_group(roles, msgs)
        replies = []
        for role, msg, (xm, ym, zm) in zip(roles, msgs, rows, strict=True):
            role._pending = (step, xm, zm, msg.seeds.tolist())
            replies.append(SmashedData(step, zm, ym))
        return replies

    @classmethod
    def _probe_group(cls, roles: list[Client], msgs: list[CutGradient]) -> list[Message | None]:
        step = msgs[0].step
        pending = [r._pending for r in roles]
        if any(p is None or p[0] != step for p in pending) or any(
            p[3] != pending[0][3] for p in pending
        ):
            return super().handle_group(roles, msgs)  # each raises, or answers, as alone
        joined = concatenated([p[1] for p in pending])
        if joined is None:
            return super().handle_group(roles, msgs)
        x, sizes = joined
        seeds = pending[0][3]
        for role in roles:
            role._pending = None
        lead = roles[0]
        lams = [devices.to(m.lam, p[2].device) for m, p in zip(msgs, pending, strict=True)]
        bases = [zo.project(lam, p[2]) for lam, p in zip(lams, pending, strict=True)]
        # f(θ) is not needed beyond λᵀ f(θ), as alone, but to size each probe's change
        zs = [p[2] for p in pending] if lead.cfg.zo_lr_rule == "output" else []
        norms = [zo.distance(zm) for zm in zs]
        del pending
        values: list[list[float]] = [[] for _ in roles]
        moved: list[list[float]] = [[] for _ in roles]
        for seed in seeds:
            zp = lead._probe(x, seed, step).split(sizes)
            for m, (lam, base, zm) in enumerate(zip(lams, bases, zp, strict=True)):
                values[m].append(lead._value(lam, zm, base))
                if zs:
                    moved[m].append(lead._size(zm, zs[m], norms[m]))
        return [lead._reply(step, v, r) for v, r in zip(values, moved, strict=True)]


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


ABSURD = 100.0  # an update moving θ_c by more than this many times |θ_c| is never committed


class HOSFL(SplitMethod):
    """Algorithm 1: the server step above, clients that probe and never backpropagate."""

    name = "hosfl"
    seed_synced = True
    settings = SplitMethod.settings | ZO_SETTINGS | {
        "zo_rank", "zo_lazy", "estimator", "client_dtype", "zo_step", "zo_clip", "aggregate"}
    client_class: type[ReplicaClient] = Client

    def __init__(self, cfg: Config, client_model: nn.Module, server_model: nn.Module, task):
        super().__init__(cfg, client_model, server_model, task)
        # the server's record of θ_c; in-process every client role shares it
        self.replica = Replica(self.replicated(), cfg)
        self.client_holds = self.replica.model
        self.bound = Bound(cfg.zo_clip)
        base = self.replica.optimizer.param_groups[0]["lr"]
        target = cfg.zo_step * math.sqrt(cfg.P / max(self.replica.size, 1))
        self.rate = Rate(target, base, cfg.mu) if cfg.zo_lr_rule == "output" else None

    def replicated(self) -> nn.Module:
        """The model every client holds and moves by (seeds, v̄): the client part."""
        return self.client_model

    @property
    def client_lr(self) -> float:
        """The zeroth-order rate the clients step at (``zo_lr_rule=output``: so far)."""
        if self.rate is not None:
            return self.rate.rate()
        return self.replica.optimizer.param_groups[0]["lr"]

    def client(self, shard: Shard) -> ClientRole:
        if self.z_shape is None:
            self.expect_cut(shard)
            probed(self.replica.model, shard.batch(0, 1)[0], "client part")
        return self.client_class(shard, self.replica, self.cfg)

    def stateful(self) -> dict[str, Any]:
        # older checkpoints hold neither
        clip = {"zo_clip": self.bound} if self.cfg.zo_clip else {}
        rate = {"zo_rate": self.rate} if self.rate is not None else {}
        return {**super().stateful(), "replica": self.replica, **clip, **rate}

    @property
    def record(self) -> Replica:
        """The server's record of θ_c (in-process, the replica every client shares)."""
        return self.replica

    def commit(self, update: ScalarBroadcast, engine) -> None:
        """Send the step's update to the clients and apply it to the record (in-process the
        record is the clients' replica: the second application is a no-op)."""
        if not bool(torch.isfinite(update.values).all()):
            raise Diverged("the averaged probe scalars are not finite")
        moved, norm = self.movement(update), self.replica.norm()
        if not moved <= ABSURD * max(norm, 1.0):
            raise Diverged(
                f"the update of step {update.step} would move θ_c by about {moved:.3g} "
                f"(|θ_c| = {norm:.3g}); it was not committed"
            )
        engine.broadcast(update)
        self.replica.apply(update)

    def movement(self, update: ScalarBroadcast) -> float:
        """The expected size of the step's change to θ_c under SGD (with momentum, up to
        1/(1-β) of it): lr·‖ĝ‖, E‖ĝ‖² = d·Σ_p v̄_p² / (Pμ)² for Gaussian or ±1 directions.
        Adam moves each weight by about lr at most: its size is lr·√d."""
        d, lr = self.replica.size, self.replica.optimizer.param_groups[0]["lr"]
        opt = self.replica.optimizer
        if not isinstance(opt, torch.optim.SGD | zo.ExactOptimizer) or (
            isinstance(opt, zo.ExactOptimizer) and opt.kind != "sgd"
        ):
            return lr * math.sqrt(d)
        v = update.values.double()
        p = len(v)
        return (
            lr * math.sqrt(d * float((v * v).sum())) / (p * self.cfg.mu) / (1 - self.cfg.momentum)
        )

    def step(self, t: int, engine) -> tuple[float | None, Message]:
        clients, plan = self.plan(t)
        smashed = engine.ask({m: plan for m in clients})
        lams, loss = self.train(smashed, t)
        scalars = self.admit(engine.ask(lams), t, ProbeScalars)
        update = self.average(plan, scalars)
        values = self.bound.clip(update.values)
        if self.rate is not None and scalars:
            sizes = torch.stack([scalars[c].sizes for c in sorted(scalars)]).median(dim=0).values
            values = self.rate.scale(values, sizes)
        update = ScalarBroadcast(update.step, update.seeds, values)
        self.commit(update, engine)
        return loss, update
