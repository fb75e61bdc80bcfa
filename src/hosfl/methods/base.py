"""The contract every method fills in, and the server role the split methods share.

A method is a ``Method`` subclass in one file, plus one line in ``methods/__init__.py``:

- ``client(shard)`` makes the role one client plays (``ClientRole.handle`` answers each
  message the engine delivers to it);
- ``step(t, engine)`` is the server's part of one aggregation: it asks the engine to carry
  messages to clients and back, and returns (training loss, the step's update message);
- ``state_dict()`` / ``load_state_dict()`` hold everything a resume needs (weights,
  optimizer states, learning rates, reference weights), so resume is exact for every method;
- ``seed_synced`` tells the runner and the engines what they may rely on: the client model
  moves only by (seeds, v̄) broadcasts, so it is journaled, replayable and caught up by
  replay; such a method has ``replica`` (the server's record of θ_c: ``model``,
  ``optimizer``) and ``synced()`` (the record's step and digest).

The runner and the engines call nothing else (Flower's Strategy is the model: the loop lives
outside, and built-in methods use nothing a third-party one cannot).
"""

from __future__ import annotations

import copy
import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from hosfl import devices, zo
from hosfl.config import METHOD_SETTINGS, Config, ConfigError
from hosfl.data import source
from hosfl.protocol import (
    CatchUp,
    CutGradient,
    Message,
    ModelWeights,
    ProbeReport,
    ProbeScalars,
    ProtocolError,
    ReplicaState,
    ScalarBroadcast,
    SmashedData,
    StepPlan,
    Synced,
)
from hosfl.tasks.base import Task

NO_SEEDS = torch.empty(0, dtype=torch.int32)  # the StepPlan of a method that does not probe


class Diverged(Exception):
    """The step's update is not finite; it was not sent to any client."""


def make_optimizer(
    name: str, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.0
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r} (valid: sgd, adam)")


def digest(params: list[torch.Tensor]) -> int:
    """A 63-bit hash of the parameters' bytes: replicas agree bit for bit iff (almost surely)
    their digests agree."""
    h = hashlib.blake2b(digest_size=8)
    for p in params:
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def sample_clients(cfg: Config, step: int) -> list[int]:
    """The K clients of ``step``, sorted; drawn from ``default_rng([seed, 0, step])``."""
    rng = np.random.default_rng([cfg.seed, 0, step])
    return sorted(rng.choice(cfg.clients, size=cfg.sampled, replace=False).tolist())


class Shard:
    """One client's private data: indices into the training data (tensors or a Dataset).

    The batch of step t is drawn from ``default_rng([seed, 2, client, t])``: the same on every run
    and every machine, with no per-client generator state to keep."""

    def __init__(
        self,
        cid: int,
        data: source.Data,
        idx: np.ndarray,
        seed: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.cid, self.data, self.idx, self.seed = cid, data, idx, seed
        self.device = torch.device(device)  # where the client computes: batches go there

    def batch(self, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, 2, self.cid, step])
        x, y = source.take(self.data, rng.choice(self.idx, min(size, len(self.idx)), False))
        return devices.to(x, self.device), devices.to(y, self.device)


class ClientRole(ABC):
    shard: Shard

    @abstractmethod
    def handle(self, msg: Message) -> Message | None:
        """Answer one message from the server (None for broadcasts)."""

    @property
    def state(self) -> object:
        """What a broadcast updates. In-process, clients that share it (one ``Replica`` for
        all) are updated by one delivery; the ledger still counts a copy per client."""
        return self

    @classmethod
    def handle_group(cls, roles: list[ClientRole], msgs: list[Message]) -> list[Message | None]:
        """Answer one message each for several clients of this class that share ``state``
        (batched simulation, in-process): by default one ``handle`` call each. A class that
        can do better (one forward of the concatenated batches) overrides it; its replies
        must be the messages ``handle`` would send, up to float rounding."""
        return [role.handle(msg) for role, msg in zip(roles, msgs, strict=True)]

    def synced(self) -> Synced | None:
        """Where this client's seed-synced replica is (None: the client keeps no replica)."""
        return None

    def catch_up(self, msg: CatchUp) -> Synced:
        """Replay the (seeds, v̄) rows this client missed; only seed-synced clients can."""
        raise ProtocolError(f"client {self.shard.cid} keeps no replica to catch up")

    def restore(self, msg: ReplicaState) -> Synced:
        """Take the server's record of a drifted replica; only seed-synced clients can."""
        raise ProtocolError(f"client {self.shard.cid} keeps no replica to restore")


