"""Hooks into a run: ``hosfl.run(cfg, callbacks=[...])`` and ``hosfl.resume(folder,
callbacks=[...])``.

A callback subclasses ``Callback`` and overrides the hooks it needs. Each hook gets the run's
``RunInfo`` and the row just written to ``metrics.jsonl`` (the same dict), so a callback sees
what the run folder holds. ``run.stop(reason)`` from any hook ends the run cleanly after the
current step: a checkpoint is written, the summary says who stopped it, and ``hosfl resume``
continues it later. The trackers (``log_to=tensorboard,mlflow``, ``hosfl.trackers``) are
callbacks like any other.

Across a crash and its resume every step and evaluation reaches the hooks once: a resume
re-runs the steps after its checkpoint (checked against the journal) without calling the
hooks for the rows ``metrics.jsonl`` already held.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hosfl.config import Config


@dataclass
class RunInfo:
    """What a callback may know of the run it is in."""

    cfg: Config
    out: Path
    metric: str  # the task's metric: "accuracy" (logged as test_acc), "r2", ...
    metric_key: str  # its key in the eval rows and the summary
    higher_is_better: bool
    start: int  # the first step of this run or resume
    resumed: bool
    stopped: str | None = None

    @property
    def name(self) -> str:
        """The run's name: its folder's."""
        return self.out.name

    def stop(self, reason: str) -> None:
        """End the run after the current step (with a checkpoint: it can be resumed)."""
        self.stopped = self.stopped or reason


class Callback:
    """Override the hooks you need; each returns nothing and may call ``run.stop``."""

    def on_start(self, run: RunInfo) -> None:
        """Before the first step of a run or of a resume."""

    def on_train(self, run: RunInfo, row: dict[str, Any]) -> None:
        """After each step: ``{"step", "loss", "bytes_up", "bytes_down", "wall_s"}``."""

    def on_eval(self, run: RunInfo, row: dict[str, Any]) -> None:
        """After each evaluation: ``{"step", run.metric_key, "test_loss", "bytes", "wall_s"}``
        (step 0: the model before training)."""

    def on_checkpoint(self, run: RunInfo, step: int, path: Path) -> None:
        """After ``checkpoint.pt`` is written for ``step``."""

    def on_end(self, run: RunInfo, summary: dict[str, Any]) -> None:
        """After ``summary.json`` is written (also after a divergence or a stop)."""


class StopAt(Callback):
    """Stops the run at the first evaluation after step 0 whose metric reaches ``target`` (at
    least it, or at most it where lower is better)."""

    def __init__(self, target: float) -> None:
        self.target = target

    def on_eval(self, run: RunInfo, row: dict[str, Any]) -> None:
        value = row[run.metric_key]
        if row["step"] == 0 or value is None or math.isnan(value):
            return
        if value >= self.target if run.higher_is_better else value <= self.target:
            run.stop(f"{run.metric} {value:.4f} reached the target {self.target} at step "
                     f"{row['step']}")  # fmt: skip


class Hooks:
    """The callbacks of one run, called in order; rows at or before ``seen`` (steps a crashed
    run already reported) are not reported again."""

    def __init__(self, run: RunInfo, callbacks: list[Callback], seen: dict[str, int]) -> None:
        self.run, self.callbacks, self.seen = run, callbacks, seen

    def start(self) -> None:
        for cb in self.callbacks:
            cb.on_start(self.run)

    def row(self, row: dict[str, Any]) -> None:
        event = row["event"]
        if event not in ("train", "eval") or row["step"] <= self.seen.get(event, -1):
            return
        for cb in self.callbacks:
            (cb.on_train if event == "train" else cb.on_eval)(self.run, row)

    def checkpoint(self, step: int) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint(self.run, step, self.run.out / "checkpoint.pt")

    def end(self, summary: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_end(self.run, summary)
