"""What every task provides to the federation."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hosfl import adapt
from hosfl import cut as cutting
from hosfl.data import source
from hosfl.data.partition import split


def accuracy(output: torch.Tensor, target: torch.Tensor) -> float:
    """The fraction of examples whose highest output is their label."""
    return float((output.argmax(1) == target).float().mean())


def metric_key(name: str) -> str:
    """Where a metric goes in eval rows and summaries: ``test_acc`` for accuracy (as ever),
    ``test_<name>`` for any other."""
    return "test_acc" if name == "accuracy" else f"test_{name}"


def metric_label(name: str) -> str:
    """A metric's short name in tables and the progress bar: ``acc`` for accuracy."""
    return "acc" if name == "accuracy" else name


class Task(ABC):
    """A dataset, a model with named cut points, and the objective: ``loss(output, target)``
    (a scalar tensor, the batch mean) and ``metric(output, target)`` (a float over the
    examples given), named ``metric_name`` with its direction. Cross-entropy and accuracy
    unless a task says otherwise. A metric that is a mean over examples (``metric_is_mean``)
    is computed batch by batch; any other once, over the whole test set's outputs."""

    name: str
    classes: int  # 0: targets are not class labels (no label checks, no label partitions)
    cuts: tuple[str, ...]  # valid cut points, earliest first ("encoder.2" names stage encoder_2)
    defaults: dict[str, Any] = {}  # config values of this task where the user sets none
    metric_name: str = "accuracy"
    higher_is_better: bool = True
    metric_is_mean: bool = True

    @abstractmethod
    def load(self, split: str, limit: int = 0) -> source.Data:
        """``split`` ('train' or 'test'): (inputs, targets) tensors or a map-style Dataset."""

    @abstractmethod
    def build(self, seed: int) -> nn.Module:
        """The whole model, initialised from ``seed``."""

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target)

    def metric(self, output: torch.Tensor, target: torch.Tensor) -> float:
        return accuracy(output, target)

    def assemble(self, cut: str, seed: int, client: nn.Module, server: nn.Module) -> nn.Module:
        """The whole model with the weights of trained ``client`` and ``server`` parts, keyed
        as ``build(seed)``'s: the stages joined again."""
        return nn.Sequential(OrderedDict([*client.named_children(), *server.named_children()]))

    def sources(self, limit: int = 0) -> np.ndarray | None:
        """Where each training example comes from (partition=by-source), if the data says."""
        return None

    def partition(self, cfg: Any, train: source.Data) -> list[np.ndarray]:
        """The training indices of each of ``cfg.clients`` clients."""
        labels = source.targets(train)
        if cfg.partition in ("dirichlet", "shards") and not self.classes:
            raise ValueError(f"partition={cfg.partition} needs class labels; {self.name} has none")
        return split(
            cfg.partition,
            labels.numpy(),
            cfg.clients,
            cfg.seed,
            cfg.alpha,
            cfg.shards_per_client,
            self.sources(cfg.train_subset),
        )

    def split_model(self, cut: str, seed: int) -> tuple[nn.Module, nn.Module]:
        """Client part = stages up to and including ``cut``; server part = the rest."""
        if cut not in self.cuts:
            raise ValueError(
                f"cut={cut!r} is not a cut point of {self.name} (valid: {', '.join(self.cuts)})"
            )
        stages = list(self.build(seed).named_children())
        at = [n for n, _ in stages].index(cut.replace(".", "_")) + 1
        return nn.Sequential(OrderedDict(stages[:at])), nn.Sequential(OrderedDict(stages[at:]))


