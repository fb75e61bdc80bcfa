"""Optional packages: import one, or say which install command brings it."""

from __future__ import annotations

import importlib
from typing import Any


class MissingPackage(RuntimeError):
    """A task, an engine or a plot needs a package that is not installed."""


def need(module: str, install: str) -> Any:
    """Import ``module`` or say which install command brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingPackage(f"this needs {module!r}: {install}") from None
