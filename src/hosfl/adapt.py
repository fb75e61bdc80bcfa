"""What of a model trains: frozen parameters by name, and LoRA adapters (peft) on the client
part, the server part or both. A frozen parameter is never perturbed, never updated and never
counted in d_c or d_s: zeroth-order probes and optimizers see only ``requires_grad``."""

from __future__ import annotations

import copy

import torch
from torch import nn

from hosfl.packages import need


def freeze(model: nn.Module, names: str) -> None:
    """Freeze every parameter whose name contains one of the comma-separated ``names``."""
    parts = [n.strip() for n in names.split(",") if n.strip()]
    for name, p in model.named_parameters():
        if any(part in name for part in parts):
            p.requires_grad_(False)


def lora(model: nn.Module, rank: int, alpha: float, targets: str, seed: int) -> nn.Module:
    """Insert LoRA adapters (Hu et al. 2022) into the modules whose names end with one of the
    comma-separated ``targets``; only the adapters train afterwards. Adapter A is drawn from
    ``seed`` (B starts at zero, so the model's function is unchanged at step 0)."""
    peft = need("peft", "pip install 'hosfl[pretrained]'")
    wanted = [t.strip() for t in targets.split(",") if t.strip()]
    names = [n for n, _ in model.named_modules() if any(n.endswith(t) for t in wanted)]
    if not names:
        raise ValueError(f"lora_targets={targets!r}: no module of this part has such a name")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=names)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = peft.inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def merged(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every LoRA adapter merged into the weight it adapts and the
    wrapper removed: the module tree, and the state dict's keys, of the model before ``lora``."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if hasattr(module, "merge") and hasattr(module, "get_base_layer"):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    module.get_base_layer())  # fmt: skip
    return model
