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


def _adapted(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The LoRA-wrapped modules of ``model`` with their names."""
    return [(n, m) for n, m in model.named_modules()
            if hasattr(m, "merge") and hasattr(m, "get_base_layer")]  # fmt: skip


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def merged(model: nn.Module, merge: bool = True) -> nn.Module:
    """A copy of ``model`` with every LoRA adapter merged into the weight it adapts (with
    ``merge=False``: dropped, the base weights as they were) and the wrapper removed: the
    module tree, and the state dict's keys, of the model before ``lora``."""
    model = copy.deepcopy(model)
    for name, module in _adapted(model):
        if merge:
            module.merge()
        _replace(model, name, module.get_base_layer())
    return model


def load_trained(into: nn.Module, trained: nn.Module) -> None:
    """Load ``trained``'s weights into ``into`` (a module of the same tree before ``lora``),
    first putting a copy of each of its LoRA-wrapped modules at the same name there: adapters
    that are not merged go where they were trained."""
    for name, module in _adapted(trained):
        if not name:
            raise ValueError("a LoRA adapter on the part itself cannot be carried")
        _replace(into, name, copy.deepcopy(module))
    into.load_state_dict(trained.state_dict())


def kept(model: nn.Module, rank: int, alpha: float) -> nn.Module:
    """``model`` (a whole model holding LoRA-wrapped modules) as a ``peft.PeftModel``: its base
    weights as they were, the trained adapters at the whole model's module names, so that
    ``save_pretrained`` writes an adapter folder that ``PeftModel.from_pretrained`` loads."""
    peft = need("peft", "pip install 'hosfl[pretrained]'")
    adapters = {n: copy.deepcopy(m) for n, m in _adapted(model)}
    base = merged(model, merge=False)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                             target_modules=sorted(adapters))  # fmt: skip
    out = peft.get_peft_model(base, config)
    inner = out.get_base_model()
    for name, trained in adapters.items():
        own = inner.get_submodule(name)
        for part in ("lora_A", "lora_B"):
            getattr(own, part).load_state_dict(getattr(trained, part).state_dict())
    return out
