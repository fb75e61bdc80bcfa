"""The driver: build a federation from a Config, train it, evaluate, and write the run folder.

Run folder:
    config.toml      the resolved config (``hosfl run --config`` reads it back)
    metrics.jsonl    one line per step ("train") and per evaluation ("eval")
    journal.sqlite   HO-SFL, HOSL, ZO-SFL: (seeds, v̄) per step, the complete log of the client
                     model, committed before each step's update leaves the server
    client_init.pt   the client weights before step 0 (replay starts here)
    checkpoint.pt    weights, optimizer states and byte ledger, rewritten every snapshot_every
                     steps and at every evaluation (``hosfl resume`` continues from it)
    summary.json     the final metric, bytes by direction and payload type, wall time
    tensorboard/, mlflow.db   the trackers ``log_to`` names (``hosfl.trackers``)
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hosfl import checkpoint, devices, engines, loop, methods, runfolder, tasks, trackers
from hosfl.callbacks import Callback
from hosfl.config import Config, ConfigError
from hosfl.data import source
from hosfl.data.partition import histogram
from hosfl.journal import Journal
from hosfl.methods.base import ClientRole, Method
from hosfl.methods.shard import Shard
from hosfl.metrics.ledger import ByteLedger
from hosfl.tasks.base import Task, metric_key


@dataclass
class Federation:
    """A method (the server) and its client roles, as one run builds them."""

    server: Method
    clients: list[ClientRole]
    task: Task

    @property
    def client_model(self) -> nn.Module:
        return self.server.client_model

    @property
    def server_model(self) -> nn.Module:
        return self.server.server_model


@dataclass
class RunResult:
    out: Path
    metric: float  # the task's metric at the end (``metric_name``: accuracy by default)
    steps: int
    wall_s: float
    ledger: ByteLedger
    client_model: nn.Module
    server_model: nn.Module  # what the metric ran (the server's average where kept)
    summary: dict

    @property
    def metric_name(self) -> str:
        return self.summary.get("metric", "accuracy")

    @property
    def accuracy(self) -> float:
        """The final accuracy, for a task whose metric is accuracy."""
        if self.metric_name != "accuracy":
            raise AttributeError(f"this run's metric is {self.metric_name}: use .metric")
        return self.metric


@torch.no_grad()
def evaluate(
    client: nn.Module, server: nn.Module, task: Task, data: source.Data, batch: int = 1000
) -> tuple[float, float]:
    """The task's metric and mean loss of server(client(x)) in eval mode, over ``data``. A
    metric that is a mean over examples (accuracy) is summed batch by batch; any other is
    computed once over all the outputs (gathered on the CPU)."""
    was = client.training, server.training
    client.eval(), server.eval()
    metric, loss, n = 0.0, 0.0, 0
    outputs, targets = [], []
    cdev, sdev = devices.of(client), devices.of(server)
    for x, y in source.batches(data, batch):
        out = server(devices.to(client(devices.to(x, cdev)), sdev))
        y = devices.to(y, sdev)
        if task.metric_is_mean:
            metric += task.metric(out, y) * len(y)
        else:
            outputs.append(out.float().cpu()), targets.append(y.cpu())
        loss += float(task.loss(out, y)) * len(y)
        n += len(y)
    client.train(was[0]), server.train(was[1])
    if not task.metric_is_mean:
        metric = task.metric(torch.cat(outputs), torch.cat(targets)) * n
    return metric / n, loss / n


def build(cfg: Config) -> tuple[Federation, source.Data, list[np.ndarray]]:
    """Data, partitions and the method's federation for ``cfg``; nothing is written."""
    try:
        method_class = methods.get(cfg.method)
        method_class.check(cfg)  # a setting the method does not read: an error, not ignored
        task, client_model, server_model = tasks.prepare(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    # in-process the clients' part lives on the client device; under Ray the driver's copy is
    # the server's record of θ_c, beside the server part
    server_device = cfg.device_of("server")
    client_device = cfg.device_of("client") if cfg.engine == "local" else server_device
    client_model.to(client_device)
    server_model.to(server_device)
    train = task.load("train", cfg.train_subset)
    test = task.load("test", cfg.test_subset)
    labels = source.targets(train)
    _check_data(task, client_model, server_model, train, labels)
    try:
        parts = task.partition(cfg, train)
        largest = max(len(p) for p in parts)
        if cfg.batch_size > largest:
            raise ValueError(
                f"batch_size={cfg.batch_size}: no client holds that many examples (at most "
                f"{largest}); lower batch_size"
            )
        method = method_class(cfg, client_model, server_model, task)
        clients = [
            method.client(Shard(m, train, idx, cfg.seed, client_device))
            for m, idx in enumerate(parts)
        ]
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return Federation(method, clients, task), test, [labels.numpy(), *parts]


@torch.no_grad()
def _check_data(task: Task, client: nn.Module, server: nn.Module, train, labels) -> None:
    """Data mistakes found before anything is written, each a one-line ConfigError naming
    the fix: labels outside the task's classes, float targets for a classification loss, and
    any label the model's output and the loss cannot take (one forward of that example)."""
    if task.classes and labels.is_floating_point():
        raise ConfigError(
            f"the training targets are floats, but {task.name} is a classification of "
            f"{task.classes} classes (cross-entropy): give integer labels, or classes=0 with a "
            "regression loss (for example loss=torch.nn.functional.mse_loss)"
        )
    if task.classes and len(labels) and (labels.min() < 0 or labels.max() >= task.classes):
        bad = int(((labels < 0) | (labels >= task.classes)).sum())
        raise ConfigError(
            f"{bad} training label(s) outside 0..{task.classes - 1} (from {int(labels.min())} to "
            f"{int(labels.max())}): {task.name} has {task.classes} classes; fix the labels or "
            "give classes="
        )
    if not len(labels):
        return
    # the example holding the largest label (of a sequence target, its largest entry)
    i = 0 if labels.is_floating_point() else int(labels.reshape(len(labels), -1).amax(1).argmax())
    x, y = source.take(train, [i])
    was = client.training, server.training
    client.eval(), server.eval()
    out = None
    try:
        out = server(devices.to(client(devices.to(x, devices.of(client))), devices.of(server)))
        task.loss(out, devices.to(y, out.device))
    except (IndexError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        shape = "" if out is None else f" of shape {tuple(out.shape)}"
        raise ConfigError(
            f"the loss cannot take the model's output{shape} for training example {i} (target "
            f"{y.tolist()}): {first}; check that the model's last layer has as many outputs as "
            "there are classes, and the targets' type"
        ) from None
    finally:
        client.train(was[0]), server.train(was[1])


def _print_histogram(labels: np.ndarray, parts: list[np.ndarray], classes: int) -> None:
    counts = histogram(labels, parts, classes)
    print("client  " + " ".join(f"{c:>5}" for c in range(classes)) + "  total")
    for m, row in enumerate(counts):
        print(f"{m:>6}  " + " ".join(f"{n:>5}" for n in row) + f"  {row.sum():>5}")


def run(cfg: Config, log=print, callbacks: Sequence[Callback] = ()) -> RunResult:
    """Train ``cfg`` and write its run folder; returns the final figures. ``callbacks``
    (``hosfl.callbacks``) are called at each step, evaluation, checkpoint and the end, after
    the trackers ``cfg.log_to`` names."""
    cfg.validate()
    # an unknown engine or a missing package is an error before anything is written
    if engines.get(cfg.engine).remote:
        _remote_task(cfg)
    fed, test, (labels, *parts) = build(cfg)
    hooks = [*trackers.from_config(cfg), *callbacks]  # a missing tracker: before the folder
    out = runfolder.prepare(cfg.out, cfg.method)
    with runfolder.locked(out):
        # config.toml first and whole (a folder holding it is a run folder), then the start
        runfolder.write_atomic(out / "config.toml", cfg.to_toml())
        checkpoint.save(out / "client_init.pt", _initial(cfg, fed))
        if log is print and fed.task.classes:
            _print_histogram(labels, parts, fed.task.classes)
        return _train(cfg, fed, test, out, 0, ByteLedger(cfg.cut_dtype), 0.0, log, hooks)


def _train(
    cfg: Config, fed: Federation, test, out: Path, start: int, ledger: ByteLedger,
    wall_before: float, log, hooks: Sequence[Callback], resumed: bool = False,
) -> RunResult:  # fmt: skip
    summary = loop.train(cfg, fed, test, out, start, ledger, wall_before, log, resumed, evaluate,
                         list(hooks))  # fmt: skip
    diverged = summary["diverged_at"]
    done = diverged - 1 if diverged else summary["stopped_at"] or cfg.steps
    return RunResult(out, summary[metric_key(summary["metric"])], done, summary["wall_s"],
                     ledger, fed.client_model, fed.server.evaluated_server, summary)  # fmt: skip


def _initial(cfg: Config, fed: Federation) -> dict:
    return {
        "config": cfg.to_dict(),
        "step": 0,
        "client": fed.client_model.state_dict(),
        "server": fed.server_model.state_dict(),
    }


def resume(
    folder: str | Path, log=print, legacy: bool = False, callbacks: Sequence[Callback] = ()
) -> RunResult:
    """Continue the run in ``folder`` from its last checkpoint to ``steps``; the steps redone
    are checked against the journal (the same (seeds, v̄), bit for bit), and the final weights
    are those an uninterrupted run reaches. Everything is checked before anything is written:
    a resume that fails leaves the folder as it was."""
    folder = Path(folder)
    if not (folder / "config.toml").is_file():
        raise checkpoint.CheckpointError(f"{folder} is not a run folder (no config.toml)")
    with runfolder.locked(folder):
        return _resume(folder, log, legacy, callbacks)


def _resume(folder: Path, log, legacy: bool, callbacks: Sequence[Callback]) -> RunResult:
    cfg = Config.load(folder / "config.toml", [f"out={folder}"])
    last, init = folder / "checkpoint.pt", folder / "client_init.pt"
    fresh = not last.is_file() and not init.is_file()  # killed before its first checkpoint
    state = None if fresh else checkpoint.load(last if last.is_file() else init, legacy)
    if state is not None:
        try:
            saved = Config.from_dict(state["config"], source="checkpoint config").to_dict()
        except ConfigError as e:
            raise checkpoint.CheckpointError(f"{last}: {e}") from None
        # the folder is where the run is, whatever its files say of ``out`` (it may be moved)
        here = {**Config.load(folder / "config.toml").to_dict(), "out": ""}
        if {**saved, "out": ""} != here:
            raise checkpoint.CheckpointError(f"{last} belongs to another config than {folder}")
    start = 0 if state is None else state["step"]
    if start >= cfg.steps:
        raise checkpoint.CheckpointError(f"{folder} is complete ({start} of {cfg.steps} steps)")
    fed, test, _ = build(cfg)
    hooks = [*trackers.from_config(cfg), *callbacks]
    if state is not None and start == 0:  # client_init.pt: the weights, the initial state
        _load(fed.client_model, state["client"], init)
    elif state is not None:
        try:
            fed.server.load_state_dict(state)
        except (ValueError, RuntimeError, KeyError, TypeError, AttributeError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise checkpoint.CheckpointError(
                f"{last} does not fit {cfg.method}: {reason}"
            ) from None
        record = fed.server.record
        if record is not None and record.synced().step != start:
            raise checkpoint.CheckpointError(
                f"{last}: the client replica is at step {record.synced().step}, the "
                f"checkpoint at step {start}"
            )
    journal = folder / "journal.sqlite"
    if fed.server.record is not None and start > 0:
        if not journal.is_file():
            raise checkpoint.CheckpointError(f"{journal} is missing: the run cannot be checked")
        with contextlib.closing(Journal(journal, create=False, legacy=legacy)) as j:
            j.verify(start, cfg.P)  # every row the checkpoint rests on
    ledger = ByteLedger.from_dict(state.get("ledger", {}) if state else {}, cfg.cut_dtype)
    if fresh:
        checkpoint.save(init, _initial(cfg, fed))
    log(f"hosfl: resuming {folder} at step {start} of {cfg.steps}")
    wall = float(state.get("wall_s", 0.0)) if state else 0.0
    return _train(cfg, fed, test, folder, start, ledger, wall, log, hooks, resumed=True)


def _load(model: nn.Module, weights: dict, path: Path) -> None:
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise checkpoint.CheckpointError(f"{path} does not fit its task: {reason}") from None


def _remote_task(cfg: Config) -> None:
    """Client processes build the task from the config: it must be importable there."""
    if cfg.task not in tasks.BUILT_IN and ":" not in cfg.task:
        raise ConfigError(
            f"engine={cfg.engine}: every client process builds task={cfg.task!r} from the "
            "config; give it as an import path (package.module:factory) the clients can import"
        )


def summary_table(result: RunResult) -> str:
    """The end-of-run table: the task's metric, steps, wall time, bytes by direction and payload."""
    lines = [
        f"{'test ' + result.metric_name:<24}{result.metric:>14.4f}",
        f"{'steps':<24}{result.steps:>14}",
        f"{'wall time (s)':<24}{result.wall_s:>14.1f}",
    ]
    for direction, counts in result.ledger.as_dict().items():
        for payload, n in counts.items():
            lines.append(f"{f'bytes {direction}: {payload}':<24}{n:>14,}")
        lines.append(f"{f'bytes {direction}: total':<24}{sum(counts.values()):>14,}")
    lines.append(f"{'run folder':<24}{str(result.out):>14}")
    width = max(len(s) for s in lines)
    return "\n".join(["-" * width, *lines, "-" * width])


def load_models(state: dict) -> tuple[Config, nn.Module, nn.Module, Task]:
    """The config, the (client, server) models a checkpoint describes, weights loaded, and
    the task. The server is the part the run evaluates: its average where the run keeps one
    (``server_average``)."""
    try:
        cfg = Config.from_dict(state["config"], source="checkpoint config").validate()
        task, client, server = tasks.prepare(cfg)
        client.load_state_dict(state["client"])
        if state["server"]:
            server.load_state_dict(state.get("server_average") or state["server"])
    except (ConfigError, ValueError, RuntimeError, TypeError, AttributeError) as e:
        reason = str(e).splitlines()[0]
        raise checkpoint.CheckpointError(f"checkpoint does not fit its task: {reason}") from None
    return cfg, client, server, task


def evaluate_checkpoint(
    path: str | Path, legacy: bool = False
) -> tuple[float, float, int, str]:
    """(metric, loss, step, the metric's name) of a checkpoint on its task's test set."""
    state = checkpoint.load(path, legacy)
    cfg, client, server, task = load_models(state)
    if state["step"] > cfg.steps:
        raise checkpoint.CheckpointError(f"{path}: step {state['step']} of a {cfg.steps}-step run")
    value, loss = evaluate(client, server, task, task.load("test", cfg.test_subset))
    return value, loss, int(state["step"]), task.metric_name
