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

import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hosfl import zo
from hosfl.config import Config
from hosfl.methods.base import ClientRole, Federation, Shard, make_optimizer, sample_clients
from hosfl.protocol import (
    CatchUp,
    CutGradient,
    Message,
    ProbeScalars,
    ProtocolError,
    ScalarBroadcast,
    SmashedData,
    StepPlan,
    Synced,
)


def digest(params: list[torch.Tensor]) -> int:
    """A 63-bit hash of the parameters' bytes: replicas agree bit for bit iff (almost surely)
    their digests agree."""
    h = hashlib.blake2b(digest_size=8)
    for p in params:
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


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


class Replica:
    """A client's copy of θ_c and its optimizer; applies broadcasts strictly in step order.

    In-process all M clients share one Replica (they hold the identical θ_c by construction),
    so applying a broadcast that was already applied is a no-op."""

    def __init__(self, model: nn.Module, cfg: Config) -> None:
        self.model = model.eval()  # BatchNorm statistics frozen, dropout off while probing
        self.params = zo.trainable(model)
        self.cfg = cfg
        lr = zo_lr(cfg, sum(p.numel() for p in self.params), cfg.client_lr)
        self.optimizer = make_optimizer(cfg.client_optimizer, self.params, lr, cfg.momentum)
        self.step = 0  # the next step this replica needs

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
            self.cfg.directions,
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
        return Synced(self.step, digest(self.params))


class ReplicaClient(ClientRole):
    """A client whose model moves only by (seeds, v̄) updates of its Replica (HO-SFL, HOSL,
    ZO-SFL, ZO-FL): in-process, clients sharing the Replica are updated by one delivery."""

    def __init__(self, shard: Shard, replica: Replica, cfg: Config) -> None:
        self.shard, self.replica, self.cfg = shard, replica, cfg

    @property
    def state(self) -> object:
        return self.replica


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
            base = zo.project(msg.lam, z)
            del z  # f(θ) is not needed beyond λᵀ f(θ): probes run in inference memory
            values = []
            for seed in seeds:
                with zo.perturbed(
                    self.replica.model, seed, self.cfg.mu, self.cfg.directions, self.bf16
                ):
                    values.append(zo.estimate(msg.lam, self._forward(x), base))
            return ProbeScalars(step, torch.tensor(values, dtype=torch.float32))
        if isinstance(msg, ScalarBroadcast):  # every client applies the same update
            self.replica.apply(msg)
            return None
        raise ProtocolError(f"client {self.shard.cid}: unexpected {type(msg).__name__}")


