"""The server role the split methods share (HO-SFL's, reused by the baselines): sample, draw
seeds, admit or reject every upload, backprop the server part with the task's loss, average
the scalars; and the settings such a server and a zeroth-order client read."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from hosfl import devices
from hosfl.config import Config
from hosfl.methods.base import Method, make_optimizer
from hosfl.methods.policy import Caps, Scale, magnitude, rms
from hosfl.methods.replica import Replica, probed
from hosfl.methods.shard import Shard
from hosfl.methods.weights import shared_state
from hosfl.protocol import (
    CutGradient,
    Message,
    ModelWeights,
    ProbeScalars,
    ScalarBroadcast,
    SmashedData,
    StepPlan,
)
from hosfl.tasks.base import Task

# what the backprop server of a split method reads
SERVER_SETTINGS = frozenset({"server_optimizer", "server_lr", "server_average", "server_schedule",
                             "server_dtype", "momentum", "outlier_factor",
                             "smashed_bound", "cut_dtype"})  # fmt: skip
# what a zeroth-order client that probes through (seeds, v̄) reads
ZO_SETTINGS = frozenset({"P", "mu", "directions", "client_optimizer", "client_lr", "zo_lr_rule",
                         "zo_lr_scale", "zo_lr_max", "momentum"})  # fmt: skip


def _close(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Equal to float rounding: within 10⁻³ of b's largest magnitude (a batch of another size
    may take another kernel path; a layer that couples rows moves λ by far more)."""
    if a is None or b is None:
        return a is b
    return bool((a - b).abs().max() <= 1e-3 * b.abs().max() + 1e-30) if b.numel() else True


