"""The run folder as a durable record: one process at a time, files replaced atomically,
metrics only ever appended.

- ``locked(folder)``: an exclusive ``flock`` on the folder itself for the lifetime of a run,
  resume or replay (no lock file is created, so a refused command changes nothing); the lock
  goes with the process, so a killed run never leaves a stale one.
- ``write_atomic``: a temporary file, fsync, rename: a reader sees the old or the new file.
- ``metrics.jsonl`` is appended to, never rewritten. A resume appends a ``resume`` row; the
  rows of steps after it that came before it are superseded (``read_metrics`` drops them) but
  stay in the file. A damaged line (cut by a crash, or garbled) is kept and reported.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hosfl.checkpoint import CheckpointError
from hosfl.config import ConfigError


class FolderInUse(CheckpointError):
    """Another process holds the run folder."""


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise CheckpointError(f"{folder}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderInUse(
                f"{folder} is in use by another hosfl process (run, resume or replay); "
                "wait for it to end"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare(out: str, prefix: str) -> Path:
    """The run folder: ``out`` if it is new or empty (never one that holds files), else a new
    ``runs/<prefix>-<time>``. An unwritable place is a ConfigError naming it."""
    if out:
        folder = Path(out)
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise ConfigError(f"out={out!r} already exists and is not empty; choose another folder")
    else:
        base = Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
        folder, n = base, 1
        while folder.exists():
            folder, n = Path(f"{base}-{n}"), n + 1
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"out={str(folder)!r}: cannot write a run folder there ({e.strerror})"
        ) from None
    return folder


def open_metrics(path: Path, resumed_at: int | None):
    """``metrics.jsonl`` opened for appending; after a resume, a ``resume`` row first (on a
    line of its own even if a crash cut the last line short)."""
    cut = path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
    f = open(path, "a", encoding="utf-8")
    if cut:
        f.write("\n")
    if resumed_at is not None:
        f.write(json.dumps({"event": "resume", "step": resumed_at}) + "\n")
        f.flush()
    return f


def read_metrics(path: Path) -> tuple[list[dict], list[int]]:
    """The rows in force (those superseded by a resume left out) and the numbers of the
    damaged lines, which are skipped but never removed from the file."""
    rows: list[dict] = []
    before: list[list[dict]] = []  # the rows in force before each resume still standing
    damaged = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError
        except ValueError:
            damaged.append(n)
            continue
        if row.get("event") == "resume-failed" and before:
            rows = before.pop()  # a resume that failed changes nothing
            continue
        if row.get("event") == "resume" and isinstance(row.get("step"), int):
            before.append(rows)
            rows = [
                r for r in rows if not isinstance(r.get("step"), int) or r["step"] <= row["step"]
            ]
        rows.append(row)
    return rows, damaged
