"""The driver: build a federation from a Config, train it, evaluate, and write the run folder.

Run folder:
    config.toml      the resolved config (``hosfl run --config`` reads it back)
    metrics.jsonl    one line per step ("train") and per evaluation ("eval")
    journal.sqlite   HO-SFL, HOSL, ZO-SFL: (seeds, v̄) per step, the complete log of the client
                     model, committed before each step's update leaves the server
    client_init.pt   the client weights before step 0 (replay starts here)
    checkpoint.pt    weights, optimizer states and byte ledger, rewritten every snapshot_every
                     steps and at every evaluation (``hosfl resume`` continues from it)
    summary.json     final accuracy, bytes by direction and payload type, wall time
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from hosfl import checkpoint, devices, methods, runfolder, tasks
from hosfl.config import Config, ConfigError
from hosfl.data import source
from hosfl.data.partition import histogram
from hosfl.engines.local import LocalEngine
from hosfl.journal import Journal
from hosfl.methods.base import ClientRole, Diverged, Method, Shard
from hosfl.metrics.ledger import ByteLedger
from hosfl.metrics.memory import meter, tensor_bytes
from hosfl.protocol import Message, ProtocolError
from hosfl.tasks.base import Task


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
    accuracy: float
    steps: int
    wall_s: float
    ledger: ByteLedger
    client_model: nn.Module
    server_model: nn.Module
    summary: dict


@torch.no_grad()
def evaluate(
    client: nn.Module, server: nn.Module, task: Task, data: source.Data, batch: int = 1000
) -> tuple[float, float]:
    """The task's metric (accuracy by default) and mean loss of server(client(x)) in eval
    mode, over ``data``; batch means weighted by batch size."""
    was = client.training, server.training
    client.eval(), server.eval()
    metric, loss, n = 0.0, 0.0, 0
    cdev, sdev = devices.of(client), devices.of(server)
    for x, y in source.batches(data, batch):
        out = server(devices.to(client(devices.to(x, cdev)), sdev))
        y = devices.to(y, sdev)
        metric += task.metric(out, y) * len(y)
        loss += float(task.loss(out, y)) * len(y)
        n += len(y)
    client.train(was[0]), server.train(was[1])
    return metric / n, loss / n


def build(cfg: Config) -> tuple[Federation, source.Data, list[np.ndarray]]:
    """Data, partitions and the method's federation for ``cfg``; nothing is written."""
    try:
        method_class = methods.get(cfg.method)
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
    return Federation(method, clients, task), test, [source.targets(train).numpy(), *parts]


def _print_histogram(labels: np.ndarray, parts: list[np.ndarray], classes: int) -> None:
    counts = histogram(labels, parts, classes)
    print("client  " + " ".join(f"{c:>5}" for c in range(classes)) + "  total")
    for m, row in enumerate(counts):
        print(f"{m:>6}  " + " ".join(f"{n:>5}" for n in row) + f"  {row.sum():>5}")


def _state(cfg: Config, fed: Federation, step: int) -> dict:
    """The checkpoint: the config, the step, and the method's whole state (``client`` and
    ``server`` weights among it)."""
    return {"config": cfg.to_dict(), "step": step, **fed.server.state_dict()}


def _finite(update: Message) -> bool:
    """False if the step's update holds NaN or infinity."""
    try:
        update.validate()
    except ProtocolError:
        return False
    return True


@torch.no_grad()
def inference_peak(model: nn.Module, shard: Shard, batch_size: int) -> int:
    """Peak live tensor bytes of one plain forward of ``model`` on a client batch: what a
    client that only runs inference needs on top of its weights."""
    x, _ = shard.batch(0, batch_size)
    was = model.training
    model.eval()  # a metering forward must not move BatchNorm statistics
    with meter(x.device) as peak:
        model(x)
    model.train(was)
    return peak.peak


