"""Rebuild a run's client model from its (seeds, v̄) history: audit, catch-up, recovery."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hosfl import checkpoint, zo
from hosfl.journal import Journal
from hosfl.methods.base import make_optimizer
from hosfl.runner import REPLAYABLE, load_models


@dataclass
class ReplayReport:
    steps: int
    tensors: int
    identical: bool
    max_abs_diff: float

    def describe(self) -> str:
        verdict = (
            "bit-identical" if self.identical else f"DIFFERENT (max |Δ| {self.max_abs_diff:g})"
        )
        return (
            f"replayed {self.steps} steps of (seeds, v̄) onto the initial client weights: "
            f"{self.tensors} tensors {verdict} to the checkpoint"
        )


def replay_run(folder: str | Path) -> ReplayReport:
    folder = Path(folder)
    path = folder / "journal.sqlite"
    if not path.is_file():
        raise checkpoint.CheckpointError(
            f"{path} does not exist (only {', '.join(REPLAYABLE)} runs have one)"
        )
    final = checkpoint.load(folder / "checkpoint.pt")
    cfg, client, _ = load_models(checkpoint.load(folder / "client_init.pt"))
    params = zo.trainable(client)
    optimizer = make_optimizer(cfg.client_optimizer, params, cfg.client_lr, cfg.momentum)
    journal = Journal(path, create=False)
    try:
        if journal.end < final["step"]:
            raise checkpoint.CheckpointError(
                f"{path} has {journal.end} steps, the checkpoint {final['step']}"
            )
        entries = journal.entries(0, int(final["step"]))
        steps = zo.replay_(
            params,
            ((s.tolist(), v.tolist()) for s, v in entries),
            cfg.mu,
            optimizer,
            cfg.directions,
        )
    finally:
        journal.close()
    live = final["client"]
    replayed = client.state_dict()
    if live.keys() != replayed.keys():
        raise checkpoint.CheckpointError("checkpoint and replayed model have different tensors")
    diff = max(float((live[k].double() - replayed[k].double()).abs().max()) for k in live)
    same = all(torch.equal(live[k], replayed[k]) for k in live)
    return ReplayReport(steps, len(live), same, diff)
