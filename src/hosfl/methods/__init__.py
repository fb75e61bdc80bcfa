"""Training methods: one ``Method`` subclass per file, one line each in ``METHODS``.

A method added by a user is one class and one call: ``hosfl.methods.register(MyMethod)``.
"""

from __future__ import annotations

from hosfl.methods.base import ClientRole, Diverged, Method
from hosfl.methods.fedavg import FedAvg
from hosfl.methods.frozen import Frozen
from hosfl.methods.hosfl import HOSFL
from hosfl.methods.hosl import HOSL
from hosfl.methods.sfl import SplitFedV1
from hosfl.methods.sfl_v2 import SplitFedV2
from hosfl.methods.shard import Shard
from hosfl.methods.zo_fl import ZOFL
from hosfl.methods.zo_sfl import ZOSFL

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Make ``cls`` runnable as ``method=<cls.name>``."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register takes a Method subclass, not {cls!r}")
    METHODS[cls.name] = cls
    return cls


for _cls in (HOSFL, SplitFedV1, SplitFedV2, ZOSFL, HOSL, FedAvg, ZOFL, Frozen):
    register(_cls)


def get(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} (valid: {', '.join(METHODS)})")
    return METHODS[name]


__all__ = ["METHODS", "ClientRole", "Diverged", "Method", "Shard", "get", "register"]
