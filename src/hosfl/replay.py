"""Rebuild a run's client model from its (seeds, v̄) history: audit, catch-up, recovery.

The replica is the method's own record (``Method.record``), so the optimizer and the effective
learning rate (``zo_lr_rule``) are exactly those the run used."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hosfl import checkpoint, methods, runfolder, zo
from hosfl.journal import Journal
from hosfl.runner import load_models


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


def replay_run(folder: str | Path, legacy: bool = False) -> ReplayReport:
    """Replay RUN's journal onto its initial client weights and compare with its checkpoint;
    the folder is locked against a run or resume meanwhile and nothing in it is written."""
    folder = Path(folder)
    if not folder.is_dir():
        raise checkpoint.CheckpointError(f"{folder} is not a run folder")
    with runfolder.locked(folder):
        return _replay(folder, legacy)


def _replay(folder: Path, legacy: bool) -> ReplayReport:
    path = folder / "journal.sqlite"
    if not path.is_file():
        synced = [n for n, m in methods.METHODS.items() if m.seed_synced]
        raise checkpoint.CheckpointError(
            f"{path} does not exist (only {', '.join(synced)} runs have one)"
        )
    final = checkpoint.load(folder / "checkpoint.pt", legacy)
    cfg, client, server, task = load_models(checkpoint.load(folder / "client_init.pt", legacy))
    method = methods.get(cfg.method)(cfg, client, server, task)
    replica = method.record
    journal = Journal(path, create=False, legacy=legacy)
    try:
        if journal.end < final["step"]:
            raise checkpoint.CheckpointError(
                f"{path} has {journal.end} steps, the checkpoint {final['step']}"
            )
        entries = journal.entries(0, final["step"], cfg.P)
        steps = zo.replay_(
            replica.params,
            ((s.tolist(), v.tolist()) for s, v in entries),
            cfg.mu,
            replica.optimizer,
            replica.directions,
        )
    finally:
        journal.close()
    # the parts the journal moves: the client part, and the server's too where a client
    # holds the whole model (zo-fl)
    parts = {"client": client}
    if method.client_holds is not method.client_model:
        parts["server"] = server
    live = {f"{k}.{n}": t for k in parts for n, t in final[k].items()}
    replayed = {f"{k}.{n}": t for k, m in parts.items() for n, t in m.state_dict().items()}
    if live.keys() != replayed.keys():
        raise checkpoint.CheckpointError("checkpoint and replayed model have different tensors")
    diff = max(float((live[k].double() - replayed[k].double()).abs().max()) for k in live)
    same = all(torch.equal(live[k], replayed[k]) for k in live)
    return ReplayReport(steps, len(live), same, diff)