class Server:
    """The server role. Every client message is admitted or rejected with a reason: a rejected
    contribution is dropped from the step (logged in ``rejections``) and changes nothing."""

    def __init__(self, model: nn.Module, cfg: Config, classes: int, z_shape: tuple) -> None:
        self.model, self.cfg, self.classes, self.z_shape = model, cfg, classes, z_shape
        self.optimizer = make_optimizer(
            cfg.server_optimizer, model.parameters(), cfg.server_lr, cfg.momentum
        )
        self.sampled: list[int] = []
        self.rejections: list[dict] = []

    def reject(self, step: int, cid: int, reason: str) -> None:
        self.rejections.append({"step": step, "client": cid, "reason": reason})

    def plan(self, step: int) -> tuple[list[int], StepPlan]:
        self.sampled = sample_clients(self.cfg, step)
        rng = np.random.default_rng([self.cfg.seed, 1, step])
        seeds = torch.from_numpy(rng.integers(0, 2**31, size=self.cfg.P, dtype=np.int64))
        return self.sampled, StepPlan(step, seeds.to(torch.int32))

    def _why_not(self, cid: int, msg: Message, step: int, kind: type) -> str | None:
        """None if ``msg`` is an acceptable ``kind`` reply of client ``cid`` at ``step``."""
        if cid not in self.sampled:
            return f"client {cid} was not sampled at step {step}"
        if not isinstance(msg, kind):
            return f"expected {kind.__name__}, got {type(msg).__name__}"
        if msg.step != step:
            return f"{kind.__name__} of step {msg.step} at step {step}"
        try:
            msg.validate()
        except ProtocolError as e:
            return str(e)
        if isinstance(msg, SmashedData):
            n = msg.y.shape[0]
            if tuple(msg.z.shape) != (n, *self.z_shape) or not 0 < n <= self.cfg.batch_size:
                return (
                    f"smashed data of shape {tuple(msg.z.shape)} for {n} labels, expected "
                    f"({n}, {', '.join(map(str, self.z_shape))}) with 1..{self.cfg.batch_size}"
                )
            if msg.y.min() < 0 or msg.y.max() >= self.classes:
                return f"labels outside 0..{self.classes - 1}"
        if isinstance(msg, ProbeScalars) and msg.values.shape != (self.cfg.P,):
            return f"expected {self.cfg.P} probe scalars, got {tuple(msg.values.shape)}"
        return None

    def admit(self, replies: dict[int, Message], step: int, kind: type) -> dict[int, Message]:
        admitted = {}
        for cid in sorted(replies):
            why = self._why_not(cid, replies[cid], step, kind)
            if why is None:
                admitted[cid] = replies[cid]
            else:
                self.reject(step, cid, why)
        return admitted

    def train(
        self, smashed: dict[int, Message], step: int
    ) -> tuple[dict[int, CutGradient], float | None]:
        """One optimizer step on θ_s over the admitted clients' batches; λ_m for each.

        Each client's loss is backpropagated on its own so that z_m.grad is exactly ∂ℓ_m/∂z_m
        (the λ of the paper); θ_s's accumulated gradient is then divided by their number.
        With no admissible batch θ_s is left as it is (loss None)."""
        smashed = self.admit(smashed, step, SmashedData)
        if not smashed:
            return {}, None
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        lams, total = {}, 0.0
        for cid, msg in smashed.items():
            z = msg.z.detach().clone().requires_grad_(True)
            loss = F.cross_entropy(self.model(z), msg.y)
            loss.backward()
            lams[cid] = CutGradient(msg.step, z.grad)
            total += loss.item()
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.div_(len(smashed))
        self.optimizer.step()
        return lams, total / len(smashed)

    def aggregate(self, plan: StepPlan, scalars: dict[int, Message]) -> ScalarBroadcast:
        """v̄ over the admitted clients (``cfg.aggregate``: mean, median, or the mean without
        each probe's lowest and highest value), in float64, sent as float32. No admissible
        scalars: v̄ = 0, a step that moves no client."""
        scalars = self.admit(scalars, plan.step, ProbeScalars)
        if not scalars:
            return ScalarBroadcast(plan.step, plan.seeds, torch.zeros(len(plan.seeds)))
        v = torch.stack([scalars[c].values.double() for c in sorted(scalars)])
        if self.cfg.aggregate == "median":
            vbar = v.quantile(0.5, dim=0)
        elif self.cfg.aggregate == "trimmed" and len(v) > 2:
            vbar = v.sort(0).values[1:-1].mean(0)
        else:
            vbar = v.mean(0)
        return ScalarBroadcast(plan.step, plan.seeds, vbar.float())


@torch.no_grad()
def cut_shape(client_model: nn.Module, shard: Shard) -> tuple[int, ...]:
    """The shape of one example's smashed data, which the server checks every upload against."""
    return tuple(client_model(shard.batch(0, 1)[0]).shape[1:])


def build(
    cfg: Config,
    client_model: nn.Module,
    server_model: nn.Module,
    shards: list[Shard],
    classes: int,
    client_class: type = Client,
    server_class: type = Server,
) -> Federation:
    """All clients share one Replica; HOSL and ZO-SFL reuse this with their own roles."""
    replica = Replica(client_model, cfg)
    clients: list[ClientRole] = [client_class(s, replica, cfg) for s in shards]
    server = server_class(server_model, cfg, classes, cut_shape(client_model, shards[0]))
    return Federation(server, clients, client_model, server_model, replica.optimizer)


def step(t: int, server: Server, engine) -> tuple[float, Message]:
    """One aggregation; returns the training loss and the broadcast (the step's log entry)."""
    clients, plan = server.plan(t)
    smashed = engine.ask({m: plan for m in clients})
    lams, loss = server.train(smashed, t)
    scalars = engine.ask(lams)
    update = server.aggregate(plan, scalars)
    engine.broadcast(update)
    return loss, update