def concatenated(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]] | None:
    """The clients' batches as one (batched simulation) and each one's size; None where
    they cannot be one batch (examples of different shapes)."""
    if any(t.shape[1:] != tensors[0].shape[1:] for t in tensors):
        return None
    return torch.cat(tensors), [len(t) for t in tensors]


def forward_group(
    roles: list[ClientRole], step: int, forward
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None:
    """Each role's batch of ``step`` and its rows of one ``forward`` of the concatenated
    batches, as (x_m, y_m, z_m); None where the batches cannot be one."""
    batches = [r.shard.batch(step, r.cfg.batch_size) for r in roles]
    joined = concatenated([x for x, _ in batches])
    if joined is None:
        return None
    zs = forward(joined[0]).split(joined[1])
    return [(x, y, z) for (x, y), z in zip(batches, zs, strict=True)]


class Method(ABC):
    """A federated training method, seen from the server. See the module docstring."""

    name: ClassVar[str]
    seed_synced: ClassVar[bool] = False
    # the settings of ``config.METHOD_SETTINGS`` this method reads; another one set away from
    # its default is an error (``check``)
    settings: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def check(cls, cfg: Config) -> None:
        """Refuse, naming the method, a setting it does not read or a value it cannot run
        with (ConfigError); called before anything of a run is built or written."""
        unused = {k: v for k, v in cfg.changed().items()
                  if k in METHOD_SETTINGS and k not in cls.settings}  # fmt: skip
        if unused:
            given = ", ".join(f"{k}={v!r}" for k, v in sorted(unused.items()))
            raise ConfigError(
                f"method={cls.name} does not use {given}: remove it (the settings it reads: "
                f"{', '.join(sorted(cls.settings)) or 'none of the method settings'})"
            )

    def __init__(
        self, cfg: Config, client_model: nn.Module, server_model: nn.Module, task: Task
    ) -> None:
        self.cfg, self.task = cfg, task
        self.client_model, self.server_model = client_model, server_model
        self.client_holds: nn.Module = client_model  # what one client keeps in memory
        self.rejections: list[dict] = []
        self.sampled: list[int] = []  # the clients of the current step

    @abstractmethod
    def client(self, shard: Shard) -> ClientRole:
        """The role of the client that holds ``shard``."""

    @abstractmethod
    def step(self, t: int, engine: Any) -> tuple[float | None, Message | None]:
        """One aggregation; returns the training loss (None: not known) and the update."""

    @property
    def client_lr(self) -> float | None:
        """The learning rate the clients' updates use (None: the clients train nothing)."""
        return self.cfg.client_lr

    @property
    def record(self) -> Any:
        """The server's record of a seed-synced client model (``seed_synced`` methods: the
        ``Replica`` every client holds a copy of, with ``synced()``, ``export()``, ``params``,
        ``optimizer``, ``directions``); None where clients keep no replica. The runner and the
        engines read the record and nothing else of a method's inside."""
        return None

    def events(self) -> list[dict]:
        """The contributions dropped since the last call, as metrics rows (``reject``)."""
        rows = [{"event": "reject", **row} for row in self.rejections]
        self.rejections.clear()
        return rows

    @property
    def evaluated_server(self) -> nn.Module:
        """The server part that evaluations run: the trained one, unless a method keeps an
        average of it (``server_average``)."""
        return self.server_model

    def stateful(self) -> dict[str, Any]:
        """Objects with ``state_dict``/``load_state_dict`` that a checkpoint must hold;
        ``client`` and ``server`` (the two model parts) always."""
        return {"client": self.client_model, "server": self.server_model}

    def state_dict(self) -> dict[str, Any]:
        return {k: v.state_dict() for k, v in self.stateful().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, obj in self.stateful().items():
            if key not in state:
                raise ValueError(f"the checkpoint holds no {key!r} state for {self.name}")
            obj.load_state_dict(state[key])

    def reject(self, step: int, cid: int, reason: str) -> None:
        self.rejections.append({"step": step, "client": cid, "reason": reason})

    def sample(self, step: int) -> list[int]:
        return sample_clients(self.cfg, step)

    def admit(self, replies: dict[int, Message], step: int, kind: type) -> dict[int, Message]:
        """The replies that ``why_not`` finds acceptable; the others are rejected (logged).
        Every reply non-finite is the clients' computation diverging: ``Diverged``."""
        if _blown_up(replies):
            raise Diverged(f"every client's {kind.__name__} of step {step} is not finite")
        admitted = {}
        for cid in sorted(replies):
            why = self.why_not(cid, replies[cid], step, kind)
            if why is None:
                admitted[cid] = replies[cid]
            else:
                self.reject(step, cid, why)
        return admitted

    def why_not(self, cid: int, msg: Message, step: int, kind: type) -> str | None:
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
        return None


class Scale:
    """What honest clients have been sending: the magnitudes (largest absolute value) of the
    last ``window`` admitted uploads of one kind. An upload more than ``factor`` times their
    median, taken together with the other uploads of its own step, is rejected: a client that
    stays inside the type checks (finite, right shape) cannot push 1e30 into the average. The
    median resists poisoning as long as honest uploads are the majority."""

    def __init__(self, window: int = 64) -> None:
        self.window, self.seen = window, []

    def screen(self, sizes: dict[int, float], factor: float) -> dict[int, str]:
        """The clients whose upload is out of bounds, with the reason; the others are noted."""
        pool = self.seen + list(sizes.values())
        out = {}
        if factor and len(pool) >= 3:
            ref = float(np.median(pool))
            out = {
                c: f"magnitude {v:.3g} is more than {factor:g}× the median of recent uploads "
                f"({ref:.3g})"
                for c, v in sizes.items()
                if v > factor * max(ref, 1e-30)
            }
        self.seen = (self.seen + [v for c, v in sizes.items() if c not in out])[-self.window :]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"seen": list(self.seen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = [float(v) for v in state["seen"]]


def _magnitude(msg: Message) -> float | None:
    if isinstance(msg, SmashedData):
        return float(msg.z.abs().max()) if msg.z.numel() else 0.0
    if isinstance(msg, ProbeScalars):
        return float(msg.values.abs().max()) if msg.values.numel() else 0.0
    return None


# what the backprop server of a split method reads
SERVER_SETTINGS = frozenset({"server_optimizer", "server_lr", "server_average", "server_schedule",
                             "server_dtype", "momentum", "outlier_factor"})  # fmt: skip
# what a zeroth-order client that probes through (seeds, v̄) reads
ZO_SETTINGS = frozenset({"P", "mu", "directions", "client_optimizer", "client_lr", "zo_lr_rule",
                         "zo_lr_scale", "zo_lr_max", "momentum"})  # fmt: skip


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
        # λ and the journal never see it
        self.averaged = (
            copy.deepcopy(server_model).requires_grad_(False) if cfg.server_average else None
        )
        self.z_shape: tuple[int, ...] | None = None  # set by ``expect_cut``
        self.bf16 = cfg.server_dtype == "bfloat16"  # z and λ stay float32
        self.scales = {SmashedData: Scale(), ProbeScalars: Scale()}

    def stateful(self) -> dict[str, Any]:
        held = {
            **super().stateful(),
            "server_optimizer": self.optimizer,
            "smashed_scale": self.scales[SmashedData],
            "scalar_scale": self.scales[ProbeScalars],
        }
        if self.averaged is not None:
            held["server_average"] = self.averaged
        return held

    @property
    def evaluated_server(self) -> nn.Module:
        return self.model if self.averaged is None else self.averaged

    @torch.no_grad()
    def update_average(self) -> None:
        """a ← β·a + (1 − β)·θ_s (β = ``server_average``); buffers (BatchNorm statistics)
        are copied: they are already running averages."""
        if self.averaged is None:
            return
        beta = self.cfg.server_average
        for a, p in zip(self.averaged.parameters(), self.model.parameters(), strict=True):
            a.mul_(beta).add_(p, alpha=1 - beta)
        for a, b in zip(self.averaged.buffers(), self.model.buffers(), strict=True):
            a.copy_(b)

    def admit(self, replies: dict[int, Message], step: int, kind: type) -> dict[int, Message]:
        admitted = super().admit(replies, step, kind)
        if kind not in self.scales:
            return admitted
        sizes = {c: _magnitude(m) for c, m in admitted.items()}
        for cid, why in self.scales[kind].screen(sizes, self.cfg.outlier_factor).items():
            self.reject(step, cid, f"{kind.__name__}: {why}")
            del admitted[cid]
        return admitted

    @torch.no_grad()
    def expect_cut(self, shard: Shard) -> None:
        """Learn the shape of one example's smashed data, which every upload is checked
        against, from one forward of the client part."""
        was = self.client_model.training
        self.z_shape = tuple(self.client_model.eval()(shard.batch(0, 1)[0]).shape[1:])
        self.client_model.train(was)

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
        if isinstance(msg, ProbeScalars) and self.cfg.zo_lr_rule == "output":
            if not isinstance(msg, ProbeReport):
                return "zo_lr_rule=output: expected the probes' sizes (ProbeReport)"
            if msg.sizes.shape != (self.cfg.P,) or bool((msg.sizes < 0).any()):
                return f"expected {self.cfg.P} probe sizes >= 0, got {msg.sizes.tolist()}"
        if isinstance(msg, ModelWeights):
            d = sum(p.numel() for p in shared_state(self.client_model))
            if msg.weights.shape != (d,):
                return f"{msg.weights.numel()} weights for a client part of {d}"
        return None

    def train(self, smashed: dict[int, Message], step: int) -> tuple[dict, float | None]:
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
        here = devices.of(self.model)
        for cid, msg in smashed.items():
            z = devices.to(msg.z.detach(), here).clone().requires_grad_(True)
            with devices.seeded(here, self.cfg.seed, 5, cid, step), torch.autocast(
                here.type, torch.bfloat16, enabled=self.bf16
            ):
                loss = self.task.loss(self.model(z), devices.to(msg.y, here))
            loss.backward()
            lams[cid] = CutGradient(msg.step, z.grad)
            total += loss.item()
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.div_(len(smashed))
        for group in self.optimizer.param_groups:
            group["lr"] = self.server_lr(step)
        self.optimizer.step()
        self.update_average()
        return lams, total / len(smashed)

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
        else:
            vbar = v.mean(0)
        return ScalarBroadcast(plan.step, plan.seeds, vbar.float())


def _blown_up(replies: dict[int, Message]) -> bool:
    """True if every reply carries a non-finite value: the clients' own computation diverged
    (a divergence to report, not a few bad clients to drop)."""
    return bool(replies) and all(
        isinstance(r, Message)
        and any(
            t.is_floating_point() and not bool(torch.isfinite(t).all())
            for t in (getattr(r, name) for name in r.SCHEMA)
            if isinstance(t, torch.Tensor)
        )
        for r in replies.values()
    )


def _moved(name: str, b: torch.Tensor | None) -> bool:
    return b is not None and (b.is_floating_point() or name == "num_batches_tracked")


def shared_state(model: nn.Module) -> list[torch.Tensor]:
    """What a first-order client and the server exchange: the trainable parameters, then the
    buffers that training moves (BatchNorm's running statistics and counts), which the server
    averages like the weights (FedAvg of the whole state)."""
    return zo.trainable(model) + [
        b for m in model.modules() for n, b in m._buffers.items() if _moved(n, b)
    ]


@torch.no_grad()
def rebind_buffers_(model: nn.Module, flat: torch.Tensor) -> None:
    """The moved buffers of ``shared_state`` set from ``flat``, as new tensors: a backward
    still to come keeps the ones its forward read (BatchNorm saves them)."""
    at = 0
    for m in model.modules():
        for n, b in list(m._buffers.items()):
            if _moved(n, b):
                m._buffers[n] = flat[at : at + b.numel()].view(b.shape).to(b, copy=True)
                at += b.numel()


@torch.no_grad()
def flatten(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """The tensors as one float32 vector (integer counts are exact in it up to 2²⁴)."""
    flat = [t.detach().reshape(-1).float() for t in tensors]
    return torch.cat(flat) if flat else torch.empty(0)


@torch.no_grad()
def load_flat_(params: Iterable[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy a flat weight vector into ``params`` in place. (torch's vector_to_parameters
    makes the parameters views of the vector instead, so a client training on them would
    write into the message it received.)"""
    offset = 0
    for p in params:
        p.copy_(flat[offset : offset + p.numel()].view(p.shape))
        offset += p.numel()
    if offset != flat.numel():
        raise ValueError(f"weight vector of {flat.numel()} values for {offset} parameters")
