"""Training methods, one module each; every module exposes ``build`` and ``step``."""

from __future__ import annotations

from types import ModuleType

from hosfl.methods import fedavg, frozen, hosfl, hosl, sfl, sfl_v2, zo_fl, zo_sfl

METHODS: dict[str, ModuleType] = {
    "hosfl": hosfl,
    "sfl-v1": sfl,
    "sfl-v2": sfl_v2,
    "zo-sfl": zo_sfl,
    "hosl": hosl,
    "fedavg": fedavg,
    "zo-fl": zo_fl,
    "frozen": frozen,
}


def get(name: str) -> ModuleType:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} (valid: {', '.join(METHODS)})")
    return METHODS[name]
