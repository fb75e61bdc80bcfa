"""The trained model of a run folder, whole again: ``hosfl.load(RUN)`` and ``hosfl export RUN
--out DIR``.

The client and server parts of the folder's last checkpoint (the averaged server where the
run keeps one, as evaluations use) are joined by the task (``Task.assemble``): a Hugging Face
model comes back as itself (``save_pretrained`` → ``AutoModel….from_pretrained(DIR)``), a
user's own model as a copy of it with its own state-dict keys, a built-in model as its stages.
LoRA adapters are merged into the weights they adapt, or kept (``merge=False``, ``hosfl export
--keep-lora``): a ``peft.PeftModel`` whose adapter folder (``DIR/lora``) loads with
``PeftModel.from_pretrained(AutoModel….from_pretrained(DIR), DIR / "lora")``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from hosfl import adapt, checkpoint, runfolder, tasks
from hosfl.runner import load_models
from hosfl.tasks.base import Task


def load(
    run: str | Path, task: Task | None = None, legacy: bool = False, merge: bool = True
) -> nn.Module:
    """The whole trained model of the run folder ``run``, in eval mode. A run of a task that
    was registered in Python needs that ``task`` (it is registered again under its name). A
    LoRA run's adapters are merged into their weights, or with ``merge=False`` kept: the model
    comes back as a ``peft.PeftModel`` of the same outputs."""
    path = Path(run) / "checkpoint.pt"
    if not path.is_file():
        raise checkpoint.CheckpointError(f"{run} holds no checkpoint.pt: not a run folder")
    state = checkpoint.load(path, legacy)
    if task is not None:
        tasks.register_task(task)
    cfg, client, server, task = load_models(state)
    lora = cfg.lora != "none"
    if lora and merge:
        client, server = adapt.merged(client), adapt.merged(server)
    whole = task.assemble(cfg.cut, cfg.seed, client, server)
    if lora and not merge:
        whole = adapt.kept(whole, cfg.lora_rank, cfg.lora_alpha)
    return whole.eval()


def export(
    run: str | Path, out: str | Path, task: Task | None = None, merge: bool = True
) -> Path:
    """Write the trained model of ``run`` into the new folder ``out``: a ``save_pretrained``
    folder for a ``transformers`` model, else ``model.pt`` (its state dict). A LoRA run with
    ``merge=False``: the base model there and its adapters in ``out/lora``. Returns ``out``."""
    model = load(run, task, merge=merge)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise checkpoint.CheckpointError(f"{out} exists and is not empty: nothing is overwritten")
    out.mkdir(parents=True, exist_ok=True)
    peft = sys.modules.get("peft")
    if peft is not None and isinstance(model, peft.PeftModel):  # adapters kept
        base = adapt.merged(model.get_base_model(), merge=False)
        _save(base, out)
        model.save_pretrained(out / "lora")
    else:
        _save(model, out)
    runfolder.write_atomic(out / "FROM", f"{Path(run).resolve()}\n")
    return out


def _save(model: nn.Module, out: Path) -> None:
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(out)
    else:
        torch.save(model.state_dict(), out / "model.pt.tmp")
        (out / "model.pt.tmp").replace(out / "model.pt")
