"""The server's durable log of client-model updates: RUN/journal.sqlite.

One row per step: the step's P seeds (int32) and averaged scalars v̄ (float32), stored as raw
little-endian bytes so that reading them back gives the same bits. A row is committed (SQLite,
synchronous=FULL) before the step's update leaves the server, so an update any client has seen
is on disk. The journal is everything a client needs to catch up or a server needs to rebuild
θ_c: ``zo.replay_`` over its rows from the initial (or a snapshot's) client weights.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from hosfl.checkpoint import CheckpointError

Entry = tuple[torch.Tensor, torch.Tensor]  # (seeds int32 [P], v̄ float32 [P])


class Journal:
    def __init__(self, path: str | Path, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise CheckpointError(f"{self.path} does not exist")
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None)
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS steps "
                "(step INTEGER PRIMARY KEY, seeds BLOB NOT NULL, vbar BLOB NOT NULL)"
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
        row = (step, _blob(seeds, "<i4"), _blob(vbar, "<f4"))
        self.db.execute("INSERT INTO steps VALUES (?, ?, ?)", row)
        self._end += 1

    def entries(self, start: int = 0, stop: int | None = None) -> Iterator[Entry]:
        """The (seeds, v̄) of steps start..stop-1, in order."""
        stop = self._end if stop is None else stop
        if not 0 <= start <= stop <= self._end:
            raise CheckpointError(
                f"journal {self.path} holds steps 0..{self._end - 1}, not {start}..{stop - 1}"
            )
        rows = self.db.execute(
            "SELECT step, seeds, vbar FROM steps WHERE step >= ? AND step < ? ORDER BY step",
            (start, stop),
        )
        for expected, (step, seeds, vbar) in enumerate(rows, start):
            if step != expected or len(seeds) != len(vbar):
                raise CheckpointError(f"journal {self.path}: row {expected} is damaged")
            yield _tensor(seeds, "<i4", torch.int32), _tensor(vbar, "<f4", torch.float32)

    def entry(self, step: int) -> Entry:
        return next(self.entries(step, step + 1))

    def close(self) -> None:
        self.db.close()


def _blob(t: torch.Tensor, dtype: str) -> bytes:
    return t.detach().cpu().numpy().astype(dtype, copy=False).tobytes()


def _tensor(blob: bytes, dtype: str, torch_dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(blob, dtype=dtype).copy()).to(torch_dtype)
