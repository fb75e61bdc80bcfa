"""What a run leaves in its folder as it goes: metrics rows (train, eval, events, divergence),
checkpoints, and the summary at the end. The training loop (``loop.py``) says what happened;
this file decides how it is written."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from hosfl import checkpoint, runfolder
from hosfl.config import Config
from hosfl.metrics.ledger import ByteLedger


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def strict_json(value: Any, **kw: Any) -> str:
    """JSON that every parser reads: NaN and infinities (a diverged run's accuracy, a loss
    that overflowed) are written as null."""
    return json.dumps(_finite(value), allow_nan=False, **kw)


class Recorder:
    """The run folder's writer for one run or resume (``metrics.jsonl`` opened from ``start``
    on a resume: the rows after the checkpoint are replaced, never the ones before)."""

    def __init__(
        self, cfg: Config, out: Path, ledger: ByteLedger, start: int, resumed: bool,
        wall_before: float, log, metric_key: str = "test_acc", told: bool = False,
    ) -> None:  # fmt: skip
        self.cfg, self.out, self.ledger, self.log = cfg, out, ledger, log
        self.metric_key, self.told = metric_key, told  # told: callbacks read each row
        self.metrics = runfolder.open_metrics(out / "metrics.jsonl", start if resumed else None)
        self.wall_before, self.started = wall_before, time.perf_counter()
        self.rejected = 0

    def wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.started

    def row(self, row: dict[str, Any]) -> None:
        self.metrics.write(strict_json(row) + "\n")

    def events(self, rows: list[dict], when: str = "") -> None:
        """Rows of what the method or the engine did (dropped contributions, resyncs...)."""
        for row in rows:
            self.row(row)
            self.rejected += row["event"] == "reject"
            what = "dropped client" if row["event"] == "reject" else "client"
            at = when or f"step {row['step']}"
            self.log(f"hosfl: {at}: {what} {row['client']}: {row['reason']}")

    def reported(self, row: dict[str, Any]) -> dict[str, Any]:
        """``row`` written, and in the file where callbacks are told of it (only then)."""
        self.row(row)
        if self.told:
            self.metrics.flush()
        return row

    def train(self, step: int, loss: float | None) -> dict[str, Any]:
        return self.reported({
            "event": "train", "step": step, "loss": loss, "bytes_up": self.ledger.total("up"),
            "bytes_down": self.ledger.total("down"), "wall_s": round(self.wall(), 4)})  # fmt: skip

    def evaluation(self, step: int, value: float, loss: float) -> dict[str, Any]:
        """The task's metric (under ``metric_key``) and loss on the test set at ``step``."""
        return self.reported({"event": "eval", "step": step, self.metric_key: value,
                              "test_loss": loss, "bytes": self.ledger.total(),
                              "wall_s": self.wall()})  # fmt: skip

    def diverged(self, step: int, cause: str) -> None:
        self.log(
            f"hosfl: training diverged at step {step}: {cause}; stopped, the last checkpoint is "
            "kept (learning rates, mu, or the clients' inputs are the usual causes)."
        )
        self.row({"event": "diverged", "step": step, "cause": cause})

    def snapshot(self, state: dict[str, Any]) -> None:
        """checkpoint.pt, after the metrics it accounts for are on disk."""
        self.metrics.flush()
        checkpoint.save(
            self.out / "checkpoint.pt",
            {**state, "ledger": self.ledger.as_dict(), "wall_s": self.wall()},
        )

    def summary(self, summary: dict[str, Any]) -> None:
        runfolder.write_atomic(self.out / "summary.json", strict_json(summary, indent=2) + "\n")

    def close(self) -> None:
        self.metrics.close()
