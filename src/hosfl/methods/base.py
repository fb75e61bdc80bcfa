"""The contract every method fills in (the split methods' shared server role is ``split.py``).

A method is a ``Method`` subclass in one file, plus one line in ``methods/__init__.py``:

- ``client(shard)`` makes the role one client plays (``ClientRole.handle`` answers each
  message the engine delivers to it);
- ``step(t, engine)`` is the server's part of one aggregation: it asks the engine to carry
  messages to clients and back, and returns (training loss, the step's update message);
- ``state_dict()`` / ``load_state_dict()`` hold everything a resume needs (weights,
  optimizer states, learning rates, reference weights), so resume is exact for every method;
- ``settings`` / ``check(cfg)``: the method settings it reads; any other one set is an error;
- ``record``: the server's record of a seed-synced client model (the client model moves only
  by (seeds, v̄) broadcasts, so it is journaled, replayable and caught up by replay), None
  for the other methods; ``events()``: the contributions it dropped, as metrics rows.

The runner and the engines call nothing else (Flower's Strategy is the model: the loop lives
outside, and built-in methods use nothing a third-party one cannot). Beside it: ``shard.py``
(a client's data, the clients of a step), ``policy.py`` (admission), ``weights.py`` (digests
and flat state), ``split.py`` (the split methods' server), ``replica.py`` (a seed-synced
client model), ``controls.py`` (zo_clip and zo_lr_rule=output), ``batched.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from hosfl.config import METHOD_SETTINGS, Config, ConfigError
from hosfl.methods.policy import blown_up
from hosfl.methods.shard import Shard, sample_clients
from hosfl.protocol import (
    CatchUp,
    Message,
    ProtocolError,
    ReplicaState,
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


class Method(ABC):
    """A federated training method, seen from the server. See the module docstring."""

    name: ClassVar[str]
    seed_synced: ClassVar[bool] = False
    # the settings of ``config.METHOD_SETTINGS`` this method reads; another one set away from
    # its default is an error (``check``)
    settings: ClassVar[frozenset[str]] = frozenset()
    # values of the settings it reads that it cannot run with, by setting
    refuses: ClassVar[dict[str, tuple]] = {}

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
        for key, values in cls.refuses.items():
            if getattr(cfg, key) in values:
                raise ConfigError(f"method={cls.name} cannot run with {key}={getattr(cfg, key)!r}")

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
        if blown_up(replies):
            raise Diverged(f"every client's {kind.__name__} is not finite")
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


