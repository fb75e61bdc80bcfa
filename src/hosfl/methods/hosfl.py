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
from typing import Any

import torch
from torch import nn

from hosfl import devices, directions, zo
from hosfl.config import SIZED_RULES, Config
from hosfl.methods.base import ClientRole
from hosfl.methods.batched import BatchedProbes
from hosfl.methods.controls import Bound, Rate
from hosfl.methods.replica import Replica, ReplicaClient
from hosfl.methods.shard import Shard
from hosfl.methods.split import ZO_SETTINGS, SplitMethod
from hosfl.protocol import (
    CutGradient,
    Message,
    ProbeReport,
    ProbeScalars,
    ProtocolError,
    ScalarBroadcast,
    SmashedData,
    StepPlan,
)

# the examples of a client's batch whose cut-layer change sizes each probe (``Rate``)
SIZE_ROWS = 2


class Client(BatchedProbes, ReplicaClient):
    def __init__(self, shard: Shard, replica: Replica, cfg: Config) -> None:
        super().__init__(shard, replica, cfg)
        self._pending: tuple[int, torch.Tensor, torch.Tensor, list[int]] | None = None
        self.bf16 = cfg.client_dtype == "bfloat16"
        self.sized = cfg.zo_lr_rule in SIZED_RULES  # reports how far each probe moved f(θ)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """f_c(x; θ), in bfloat16 autocast where asked; the smashed data leaves as float32."""
        # no cast cache: it would keep serving θ's bfloat16 copy to the perturbed forwards
        with torch.autocast(
            x.device.type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False
        ):
            return self.replica.model(x).float()

    def _probe(self, x: torch.Tensor, seed: int, step: int) -> torch.Tensor:
        """f(x; θ + μu) (finite differences), or μ·J_c u (``estimator=jvp``), u the
        direction of ``seed`` at ``step``; in simulation θ + μu is swapped in whole, on a
        device one module's parameters at a time (the same bits)."""
        cfg, how = self.cfg, self.replica.directions.at(step)
        if cfg.estimator == "jvp":
            return zo.jvp(self.replica.model, x, seed, cfg.mu, how)
        whole = directions.simulated()
        with zo.perturbed(self.replica.layout, seed, cfg.mu, how, self.bf16, whole):
            return self._forward(x)

    def _value(self, lam: torch.Tensor, probe: torch.Tensor, base: float) -> float:
        """The probe scalar v = λᵀ(f(θ + μu) − f(θ)), or λᵀ(μ·J_c u)."""
        if self.cfg.estimator == "jvp":
            return zo.project(lam, probe)
        return zo.estimate(lam, probe, base)

    @staticmethod
    def _sizing(z: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``zo_lr_rule=output``, ``lesser``: f(θ) of the batch's first ``SIZE_ROWS`` examples
        and its norm, kept through the probes to size their change (all of f(θ) would cost a
        client a second cut-layer output: 1.5× inference at EfficientNet's stem)."""
        kept = z[:SIZE_ROWS].clone()
        return kept, zo.distance(kept)

    def _size(self, probe: torch.Tensor, kept: torch.Tensor, norm: float) -> float:
        """r = ‖f(θ + μu) − f(θ)‖ / ‖f(θ)‖ (or ‖μ·J_c u‖ / ‖f(θ)‖) over the rows ``kept``;
        ``norm`` is their ‖f(θ)‖, taken once a step."""
        if not norm:
            return 0.0
        rows = probe[:SIZE_ROWS]
        if self.cfg.estimator == "jvp":
            return zo.distance(rows) / norm
        return zo.distance(rows, kept) / norm

    def _reply(self, step: int, values: list[float], sizes: list[float]) -> ProbeScalars:
        v = torch.tensor(values, dtype=torch.float32)
        if not self.sized:
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
            directions.prefill(seeds, self.replica.params, self.replica.directions.at(step))
            lam = devices.to(msg.lam, z.device)
            if directions.simulated():  # no device's memory: λ in float64 once, not per probe
                lam = lam.double()
            base = zo.project(lam, z)
            kept, norm = self._sizing(z) if self.sized else (None, 0.0)
            del z  # beyond λᵀ f(θ) (and a few rows to size with): probes run in inference memory
            values, sizes = [], []
            for seed in seeds:
                probe = self._probe(x, seed, step)
                values.append(self._value(lam, probe, base))
                if self.sized:
                    sizes.append(self._size(probe, kept, norm))
                del probe
            return self._reply(step, values, sizes)
        if isinstance(msg, ScalarBroadcast):  # every client applies the same update
            self.replica.apply(msg)
            return None
        raise ProtocolError(f"client {self.shard.cid}: unexpected {type(msg).__name__}")


class HOSFL(SplitMethod):
    """Algorithm 1: the server step above, clients that probe and never backpropagate."""

    name = "hosfl"
    seed_synced = True
    settings = SplitMethod.settings | ZO_SETTINGS | {
        "zo_rank", "zo_lazy", "estimator", "client_dtype", "zo_step", "zo_clip", "aggregate"}

    def __init__(self, cfg: Config, client_model: nn.Module, server_model: nn.Module, task):
        super().__init__(cfg, client_model, server_model, task)
        # the server's record of θ_c; in-process every client role shares it
        self.hold(Replica(client_model, cfg))
        self.bound = Bound(cfg.zo_clip)
        # output: at most the first-order rate; lesser: at most the dimension rule's (zo_lr)
        base = self.replica.optimizer.param_groups[0]["lr"]
        target = cfg.zo_step * math.sqrt(cfg.P / max(self.replica.size, 1))
        self.rate = Rate(target, base, cfg.mu) if cfg.zo_lr_rule in SIZED_RULES else None

    @property
    def client_lr(self) -> float:
        """The zeroth-order rate the clients step at (``zo_lr_rule=output``, ``lesser``: so
        far)."""
        if self.rate is not None:
            return self.rate.rate()
        return super().client_lr

    def client(self, shard: Shard) -> ClientRole:
        self.expect_cut(shard)
        return Client(shard, self.replica, self.cfg)

    def why_not(self, cid: int, msg: Message, step: int, kind: type) -> str | None:
        why = super().why_not(cid, msg, step, kind)
        if why is None and self.rate is not None and isinstance(msg, ProbeScalars):
            if not isinstance(msg, ProbeReport):
                return f"zo_lr_rule={self.cfg.zo_lr_rule}: expected the probes' sizes (ProbeReport)"
            if msg.sizes.shape != (self.cfg.P,) or bool((msg.sizes < 0).any()):
                return f"expected {self.cfg.P} probe sizes >= 0, got {msg.sizes.tolist()}"
        return why

    def stateful(self) -> dict[str, Any]:
        # older checkpoints hold neither
        clip = {"zo_clip": self.bound} if self.cfg.zo_clip else {}
        rate = {"zo_rate": self.rate} if self.rate is not None else {}
        return {**super().stateful(), **clip, **rate}

    def commit(self, update: ScalarBroadcast, engine) -> None:
        """Send the step's update to the clients and apply it to the record."""
        self.replica.commit(update, engine)

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
