"""Training methods, one module each; every module exposes ``build`` and ``step``."""

from __future__ import annotations

from types import ModuleType

from hosfl.methods import hosfl, sfl

METHODS: dict[str, ModuleType] = {"hosfl": hosfl, "sfl-v1": sfl}


def get(name: str) -> ModuleType:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} (valid: {', '.join(METHODS)})")
    return METHODS[name]
