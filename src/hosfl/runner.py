"""The driver: build a federation from a Config, train it, evaluate, and write the run folder.

Run folder:
    config.toml      the resolved config (``hosfl run --config`` reads it back)
    metrics.jsonl    one line per step ("train") and per evaluation ("eval")
    history.jsonl    HO-SFL only: (seeds, v̄) per step, the complete log of the client model
    client_init.pt   the client weights before step 0 (replay starts here)
    checkpoint.pt    weights and optimizer states, rewritten at every evaluation
    summary.json     final accuracy, bytes by direction and payload type, wall time
"""

from __future__ import annotations

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

from hosfl import checkpoint, methods, tasks
from hosfl.config import Config, ConfigError
from hosfl.data.partition import histogram, split
from hosfl.engines.local import LocalEngine
from hosfl.methods.base import Federation, Shard
from hosfl.metrics.ledger import ByteLedger
from hosfl.metrics.memory import LiveTensorMeter, tensor_bytes
from hosfl.protocol import Message, ProtocolError

# Methods whose client model moves only by (seeds, v̄) broadcasts: their history.jsonl
# replays the client part from client_init.pt.
REPLAYABLE = ("hosfl", "hosl", "zo-sfl")


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
    client: nn.Module, server: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000
) -> tuple[float, float]:
    """Accuracy and mean loss of server(client(x)) in eval mode."""
    was = client.training, server.training
    client.eval(), server.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(x), batch):
        logits = server(client(x[i : i + batch]))
        correct += int((logits.argmax(1) == y[i : i + batch]).sum())
        loss += float(nn.functional.cross_entropy(logits, y[i : i + batch], reduction="sum"))
    client.train(was[0]), server.train(was[1])
    return correct / len(x), loss / len(x)


def prepare_out(out: str, prefix: str) -> Path:
    """The run folder: ``out`` if it is new or empty (never one that holds files), else a new
    ``runs/<prefix>-<time>``."""
    if out:
        folder = Path(out)
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise ConfigError(f"out={out!r} already exists and is not empty; choose another folder")
    else:
        base = Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
        folder, n = base, 1
        while folder.exists():
            folder, n = Path(f"{base}-{n}"), n + 1
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def build(cfg: Config) -> tuple[Federation, tuple[torch.Tensor, torch.Tensor], list[np.ndarray]]:
    """Data, partitions and the method's federation for ``cfg``; nothing is written."""
    try:
        task = tasks.get(cfg.task)
        method = methods.get(cfg.method)
        client_model, server_model = task.split_model(cfg.cut, cfg.seed)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    x, y = task.load("train", cfg.train_subset)
    test = task.load("test", cfg.test_subset)
    try:
        parts = split(
            cfg.partition, y.numpy(), cfg.clients, cfg.seed, cfg.alpha, cfg.shards_per_client
        )
        shards = [Shard(m, x, y, idx, cfg.seed) for m, idx in enumerate(parts)]
        fed = method.build(cfg, client_model, server_model, shards, task.classes)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return fed, test, [y.numpy(), *parts]


def _print_histogram(labels: np.ndarray, parts: list[np.ndarray], classes: int) -> None:
    counts = histogram(labels, parts, classes)
    print("client  " + " ".join(f"{c:>5}" for c in range(classes)) + "  total")
    for m, row in enumerate(counts):
        print(f"{m:>6}  " + " ".join(f"{n:>5}" for n in row) + f"  {row.sum():>5}")


def _state(cfg: Config, fed: Federation, step: int) -> dict:
    state = {
        "config": cfg.to_dict(),
        "step": step,
        "client": fed.client_model.state_dict(),
        "server": fed.server_model.state_dict(),
    }
    if getattr(fed.server, "optimizer", None) is not None:
        state["server_optimizer"] = fed.server.optimizer.state_dict()
    if fed.client_optimizer is not None:
        state["client_optimizer"] = fed.client_optimizer.state_dict()
    return state


def _finite(loss: float | None, update: Message | None) -> bool:
    """False once the loss or the step's update holds NaN or infinity."""
    if loss is not None and not math.isfinite(loss):
        return False
    try:
        update is None or update.validate()
    except ProtocolError:
        return False
    return True


@torch.no_grad()
def inference_peak(model: nn.Module, shard: Shard, batch_size: int) -> int:
    """Peak live tensor bytes of one plain forward of ``model`` on a client batch: what a
    client that only runs inference needs on top of its weights."""
    x, _ = shard.batch(0, batch_size)
    with LiveTensorMeter() as meter:
        model(x)
    return meter.peak


