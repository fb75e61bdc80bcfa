"""Where clients run: one file an engine, one line each in ``ENGINES``.

Every engine is built for a run by ``EngineClass.for_run(run)`` (``RunContext``: the config,
the federation, the ledger, the measured step, the journal, the run folder, the log) and is a
context manager (``with engine:`` lets its clients go on every path). Engines whose packages
are optional are imported only when chosen.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hosfl.config import Config, ConfigError

# name -> (import path, the install command that brings what it needs)
ENGINES: dict[str, tuple[str, str]] = {
    "local": ("hosfl.engines.local:LocalEngine", "pip install hosfl"),
    "ray": ("hosfl.engines.ray:RayEngine", "pip install 'hosfl[ray]'"),
    "net": ("hosfl.engines.net:NetEngine", "pip install 'hosfl[serve]'"),
}


@dataclass
class RunContext:
    """What an engine is built from."""

    cfg: Config
    fed: Any  # runner.Federation: the method (the server) and its in-process client roles
    ledger: Any  # metrics.ledger.ByteLedger
    measure_step: int | None
    journal: Any  # journal.Journal, or None for methods without a record
    out: Path
    log: Any


def get(name: str) -> type:
    """The engine class of ``name``; a ConfigError naming the install it needs."""
    if name not in ENGINES:
        raise ConfigError(f"engine={name!r}: must be one of {', '.join(ENGINES)}")
    path, install = ENGINES[name]
    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise ConfigError(f"engine={name} needs a missing package ({e}): {install}") from None
