"""The trained model of a run folder, whole again: ``hosfl.load(RUN)`` and ``hosfl export RUN
--out DIR``.

The client and server parts of the folder's last checkpoint (the averaged server where the
run keeps one, as evaluations use) are joined by the task (``Task.assemble``): a Hugging Face
model comes back as itself (``save_pretrained`` → ``AutoModel….from_pretrained(DIR)``), a
user's own model as a copy of it with its own state-dict keys, a built-in model as its stages.
LoRA adapters are merged into the weights they adapt.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hosfl import adapt, checkpoint, runfolder, tasks
from hosfl.runner import load_models
from hosfl.tasks.base import Task


def load(run: str | Path, task: Task | None = None, legacy: bool = False) -> nn.Module:
    """The whole trained model of the run folder ``run``, in eval mode. A run of a task that
    was registered in Python needs that ``task`` (it is registered again under its name)."""
    path = Path(run) / "checkpoint.pt"
    if not path.is_file():
        raise checkpoint.CheckpointError(f"{run} holds no checkpoint.pt: not a run folder")
    state = checkpoint.load(path, legacy)
    if task is not None:
        tasks.register_task(task)
    cfg, client, server, task = load_models(state)
    if cfg.lora != "none":
        client, server = adapt.merged(client), adapt.merged(server)
    return task.assemble(cfg.cut, cfg.seed, client, server).eval()


def export(run: str | Path, out: str | Path, task: Task | None = None) -> Path:
    """Write the trained model of ``run`` into the new folder ``out``: a ``save_pretrained``
    folder for a ``transformers`` model, else ``model.pt`` (its state dict). Returns ``out``."""
    model = load(run, task)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise checkpoint.CheckpointError(f"{out} exists and is not empty: nothing is overwritten")
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(out)
    else:
        torch.save(model.state_dict(), out / "model.pt.tmp")
        (out / "model.pt.tmp").replace(out / "model.pt")
    runfolder.write_atomic(out / "FROM", f"{Path(run).resolve()}\n")
    return out
