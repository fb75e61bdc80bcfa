"""Checkpoints, written so that a crash never leaves a half file, and read so that a damaged
one is never used.

A checkpoint is a ``torch.save`` dict of plain tensors and numbers, read back with
``weights_only=True`` (no unpickling of arbitrary objects). It carries a BLAKE2b digest of its
own contents (every key, number, string and tensor byte, in a fixed order), recomputed on every
load: one flipped bit anywhere in a tensor is an error, not different weights. Then its shape is
checked: a non-negative integer step, a config table, ``client`` and ``server`` tables of
tensors.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

FORMAT = "hosfl-checkpoint-2"
_OLD = "hosfl-checkpoint-1"  # written before digests: read, shape-checked, not digest-checked
_KEYS = ("format", "config", "step", "client", "server")


class CheckpointError(RuntimeError):
    """A checkpoint or history file that is missing, corrupt or of the wrong kind."""


def _feed(h: Any, value: Any) -> None:
    """Hash ``value`` canonically: its type, then its contents."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for k in sorted(value, key=repr):
            _feed(h, k)
            _feed(h, value[k])
    elif isinstance(value, list | tuple):
        h.update(f"L{len(value)}".encode())
        for v in value:
            _feed(h, v)
    else:
        h.update(f"{type(value).__name__}:{value!r}".encode())


def digest(state: dict[str, Any]) -> str:
    h = hashlib.blake2b(digest_size=16)
    _feed(h, {k: v for k, v in state.items() if k != "digest"})
    return h.hexdigest()


def save(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename)."""
    state = {"format": FORMAT, **state}
    state["digest"] = digest(state)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: str | Path, legacy: bool = False) -> dict[str, Any]:
    """A checkpoint, checked (its digest, keys, types). One written before checkpoints had a
    digest is refused unless ``legacy`` (then its digest is what is not checked)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt: {reason}") from None
    if not isinstance(state, dict) or state.get("format") not in (FORMAT, _OLD):
        raise CheckpointError(f"{path} is not a {FORMAT} file")
    if state["format"] == _OLD and not legacy:
        raise CheckpointError(
            f"checkpoint {path} was written before checkpoints carried a digest, so its contents "
            "cannot be checked: refused (--legacy takes it without that check)"
        )
    missing = [k for k in _KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    if state["format"] == FORMAT and state.get("digest") != digest(state):
        raise CheckpointError(f"checkpoint {path} is corrupt: its contents do not match its digest")
    step = state["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"checkpoint {path}: step {step!r} is not an integer >= 0")
    if not isinstance(state["config"], dict):
        raise CheckpointError(f"checkpoint {path}: its config is not a table")
    for part in ("client", "server"):
        if not isinstance(state[part], dict) or not all(
            isinstance(v, torch.Tensor) for v in state[part].values()
        ):
            raise CheckpointError(f"checkpoint {path}: {part!r} is not a table of tensors")
    return state