class ModelTask(Task):
    """A task from a user's own parts, through the public API (``hosfl.ModelTask``).

        task = hosfl.ModelTask(model, cut="layer2", train=train_set, test=test_set)

    - the model: one ``nn.Module`` and a ``cut`` (the name of the last module the client
      holds, as in ``model.named_modules()``; any model torch.fx can trace, Sequential or not),
      or ``client=`` and ``server=`` modules. A Hugging Face ``transformers`` model of a family
      that ``tasks.transformer`` knows is cut by layer instead (``cut=2``, ``"layer.1"``, or a
      layer's module name): the attention mask and positions cross with the hidden states,
      and a pretrained one (``from_pretrained``) has ``zo_lr_rule=lesser`` by default.
      The weights are used as given: every run starts from a copy of them.
    - the data: (inputs, targets) tensors or any map-style ``Dataset`` for ``train`` and
      ``test``, partitioned among the clients by the config's partitioner; or ``train`` as a
      list of datasets, one per client, as they already are (then clients = their number).
    - the objective: ``loss(output, target)`` and ``metric(output, target)``; cross-entropy
      and accuracy when not given. A metric is computed once over the whole test set's outputs
      (R², F1 and AUC are not means of batches), named ``metric_name`` (the function's name
      when not given) with ``higher_is_better``. ``classes=0`` for targets that are not class
      labels.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        cut: str | int = "",
        *,
        client: nn.Module | None = None,
        server: nn.Module | None = None,
        train: Any,
        test: Any,
        loss: Any = None,
        metric: Any = None,
        metric_name: str | None = None,
        higher_is_better: bool = True,
        classes: int | None = None,
        name: str = "custom",
        defaults: dict[str, Any] | None = None,
    ) -> None:
        if (model is None) == (client is None or server is None):
            raise ValueError("give either model= and cut=, or client= and server=")
        transformer = model is not None and hasattr(getattr(model, "config", None), "model_type")
        if transformer:
            from hosfl.tasks.transformer import cut_at  # cut by layer: the mask travels

            client, server = cut_at(model, cut)
        elif model is not None:
            client, server = cutting.split(model, cut)  # checked now, copied per run
        self._parts, self._model = (client, server), model  # the parts share its modules
        self.name, self.cut = name, "given" if cut == "" else str(cut)
        self.cuts = (self.cut,)
        self.per_client = isinstance(train, list)
        if self.per_client:
            own = [source.check(d, f"train[{i}]") for i, d in enumerate(train)]
            self._shards = np.split(
                np.arange(sum(map(source.size, own))), np.cumsum([source.size(d) for d in own])[:-1]
            )
            train = torch.utils.data.ConcatDataset(
                [torch.utils.data.TensorDataset(*d) if isinstance(d, tuple) else d for d in own]
            )
        self._data = {"train": source.check(train, "train"), "test": source.check(test, "test")}
        self._loss, self._metric = loss or F.cross_entropy, metric or accuracy
        self.metric_is_mean = self._metric is accuracy
        name = metric_name or getattr(self._metric, "__name__", "")
        self.metric_name = name if name.isidentifier() and name != "<lambda>" else "metric"
        self.higher_is_better = higher_is_better
        if classes is None:
            labels = source.targets(self._data["train"])
            classes = int(labels.max()) + 1 if not labels.is_floating_point() else 0
        self.classes = classes
        self.defaults = {
            "cut": self.cut,
            # pretrained weights (from_pretrained): the rate rule of the built-in pretrained
            # tasks (docs/FINDINGS.md); a fixed rate wrecks them, the output rule alone
            # collapsed MiniLM cut at layers 0 and 3, the dimension rule alone hurt
            # EfficientNet's conv_head
            **({"zo_lr_rule": "lesser"} if transformer and model.name_or_path else {}),
            **({"clients": len(self._shards)} if self.per_client else {}),
            **(defaults or {}),
        }

    def load(self, split: str, limit: int = 0) -> source.Data:
        return source.limit(self._data[split], limit)

    def build(self, seed: int) -> nn.Module:
        return nn.Sequential(*copy.deepcopy(self._parts))

    def split_model(self, cut: str, seed: int) -> tuple[nn.Module, nn.Module]:
        if cut != self.cut:
            raise ValueError(f"cut={cut!r}: {self.name} is cut at {self.cut!r}")
        client, server = copy.deepcopy(self._parts)  # one deepcopy: parts share nothing
        return client, server

    def assemble(self, cut: str, seed: int, client: nn.Module, server: nn.Module) -> nn.Module:
        """The user's own model (a copy) with the trained weights, keyed as the original (and
        the parts' LoRA adapters where they are not merged); with
        ``client=``/``server=`` parts, the two as ``Sequential(client, server)``."""
        if self._model is None:
            return nn.Sequential(OrderedDict([("client", client), ("server", server)]))
        model, mine, theirs = copy.deepcopy((self._model, *self._parts))  # sharing kept
        adapt.load_trained(mine, client)
        adapt.load_trained(theirs, server)
        return model

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._loss(output, target)

    def metric(self, output: torch.Tensor, target: torch.Tensor) -> float:
        return float(self._metric(output, target))

    def partition(self, cfg: Any, train: source.Data) -> list[np.ndarray]:
        if not self.per_client:
            return super().partition(cfg, train)
        if cfg.clients != len(self._shards):
            raise ValueError(f"clients={cfg.clients}: {self.name} has {len(self._shards)} clients")
        return list(self._shards)