@torch.no_grad()
def _load(buffers: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    for b, v in zip(buffers, values, strict=True):
        b.copy_(v)


class SplitMethod(Method):
    """The server role of the split methods (HO-SFL's, reused by the baselines): sample,
    draw seeds, check every upload (its type, step, shape, values, and its magnitude against
    recent honest uploads), backprop the server part, average the scalars."""

    settings = SERVER_SETTINGS

    def __init__(
        self, cfg: Config, client_model: nn.Module, server_model: nn.Module, task: Task
    ) -> None:
        super().__init__(cfg, client_model, server_model, task)
        self.model = server_model
        self.optimizer = make_optimizer(
            cfg.server_optimizer, server_model.parameters(), cfg.server_lr, cfg.momentum
        )
        # ``server_average``: an exponential average of θ_s, what evaluations run; training,
        # λ and the journal never see it (a method whose server steps otherwise keeps none)
        self.beta = cfg.average_beta() if "server_average" in self.settings else 0.0
        self.averaged = copy.deepcopy(server_model).requires_grad_(False) if self.beta else None
        self.z_shape: tuple[int, ...] | None = None  # set by ``expect_cut``
        self.bf16 = cfg.server_dtype == "bfloat16"  # z and λ stay float32
        self.scales = {SmashedData: Scale(), ProbeScalars: Scale()}
        # ``smashed_bound`` and ``aggregate=bounded``: what one client's upload may weigh
        self.caps = {
            # z: at most k× the step's median size and k× the recent median (two attackers of
            # three sampled set the step's median; measured: 3× the recent median let them in)
            SmashedData: Caps(cfg.smashed_bound, history=1.0) if cfg.smashed_bound else None,
            ProbeScalars: Caps(1.0) if cfg.aggregate == "bounded" else None,
            ModelWeights: Caps(1.0) if cfg.aggregate == "bounded" else None,
        }
        # a method whose clients move by (seeds, v̄) sets its Replica here: the record
        self.replica: Any = None
        # the batched simulation runs the K clients' server passes as one where the server
        # couples no rows and draws nothing: checked once a process (``_checked``)
        self.together: bool | None = None if cfg.batched() else False

    def stateful(self) -> dict[str, Any]:
        held = {
            **super().stateful(),
            "server_optimizer": self.optimizer,
            "smashed_scale": self.scales[SmashedData],
            "scalar_scale": self.scales[ProbeScalars],
        }
        if self.averaged is not None:
            held["server_average"] = self.averaged
        if self.replica is not None:
            held["replica"] = self.replica
        for kind, name in ((SmashedData, "smashed_caps"), (ProbeScalars, "scalar_caps"),
                           (ModelWeights, "weight_caps")):  # fmt: skip
            if self.caps[kind] is not None:
                held[name] = self.caps[kind]
        return held

    @property
    def record(self) -> Any:
        """The replica of a seed-synced method (in-process, the one every client shares)."""
        return self.replica

    @property
    def evaluated_server(self) -> nn.Module:
        return self.model if self.averaged is None else self.averaged

    @torch.no_grad()
    def update_average(self) -> None:
        """a ← β·a + (1 − β)·θ_s (β: ``Config.average_beta``); buffers (BatchNorm
        statistics) are copied: they are already running averages."""
        if self.averaged is None:
            return
        for a, p in zip(self.averaged.parameters(), self.model.parameters(), strict=True):
            a.mul_(self.beta).add_(p, alpha=1 - self.beta)
        for a, b in zip(self.averaged.buffers(), self.model.buffers(), strict=True):
            a.copy_(b)

    def admit(self, replies: dict[int, Message], step: int, kind: type) -> dict[int, Message]:
        admitted = super().admit(replies, step, kind)
        if kind not in self.scales:
            return admitted
        sizes = {c: magnitude(m) for c, m in admitted.items()}
        for cid, why in self.scales[kind].screen(sizes, self.cfg.outlier_factor).items():
            self.reject(step, cid, f"{kind.__name__}: {why}")
            del admitted[cid]
        return admitted

    def hold(self, replica: Replica) -> None:
        """Keep ``replica`` as the record of the clients' model (what one client holds)."""
        self.replica = replica
        self.client_holds = replica.model

    @property
    def client_lr(self) -> float | None:
        """The rate of the replica's updates, where the clients keep one."""
        if self.replica is None:
            return super().client_lr
        return self.replica.optimizer.param_groups[0]["lr"]

    @torch.no_grad()
    def expect_cut(self, shard: Shard) -> None:
        """Once: learn the shape of one example's smashed data, which every upload is checked
        against, from one forward of the client part; with a replica of the client part,
        refuse the parameters its probes cannot reach (``probed``)."""
        if self.z_shape is not None:
            return
        x = shard.batch(0, 1)[0]
        was = self.client_model.training
        self.z_shape = tuple(self.client_model.eval()(x).shape[1:])
        self.client_model.train(was)
        if self.replica is not None and self.replica.model is self.client_model:
            probed(self.client_model, x, "client part")

    def plan(self, step: int) -> tuple[list[int], StepPlan]:
        self.sampled = self.sample(step)
        rng = np.random.default_rng([self.cfg.seed, 1, step])
        seeds = torch.from_numpy(rng.integers(0, 2**31, size=self.cfg.P, dtype=np.int64))
        return self.sampled, StepPlan(step, seeds.to(torch.int32))

    def why_not(self, cid: int, msg: Message, step: int, kind: type) -> str | None:
        why = super().why_not(cid, msg, step, kind)
        if why is not None:
            return why
        if isinstance(msg, SmashedData):
            n = msg.y.shape[0] if msg.y.dim() else 0
            if self.z_shape is not None and (
                tuple(msg.z.shape) != (n, *self.z_shape) or not 0 < n <= self.cfg.batch_size
            ):
                return (
                    f"smashed data of shape {tuple(msg.z.shape)} for {n} labels, expected "
                    f"({n}, {', '.join(map(str, self.z_shape))}) with 1..{self.cfg.batch_size}"
                )
            classes = self.task.classes
            if classes and (msg.y.is_floating_point() or msg.y.dim() != 1):
                return "labels must be one integer per example"
            if classes and (msg.y.min() < 0 or msg.y.max() >= classes):
                return f"labels outside 0..{classes - 1}"
        if isinstance(msg, ProbeScalars) and msg.values.shape != (self.cfg.P,):
            return f"expected {self.cfg.P} probe scalars, got {tuple(msg.values.shape)}"
        if isinstance(msg, ModelWeights):
            d = sum(p.numel() for p in shared_state(self.client_model))
            if msg.weights.shape != (d,):
                return f"{msg.weights.numel()} weights for a client part of {d}"
        return None

    def train(self, smashed: dict[int, Message], step: int) -> tuple[dict, float | None]:
        """One optimizer step on θ_s over the admitted clients' batches; λ_m for each.

        Each client's loss is backpropagated on its own so that z_m.grad is exactly ∂ℓ_m/∂z_m
        (the λ of the paper); θ_s's accumulated gradient is then divided by their number.
        In the batched simulation, where the server couples no rows and draws nothing, the K
        passes are one: the same λ_m and gradient to float rounding. With no admissible batch
        θ_s is left as it is (loss None)."""
        smashed = self.admit(smashed, step, SmashedData)
        if not smashed:
            return {}, None
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        scale = self.bounded(smashed)
        if self.together is False or len(smashed) == 1:
            lams, total = self._passes(smashed, scale, step)
        elif self.together is None:
            lams, total = self._checked(smashed, scale, step)
        else:
            lams, total, _ = self._pass_together(smashed, scale, step)
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.div_(len(smashed))
        for group in self.optimizer.param_groups:
            group["lr"] = self.server_lr(step)
        self.optimizer.step()
        self.update_average()
        return lams, total / len(smashed)

    def _passes(self, smashed: dict[int, Message], scale: dict[int, float], step: int):
        """Each client's forward and backward on its own: λ_m and the summed loss."""
        lams, total = {}, 0.0
        here = devices.of(self.model)
        for cid, msg in smashed.items():
            z = devices.to(msg.z.detach(), here)  # a leaf of its own, not the message's
            z = (z.mul(scale[cid]) if scale[cid] != 1 else z).requires_grad_(True)
            with devices.seeded(here, self.cfg.seed, 5, cid, step), torch.autocast(
                here.type, torch.bfloat16, enabled=self.bf16
            ):
                loss = self.task.loss(self.model(z), devices.to(msg.y, here))
            loss.backward()
            # λ of the client's own z: ∂ℓ/∂z = s·∂ℓ/∂(s·z)
            lams[cid] = CutGradient(msg.step, z.grad if scale[cid] == 1 else z.grad * scale[cid])
            total += loss.item()
        return lams, total

    def _pass_together(self, smashed: dict[int, Message], scale: dict[int, float], step: int):
        """The clients' batches as one forward and one backward of Σ_m ℓ_m (each loss on its
        own rows): λ_m, the summed loss, and whether the pass drew from the generator. None
        where the server's output cannot be split by rows."""
        here = devices.of(self.model)
        cids = list(smashed)
        zs = [devices.to(smashed[c].z.detach(), here) for c in cids]
        scaled = [zm.mul(scale[c]) if scale[c] != 1 else zm for c, zm in zip(cids, zs, strict=True)]
        z = torch.cat(scaled).requires_grad_(True)
        gen = devices.generator(here)
        with devices.seeded(here, self.cfg.seed, 6, step), torch.autocast(
            here.type, torch.bfloat16, enabled=self.bf16
        ):
            seeded = gen.get_state()
            out = self.model(z)
            if not isinstance(out, torch.Tensor):
                return None
            rows = [len(zm) for zm in zs]
            losses = [self.task.loss(o, devices.to(smashed[c].y, here))
                      for c, o in zip(cids, out.split(rows), strict=True)]  # fmt: skip
            drew = not torch.equal(seeded, gen.get_state())
        sum(losses).backward()
        lams = {c: CutGradient(step, g if scale[c] == 1 else g * scale[c])
                for c, g in zip(cids, z.grad.split(rows), strict=True)}  # fmt: skip
        return lams, sum(loss.item() for loss in losses), drew

    def _checked(self, smashed: dict[int, Message], scale: dict[int, float], step: int):
        """Once: the clients' passes together and one by one, from the same θ_s and buffers.
        Together from now on where it drew nothing and gave the same λ_m and gradients to
        float rounding (a row-coupling layer such as BatchNorm, or dropout, does not); the
        step keeps the passes' results its choice gives, so a resumed run, which checks again,
        takes the same bits."""
        params = list(self.model.parameters())
        buffers = list(self.model.buffers())
        start = [b.detach().clone() for b in buffers]
        together = self._pass_together(smashed, scale, step)
        grads = [p.grad for p in params]  # kept as they are: the passes below make new ones
        after = [b.detach().clone() for b in buffers]
        _load(buffers, start)  # the passes one by one from where the pass together began
        for p in params:
            p.grad = None
        lams, total = self._passes(smashed, scale, step)
        self.together = together is not None and not together[2] and all(
            _close(together[0][c].lam, lams[c].lam) for c in lams
        ) and all(_close(g, p.grad) for g, p in zip(grads, params, strict=True))  # fmt: skip
        if not self.together:
            return lams, total
        _load(buffers, after)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        return together[0], together[1]

    def bounded(self, smashed: dict[int, Message]) -> dict[int, float]:
        """Each client's smashed-data scale under ``smashed_bound`` (1 where it is off)."""
        caps = self.caps[SmashedData]
        if caps is None:
            return dict.fromkeys(smashed, 1.0)
        return caps.scales({c: rms(m.z) for c, m in smashed.items()})

    def server_lr(self, step: int) -> float:
        """The server's rate at ``step``: ``server_lr``, or its cosine decay over the run
        (a function of the step alone: a resumed run continues it exactly)."""
        if self.cfg.server_schedule == "cosine":
            return self.cfg.server_lr * (1 + math.cos(math.pi * step / self.cfg.steps)) / 2
        return self.cfg.server_lr

    def aggregate(self, plan: StepPlan, scalars: dict[int, Message]) -> ScalarBroadcast:
        """v̄ over the admitted clients (``cfg.aggregate``: mean, median, the mean without each
        probe's lowest and highest value, or the mean after scaling each client's P scalars
        down to the median client's norm), in float64, sent as float32. No admissible
        scalars: v̄ = 0, a step that moves no client."""
        return self.average(plan, self.admit(scalars, plan.step, ProbeScalars))

    def average(self, plan: StepPlan, scalars: dict[int, Message]) -> ScalarBroadcast:
        """``aggregate`` over replies already admitted."""
        if not scalars:
            return ScalarBroadcast(plan.step, plan.seeds, torch.zeros(len(plan.seeds)))
        v = torch.stack([scalars[c].values.double() for c in sorted(scalars)])
        if self.cfg.aggregate == "median":
            vbar = v.quantile(0.5, dim=0)
        elif self.cfg.aggregate == "trimmed" and len(v) > 2:  # fewer admitted: the mean
            vbar = v.sort(0).values[1:-1].mean(0)
        elif self.cfg.aggregate == "clipped":  # no client's vector longer than the median's
            norms = v.norm(dim=1, keepdim=True)
            cap = norms.median()
            vbar = (v * torch.where(norms > cap, cap / norms, torch.ones_like(norms))).mean(0)
        elif self.cfg.aggregate == "bounded":  # clipped, and at most 3× the run's recent norms
            cids = sorted(scalars)
            scale = self.caps[ProbeScalars].scales(dict(zip(cids, v.norm(dim=1).tolist(),
                                                            strict=True)))  # fmt: skip
            vbar = (v * torch.tensor([scale[c] for c in cids], dtype=v.dtype)[:, None]).mean(0)
        else:
            vbar = v.mean(0)
        return ScalarBroadcast(plan.step, plan.seeds, vbar.float())