def run(cfg: Config, log=print) -> RunResult:
    """Train ``cfg`` in-process and write its run folder; returns the final figures."""
    cfg.validate()
    fed, (x_test, y_test), (labels, *parts) = build(cfg)
    out = prepare_out(cfg.out, cfg.method)
    (out / "config.toml").write_text(cfg.to_toml())
    checkpoint.save(
        out / "client_init.pt",
        {"config": cfg.to_dict(), "step": 0, "client": fed.client_model.state_dict(), "server": {}},
    )
    d_c = sum(p.numel() for p in fed.client_model.parameters() if p.requires_grad)
    d_s = sum(p.numel() for p in fed.server_model.parameters() if p.requires_grad)
    log(
        f"hosfl {cfg.method}: task={cfg.task} cut={cfg.cut} M={cfg.clients} K={cfg.sampled} "
        f"B={cfg.batch_size} P={cfg.P} steps={cfg.steps} d_c={d_c} d_s={d_s} -> {out}"
    )
    if log is print:
        _print_histogram(labels, parts, int(labels.max()) + 1)

    holds = tensor_bytes(fed.client_holds)
    infer_peak = holds + inference_peak(fed.client_holds, fed.clients[0].shard, cfg.batch_size)
    ledger = ByteLedger()
    # Client memory is measured at step 1 (step 0 if there is only one): a step like any other.
    engine = LocalEngine(fed.clients, ledger, measure_step=min(1, cfg.steps - 1))
    method = methods.get(cfg.method)
    history = checkpoint.HistoryWriter(out / "history.jsonl") if cfg.method in REPLAYABLE else None
    metrics = open(out / "metrics.jsonl", "w", encoding="utf-8")
    start = time.perf_counter()
    acc = float("nan")
    diverged = None
    bar = tqdm(
        range(cfg.steps), disable=not cfg.progress, file=sys.stderr, unit="step", dynamic_ncols=True
    )
    try:
        for t in bar:
            loss, update = method.step(t, fed.server, engine)
            if not _finite(loss, update):
                diverged = t + 1
                log(
                    f"hosfl: training diverged at step {diverged} (loss {loss}); stopped, the "
                    f"last checkpoint is kept. Lower client_lr or server_lr."
                )
                break
            if history is not None:
                history.append(t, update.seeds.tolist(), update.values.tolist())
            row = {
                "event": "train",
                "step": t + 1,
                "loss": loss,
                "bytes_up": ledger.total("up"),
                "bytes_down": ledger.total("down"),
            }
            metrics.write(json.dumps(row) + "\n")
            last = t + 1 == cfg.steps
            if last or (cfg.eval_every and (t + 1) % cfg.eval_every == 0):
                acc, test_loss = evaluate(fed.client_model, fed.server_model, x_test, y_test)
                row = {
                    "event": "eval",
                    "step": t + 1,
                    "test_acc": acc,
                    "test_loss": test_loss,
                    "bytes": ledger.total(),
                    "wall_s": time.perf_counter() - start,
                }
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                checkpoint.save(out / "checkpoint.pt", _state(cfg, fed, t + 1))
            if last or t % 10 == 0 or (cfg.eval_every and (t + 1) % cfg.eval_every == 0):
                shown = {} if loss is None else {"loss": f"{loss:.3f}"}
                bar.set_postfix(**shown, acc=f"{acc:.4f}", refresh=False)
    finally:
        metrics.close()
        if history is not None:
            history.close()
        bar.close()
    wall = time.perf_counter() - start
    summary = {
        "method": cfg.method,
        "test_acc": acc,
        "steps": cfg.steps,
        "sampled": cfg.sampled,
        "wall_s": wall,
        "d_c": d_c,
        "d_s": d_s,
        "bytes": ledger.as_dict(),
        "client_peak_bytes": holds + engine.client_peak_bytes,
        "client_inference_peak_bytes": infer_peak,
        "client_ms_per_step": engine.client_ms_per_step(cfg.sampled),
        "diverged_at": diverged,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    done = diverged - 1 if diverged else cfg.steps
    return RunResult(out, acc, done, wall, ledger, fed.client_model, fed.server_model, summary)


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


def load_models(state: dict) -> tuple[Config, nn.Module, nn.Module]:
    """The config and the (client, server) models a checkpoint describes, weights loaded."""
    try:
        cfg = Config.from_dict(state["config"], source="checkpoint config").validate()
        client, server = tasks.get(cfg.task).split_model(cfg.cut, cfg.seed)
        client.load_state_dict(state["client"])
        if state["server"]:
            server.load_state_dict(state["server"])
    except (ConfigError, ValueError, RuntimeError, TypeError, AttributeError) as e:
        reason = str(e).splitlines()[0]
        raise checkpoint.CheckpointError(f"checkpoint does not fit its task: {reason}") from None
    return cfg, client, server


def evaluate_checkpoint(path: str | Path) -> tuple[float, float, int]:
    """(accuracy, loss, step) of a checkpoint on its task's test set."""
    state = checkpoint.load(path)
    cfg, client, server = load_models(state)
    x, y = tasks.get(cfg.task).load("test", cfg.test_subset)
    acc, loss = evaluate(client, server, x, y)
    return acc, loss, int(state["step"])