def run(cfg: Config, log=print) -> RunResult:
    """Train ``cfg`` and write its run folder; returns the final figures."""
    cfg.validate()
    if cfg.engine != "local":  # a missing package is an error before anything is written
        (_ray_engine if cfg.engine == "ray" else _net_engine)()
        _remote_task(cfg)
    fed, test, (labels, *parts) = build(cfg)
    out = runfolder.prepare(cfg.out, cfg.method)
    with runfolder.locked(out):
        # config.toml first and whole (a folder holding it is a run folder), then the start
        runfolder.write_atomic(out / "config.toml", cfg.to_toml())
        checkpoint.save(out / "client_init.pt", _initial(cfg, fed))
        if log is print and fed.task.classes:
            _print_histogram(labels, parts, fed.task.classes)
        return _train(cfg, fed, test, out, 0, ByteLedger(), 0.0, log)


def _initial(cfg: Config, fed: Federation) -> dict:
    return {
        "config": cfg.to_dict(),
        "step": 0,
        "client": fed.client_model.state_dict(),
        "server": fed.server_model.state_dict(),
    }


def resume(folder: str | Path, log=print) -> RunResult:
    """Continue the run in ``folder`` from its last checkpoint to ``steps``; the steps redone
    are checked against the journal (the same (seeds, v̄), bit for bit), and the final weights
    are those an uninterrupted run reaches. Everything is checked before anything is written:
    a resume that fails leaves the folder as it was."""
    folder = Path(folder)
    if not (folder / "config.toml").is_file():
        raise checkpoint.CheckpointError(f"{folder} is not a run folder (no config.toml)")
    with runfolder.locked(folder):
        return _resume(folder, log)


def _resume(folder: Path, log) -> RunResult:
    cfg = Config.load(folder / "config.toml", [f"out={folder}"])
    last, init = folder / "checkpoint.pt", folder / "client_init.pt"
    fresh = not last.is_file() and not init.is_file()  # killed before its first checkpoint
    state = None if fresh else checkpoint.load(last if last.is_file() else init)
    if state is not None:
        try:
            saved = Config.from_dict(state["config"], source="checkpoint config").to_dict()
        except ConfigError as e:
            raise checkpoint.CheckpointError(f"{last}: {e}") from None
        if saved != Config.load(folder / "config.toml").to_dict():
            raise checkpoint.CheckpointError(f"{last} belongs to another config than {folder}")
    start = 0 if state is None else state["step"]
    if start >= cfg.steps:
        raise checkpoint.CheckpointError(f"{folder} is complete ({start} of {cfg.steps} steps)")
    fed, test, _ = build(cfg)
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
        if fed.server.seed_synced and fed.server.synced().step != start:
            raise checkpoint.CheckpointError(
                f"{last}: the client replica is at step {fed.server.synced().step}, the "
                f"checkpoint at step {start}"
            )
    journal = folder / "journal.sqlite"
    if fed.server.seed_synced and start > 0:
        if not journal.is_file():
            raise checkpoint.CheckpointError(f"{journal} is missing: the run cannot be checked")
        with contextlib.closing(Journal(journal, create=False)) as j:
            j.verify(start, cfg.P)  # every row the checkpoint rests on
    ledger = ByteLedger.from_dict(state.get("ledger", {}) if state else {})
    if fresh:
        checkpoint.save(init, _initial(cfg, fed))
    log(f"hosfl: resuming {folder} at step {start} of {cfg.steps}")
    wall = float(state.get("wall_s", 0.0)) if state else 0.0
    return _train(cfg, fed, test, folder, start, ledger, wall, log, resumed=True)


def _load(model: nn.Module, weights: dict, path: Path) -> None:
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise checkpoint.CheckpointError(f"{path} does not fit its task: {reason}") from None


def _make_engine(
    cfg: Config, fed: Federation, ledger: ByteLedger, measure: int, journal, out: Path, log
):
    if cfg.engine == "ray":
        return _ray_engine()(cfg, fed.server, ledger, measure, journal)
    if cfg.engine == "net":
        return _net_engine()(cfg, fed.server, ledger, measure, journal, out, log)
    return LocalEngine(fed.clients, ledger, measure, batched=cfg.batched())


