"""The server's durable log of client-model updates: RUN/journal.sqlite.

One row per step: the step's P seeds (int32) and averaged scalars v̄ (float32), stored as raw
little-endian bytes so that reading them back gives the same bits, and a BLAKE2b check of
(step, seeds, v̄) so that a damaged row is found, not replayed. A row is committed (SQLite,
synchronous=FULL) before the step's update leaves the server, so an update any client has seen
is on disk. In-process (``durable=False``) the clients die with the server, so no update
outlives a crash: rows are committed with each checkpoint (``sync``, before it is written) and
at the end, and a crash loses only steps that a resume redoes from the checkpoint anyway.
The journal is everything a client needs to catch up or a server needs to rebuild θ_c:
``zo.replay_`` over its rows from the initial (or a snapshot's) client weights.

Opened with ``create=False`` the file must exist and already be a journal: nothing is written
to it until a row is appended (a replay or a refused resume leaves it as it was).
"""

from __future__ import annotations

import hashlib
import math
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from hosfl.checkpoint import CheckpointError

Entry = tuple[torch.Tensor, torch.Tensor]  # (seeds int32 [P], v̄ float32 [P])


def _check(step: int, seeds: bytes, vbar: bytes) -> bytes:
    return hashlib.blake2b(step.to_bytes(8, "little") + seeds + vbar, digest_size=8).digest()


class Journal:
    def __init__(
        self, path: str | Path, create: bool = True, legacy: bool = False, durable: bool = True
    ) -> None:
        self.path, self.durable = Path(path), durable
        if not create and not self.path.is_file():
            raise CheckpointError(f"{self.path} does not exist")
        try:
            if create:
                self.db = sqlite3.connect(self.path, isolation_level=None)
                self.db.execute("PRAGMA synchronous=FULL")
                self.db.execute(
                    "CREATE TABLE IF NOT EXISTS steps (step INTEGER PRIMARY KEY, "
                    "seeds BLOB NOT NULL, vbar BLOB NOT NULL, checksum BLOB)"
                )
            else:
                uri = f"file:{self.path.resolve()}?mode=rw"
                self.db = sqlite3.connect(uri, uri=True, isolation_level=None)
                self.db.execute("PRAGMA synchronous=FULL")
            columns = [r[1] for r in self.db.execute("PRAGMA table_info(steps)")]
            if not columns:
                raise CheckpointError(f"{self.path} is not a journal (no steps table)")
            self._checked = "checksum" in columns  # journals of earlier releases have none
            if not self._checked and not (legacy or create):  # read for a resume or a replay
                raise CheckpointError(
                    f"{self.path} was written before journal rows carried checksums, so its rows "
                    "cannot be checked: refused (--legacy takes it without that check)"
                )
            (self._end,) = self.db.execute("SELECT COUNT(*) FROM steps").fetchone()
            (top,) = self.db.execute("SELECT MAX(step) FROM steps").fetchone()
        except sqlite3.DatabaseError as e:
            raise CheckpointError(f"{self.path} is not a journal: {e}") from None
        if self._end and top != self._end - 1:
            raise CheckpointError(f"{self.path} has gaps: {self._end} rows, last step {top}")

    @property
    def end(self) -> int:
        """The number of steps logged (the next step to log)."""
        return self._end

    def append(self, step: int, seeds: torch.Tensor, vbar: torch.Tensor) -> None:
        if step != self._end:
            raise CheckpointError(f"journal {self.path} is at step {self._end}, not {step}")
        s, v = _blob(seeds, "<i4"), _blob(vbar, "<f4")
        if not self.durable and not self.db.in_transaction:
            self.db.execute("BEGIN")  # committed by sync
        if self._checked:
            self.db.execute(
                "INSERT INTO steps VALUES (?, ?, ?, ?)", (step, s, v, _check(step, s, v))
            )
        else:
            self.db.execute("INSERT INTO steps VALUES (?, ?, ?)", (step, s, v))
        self._end += 1

    def entries(self, start: int = 0, stop: int | None = None, probes: int = 0) -> Iterator[Entry]:
        """The (seeds, v̄) of steps start..stop-1, in order, each row checked (its checksum,
        whole 4-byte values, as many seeds as scalars, ``probes`` of each if given, finite
        scalars); a damaged row raises CheckpointError naming it."""
        stop = self._end if stop is None else stop
        if not 0 <= start <= stop <= self._end:
            raise CheckpointError(
                f"journal {self.path} holds steps 0..{self._end - 1}, not {start}..{stop - 1}"
            )
        cols = "step, seeds, vbar" + (", checksum" if self._checked else "")
        try:
            rows = self.db.execute(
                f"SELECT {cols} FROM steps WHERE step >= ? AND step < ? ORDER BY step",
                (start, stop),
            ).fetchall()
        except sqlite3.DatabaseError as e:
            raise CheckpointError(f"journal {self.path} is damaged: {e}") from None
        for expected, row in enumerate(rows, start):
            step, seeds, vbar = row[:3]
            why = None
            if step != expected:
                why = f"holds step {step}"
            elif not (isinstance(seeds, bytes) and isinstance(vbar, bytes)):
                why = "is not binary"
            elif self._checked and row[3] != _check(step, seeds, vbar):
                why = "fails its checksum"
            elif len(seeds) % 4 or len(vbar) % 4 or len(seeds) != len(vbar) or not seeds:
                why = f"has {len(seeds)} bytes of seeds and {len(vbar)} of scalars"
            elif probes and len(seeds) != 4 * probes:
                why = f"has {len(seeds) // 4} probes, not {probes}"
            if why is None:
                values = _tensor(vbar, "<f4", torch.float32)
                if not all(math.isfinite(v) for v in values.tolist()):
                    why = "holds a non-finite scalar"
            if why is not None:
                raise CheckpointError(f"journal {self.path}: row {expected} {why}")
            yield _tensor(seeds, "<i4", torch.int32), values

    def verify(self, stop: int, probes: int) -> None:
        """Check every row of steps 0..stop-1; CheckpointError at the first damaged one."""
        if self._end < stop:
            raise CheckpointError(f"journal {self.path} has {self._end} steps, not {stop}")
        for _ in self.entries(0, stop, probes):
            pass

    def entry(self, step: int) -> Entry:
        return next(self.entries(step, step + 1))

    def sync(self) -> None:
        """Commit the rows appended since the last commit (``durable=False``)."""
        if self.db.in_transaction:
            self.db.execute("COMMIT")

    def close(self) -> None:
        self.sync()
        self.db.close()


def _blob(t: torch.Tensor, dtype: str) -> bytes:
    return t.detach().cpu().numpy().astype(dtype, copy=False).tobytes()


def _tensor(blob: bytes, dtype: str, torch_dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(blob, dtype=dtype).copy()).to(torch_dtype)
