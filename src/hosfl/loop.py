"""The training loop of one run or resume: the engine, the journal hook, the steps, the
evaluations, and the summary. ``runner.py`` builds what it trains; ``recording.py`` writes
what it reports."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm import tqdm

from hosfl import checkpoint, devices, engines
from hosfl.callbacks import Callback, Hooks, RunInfo
from hosfl.config import Config
from hosfl.journal import Journal
from hosfl.methods.base import Diverged
from hosfl.methods.shard import Shard
from hosfl.metrics.ledger import ByteLedger
from hosfl.metrics.memory import meter, tensor_bytes
from hosfl.protocol import Message, ProtocolError
from hosfl.recording import Recorder
from hosfl.runfolder import read_metrics
from hosfl.tasks.base import metric_key, metric_label

if TYPE_CHECKING:
    from hosfl.runner import Federation


def finite(update: Message) -> bool:
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


def journal_hook(journal: Journal | None):
    """What runs before a step's update leaves the server: refuse a non-finite one and log it
    durably (a step redone on resume must give the logged bits)."""

    def commit(update: Message) -> None:
        if not finite(update):
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

    return commit


def _seen(out: Path, resumed: bool) -> dict[str, int]:
    """The last train and eval steps a crashed run already reported (its rows in force)."""
    if not resumed or not (out / "metrics.jsonl").is_file():
        return {}
    rows, _ = read_metrics(out / "metrics.jsonl")
    return {event: max((r["step"] for r in rows if r.get("event") == event), default=-1)
            for event in ("train", "eval")}  # fmt: skip


def train(
    cfg: Config, fed: Federation, test, out: Path, start: int, ledger: ByteLedger,
    wall_before: float, log, resumed: bool, evaluate, callbacks: list[Callback],
) -> dict:  # fmt: skip
    """Steps ``start``..``steps`` of ``fed``; returns the summary (also written). The metrics
    are opened once the engine stands (its clients joined): a start that fails writes nothing.
    ``callbacks`` see each row once the file holds it; one may stop the run after a step."""
    devices.keep_freed_memory()  # forwards that fault no freed pages in again
    method = fed.server
    task = fed.task
    info = RunInfo(cfg, out, task.metric_name, metric_key(task.metric_name),
                   task.higher_is_better, start, resumed)  # fmt: skip
    hooks = Hooks(info, callbacks, _seen(out, resumed))
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
    journal = (Journal(out / "journal.sqlite", durable=cfg.engine != "local")
               if method.record is not None else None)  # fmt: skip
    # Client memory is measured at step 1 (step 0 if there is only one): a step like any other.
    run = engines.RunContext(cfg, fed, ledger, min(1, cfg.steps - 1), journal, out, log)
    acc, diverged, cause, stopped = float("nan"), None, "", None
    try:
        engine = engines.get(cfg.engine).for_run(run)
    except BaseException:
        if journal is not None:
            journal.close()
        raise
    rec = Recorder(cfg, out, ledger, start, resumed, wall_before, log, info.metric_key,
                   told=bool(callbacks))  # fmt: skip
    # a resume redoes the journaled steps, each checked against its row: no checkpoint is
    # written before they all are, so a resume that fails on one leaves checkpoint.pt as it was
    redone = journal.end if journal is not None and resumed else 0
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not cfg.progress,
               file=sys.stderr, unit="step", dynamic_ncols=True)  # fmt: skip
    metric = metric_label(info.metric)  # the progress bar's

    def evaluation(step: int) -> float:
        value, test_loss = evaluate(fed.client_model, method.evaluated_server, task, test)
        hooks.row(rec.evaluation(step, value, test_loss))
        return value

    try:
        with engine:
            engine.before_broadcast = journal_hook(journal)
            hooks.start()
            if start == 0 and cfg.eval_every:  # the curve's first point: the model untrained
                evaluation(0)  # not the run's result: a run that diverges at once has none
            for t in bar:
                try:
                    loss, _ = method.step(t, engine)
                except Diverged as e:
                    loss, cause = float("nan"), str(e)
                rec.events(method.events() + engine.events)
                engine.events.clear()
                if loss is not None and not math.isfinite(loss):
                    diverged, cause = t + 1, cause or f"the server's training loss is {loss}"
                    rec.diverged(diverged, cause)
                    break
                hooks.row(rec.train(t + 1, loss))
                last = t + 1 == cfg.steps
                evaluate_now = last or (cfg.eval_every and (t + 1) % cfg.eval_every == 0)
                if evaluate_now:
                    acc = evaluation(t + 1)
                due = evaluate_now or (cfg.snapshot_every and (t + 1) % cfg.snapshot_every == 0)
                if (due or info.stopped) and t + 1 >= redone:
                    if journal is not None:
                        journal.sync()  # a checkpoint's steps are on disk before it is
                    rec.snapshot({"config": cfg.to_dict(), "step": t + 1, **method.state_dict()})
                    hooks.checkpoint(t + 1)
                if last or t % 10 == 0 or evaluate_now:
                    shown = {} if loss is None else {"loss": f"{loss:.3f}"}
                    if not math.isnan(acc):  # no acc=nan before the first evaluation
                        shown[metric] = f"{acc:.4f}"
                    bar.set_postfix(**shown, refresh=False)
                if info.stopped and t + 1 >= redone:
                    stopped = t + 1
                    log(f"hosfl: stopped at step {stopped}: {info.stopped}; `hosfl resume "
                        f"{out}` continues it")  # fmt: skip
                    break
            engine.close()
            rec.events(engine.events, when="end")  # the final check of every replica
    except Exception as e:
        if resumed:  # what this resume wrote is withdrawn: the rows before it are in force again
            rec.row({"event": "resume-failed", "step": start, "reason": str(e)[:300]})
        raise
    finally:
        rec.close()
        if journal is not None:
            journal.close()
        bar.close()
    client_lr = method.client_lr  # zo_lr_rule=output sets it during the run
    summary = {
        "method": cfg.method,
        "engine": cfg.engine,
        "metric": info.metric,
        "higher_is_better": info.higher_is_better,
        info.metric_key: acc,
        "steps": cfg.steps,
        "sampled": cfg.sampled,
        "wall_s": rec.wall(),
        "d_c": d_c,
        "d_s": d_s,
        "client_lr": client_lr if client_lr is not None else cfg.client_lr,
        "bytes": rec.ledger.as_dict(),
        "client_peak_bytes": holds + engine.client_peak_bytes,
        "client_inference_peak_bytes": infer_peak,
        "client_ms_per_step": engine.client_ms_per_step(cfg.sampled),
        # a step's exchanges in order, with bytes and compute (in-process engine): timelines
        "exchanges": exchanges.as_list() if (exchanges := getattr(engine, "exchanges", None))
        else None,
        "diverged_at": diverged,
        "diverged_cause": cause or None,
        "stopped_at": stopped,
        "stopped_by": info.stopped if stopped else None,
        "clients_in_sync": engine.verified,
        # client processes (engine=ray/net): the largest one's peak resident memory, and the
        # bytes the network transport counted in its frames
        "client_peak_rss": getattr(engine, "client_peak_rss", None),
        "wire_bytes": getattr(engine, "wire_bytes", None),
        "rejected": rec.rejected,
    }
    rec.summary(summary)
    hooks.end(summary)
    return summary