def _remote_task(cfg: Config) -> None:
    """Client processes build the task from the config: it must be importable there."""
    if cfg.task not in tasks.BUILT_IN and ":" not in cfg.task:
        raise ConfigError(
            f"engine={cfg.engine}: every client process builds task={cfg.task!r} from the "
            "config; give it as an import path (package.module:factory) the clients can import"
        )


def _net_engine() -> type:
    try:
        from hosfl.engines.net import NetEngine
    except ImportError as e:
        raise ConfigError(f"engine=net needs gRPC ({e}): pip install 'hosfl[serve]'") from None
    return NetEngine


def _ray_engine() -> type:
    try:
        from hosfl.engines.ray import RayEngine
    except ImportError as e:
        raise ConfigError(f"engine=ray needs Ray ({e}): pip install 'hosfl[ray]'") from None
    return RayEngine


def _train(
    cfg: Config,
    fed: Federation,
    test: tuple[torch.Tensor, torch.Tensor],
    out: Path,
    start: int,
    ledger: ByteLedger,
    wall_before: float,
    log,
    resumed: bool = False,
) -> RunResult:
    method = fed.server
    d_c = sum(p.numel() for p in fed.client_model.parameters() if p.requires_grad)
    d_s = sum(p.numel() for p in fed.server_model.parameters() if p.requires_grad)
    client_lr = method.client_lr
    log(
        f"hosfl {cfg.method}: task={cfg.task} cut={cfg.cut} M={cfg.clients} K={cfg.sampled} "
        f"B={cfg.batch_size} P={cfg.P} steps={cfg.steps} d_c={d_c} d_s={d_s} "
        f"client lr={client_lr if client_lr is not None else cfg.client_lr:.3g} "
        f"engine={cfg.engine} -> {out}"
    )
    holds = tensor_bytes(method.client_holds)
    infer_peak = holds + inference_peak(method.client_holds, fed.clients[0].shard, cfg.batch_size)
    journal = Journal(out / "journal.sqlite") if method.seed_synced else None  # created at 0
    # Client memory is measured at step 1 (step 0 if there is only one): a step like any other.
    engine = _make_engine(cfg, fed, ledger, min(1, cfg.steps - 1), journal, out, log)

    def commit(update: Message) -> None:
        """Runs before ``update`` leaves the server: refuse a non-finite one, log it durably
        (a step redone on resume must give the logged bits)."""
        if not _finite(update):
            raise Diverged("the step's update is not finite")
        if journal is None:
            return
        if update.step < journal.end:
            seeds, vbar = journal.entry(update.step)
            if not (torch.equal(seeds, update.seeds) and torch.equal(vbar, update.values)):
                raise checkpoint.CheckpointError(
                    f"step {update.step} redone differs from the journal: not the same run"
                )
        else:
            journal.append(update.step, update.seeds, update.values)

    engine.before_broadcast = commit
    metrics = runfolder.open_metrics(out / "metrics.jsonl", start if resumed else None)
    started = time.perf_counter()

    def wall() -> float:
        return wall_before + time.perf_counter() - started

    acc = float("nan")
    diverged, cause = None, ""
    rejected = 0
    bar = tqdm(
        range(start, cfg.steps),
        initial=start,
        total=cfg.steps,
        disable=not cfg.progress,
        file=sys.stderr,
        unit="step",
        dynamic_ncols=True,
    )
    try:
        for t in bar:
            try:
                loss, update = method.step(t, engine)
            except Diverged as e:
                loss, cause = float("nan"), str(e)
            rejections = method.rejections
            rejected += len(rejections)
            for row in rejections:
                metrics.write(json.dumps({"event": "reject", **row}) + "\n")
                log(f"hosfl: step {row['step']}: dropped client {row['client']}: {row['reason']}")
            rejections.clear()
            for row in engine.events:
                metrics.write(json.dumps(row) + "\n")
                log(f"hosfl: step {row['step']}: client {row['client']}: {row['reason']}")
            engine.events.clear()
            if loss is not None and not math.isfinite(loss):
                diverged = t + 1
                cause = cause or f"the server's training loss is {loss}"
                log(
                    f"hosfl: training diverged at step {diverged}: {cause}; stopped, the last "
                    "checkpoint is kept (learning rates, mu, or the clients' inputs are the "
                    "usual causes)."
                )
                metrics.write(json.dumps({"event": "diverged", "step": diverged, "cause": cause}))
                metrics.write("\n")
                break
            row = {
                "event": "train",
                "step": t + 1,
                "loss": loss,
                "bytes_up": ledger.total("up"),
                "bytes_down": ledger.total("down"),
                "wall_s": round(wall(), 4),
            }
            metrics.write(json.dumps(row) + "\n")
            last = t + 1 == cfg.steps
            evaluate_now = last or (cfg.eval_every and (t + 1) % cfg.eval_every == 0)
            if evaluate_now:
                acc, test_loss = evaluate(
                    fed.client_model, fed.server.evaluated_server, fed.task, test
                )
                row = {
                    "event": "eval",
                    "step": t + 1,
                    "test_acc": acc,
                    "test_loss": test_loss,
                    "bytes": ledger.total(),
                    "wall_s": wall(),
                }
                metrics.write(json.dumps(row) + "\n")
            if evaluate_now or (cfg.snapshot_every and (t + 1) % cfg.snapshot_every == 0):
                metrics.flush()
                state = _state(cfg, fed, t + 1)
                checkpoint.save(
                    out / "checkpoint.pt", {**state, "ledger": ledger.as_dict(), "wall_s": wall()}
                )
            if last or t % 10 == 0 or evaluate_now:
                shown = {} if loss is None else {"loss": f"{loss:.3f}"}
                bar.set_postfix(**shown, acc=f"{acc:.4f}", refresh=False)
        engine.close()
        for row in engine.events:  # the final check of every replica
            metrics.write(json.dumps(row) + "\n")
            log(f"hosfl: end: client {row['client']}: {row['reason']}")
    finally:
        metrics.close()
        if journal is not None:
            journal.close()
        bar.close()
    client_lr = method.client_lr  # zo_lr_rule=output sets it during the run
    summary = {
        "method": cfg.method,
        "engine": cfg.engine,
        "test_acc": acc,
        "steps": cfg.steps,
        "sampled": cfg.sampled,
        "wall_s": wall(),
        "d_c": d_c,
        "d_s": d_s,
        "client_lr": client_lr if client_lr is not None else cfg.client_lr,
        "bytes": ledger.as_dict(),
        "client_peak_bytes": holds + engine.client_peak_bytes,
        "client_inference_peak_bytes": infer_peak,
        "client_ms_per_step": engine.client_ms_per_step(cfg.sampled),
        "diverged_at": diverged,
        "diverged_cause": cause or None,
        "clients_in_sync": engine.verified,
        # client processes (engine=ray/net): the largest one's peak resident memory, and the
        # bytes the network transport counted in its frames
        "client_peak_rss": getattr(engine, "client_peak_rss", None),
        "wire_bytes": getattr(engine, "wire_bytes", None),
        "rejected": rejected,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    done = diverged - 1 if diverged else cfg.steps
    return RunResult(out, acc, done, wall(), ledger, fed.client_model, fed.server_model, summary)


def summary_table(result: RunResult) -> str:
    """The end-of-run table: accuracy, steps, wall time, bytes by direction and payload."""
    lines = [
        f"{'test accuracy':<24}{result.accuracy:>14.4f}",
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


def evaluate_checkpoint(path: str | Path) -> tuple[float, float, int]:
    """(accuracy, loss, step) of a checkpoint on its task's test set."""
    state = checkpoint.load(path)
    cfg, client, server, task = load_models(state)
    if state["step"] > cfg.steps:
        raise checkpoint.CheckpointError(f"{path}: step {state['step']} of a {cfg.steps}-step run")
    acc, loss = evaluate(client, server, task, task.load("test", cfg.test_subset))
    return acc, loss, int(state["step"])
