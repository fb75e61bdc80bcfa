"""Experiment trackers, as callbacks (``log_to=tensorboard,mlflow``): every train and eval row
and the summary, under the run's name, with its config.

- TensorBoard: event files in ``OUT/tensorboard`` (``tensorboard --logdir OUT``), written by
  ``torch.utils.tensorboard``; needs ``pip install 'hosfl[tensorboard]'``.
- MLflow: the tracking store named by ``MLFLOW_TRACKING_URI`` when it is set (a server, a
  database), else ``OUT/mlflow.db`` (``mlflow ui --backend-store-uri sqlite:///OUT/mlflow.db``);
  the experiment is the task's name, the run the folder's; a resume continues the same MLflow
  run (its id is kept in ``OUT/mlflow_run_id``). Needs ``pip install 'hosfl[mlflow]'``.

A third tracker is one ``Callback`` subclass; Weights & Biases, for example::

    class Wandb(hosfl.Callback):
        def on_start(self, run):
            import wandb
            self.w = wandb.init(name=run.name, config=run.cfg.to_dict(), resume="allow",
                                id=run.name)
        def on_train(self, run, row):
            self.w.log({"train/loss": row["loss"]}, step=row["step"])
        def on_eval(self, run, row):
            self.w.log({f"eval/{run.metric}": row[run.metric_key]}, step=row["step"])
        def on_end(self, run, summary):
            self.w.finish()
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from hosfl.callbacks import Callback, RunInfo
from hosfl.packages import need


def _scalars(run: RunInfo, row: dict[str, Any]) -> dict[str, float]:
    """A metrics row as tracker scalars: train/loss, train/bytes_up, eval/<metric>, ..."""
    if row["event"] == "train":
        keys = {"loss": "train/loss", "bytes_up": "train/bytes_up",
                "bytes_down": "train/bytes_down"}  # fmt: skip
    else:
        keys = {run.metric_key: f"eval/{run.metric}", "test_loss": "eval/loss",
                "bytes": "eval/bytes"}  # fmt: skip
    return {name: float(row[k]) for k, name in keys.items() if row.get(k) is not None}


def _summary(run: RunInfo, summary: dict[str, Any]) -> dict[str, float]:
    """The summary's figures a tracker keeps: the final metric, wall time, client memory and
    compute."""
    keys = (run.metric_key, "wall_s", "client_peak_bytes", "client_ms_per_step")
    return {k: summary[k] for k in keys if isinstance(summary.get(k), int | float)}


class TensorBoard(Callback):
    def __init__(self) -> None:  # a missing package is an error before the run folder exists
        self.board = need("torch.utils.tensorboard", "pip install 'hosfl[tensorboard]'")

    def on_start(self, run: RunInfo) -> None:
        self.writer = self.board.SummaryWriter(log_dir=str(run.out / "tensorboard"))
        if not run.resumed:
            self.writer.add_text("config", "```toml\n" + run.cfg.to_toml() + "\n```", 0)

    def _row(self, run: RunInfo, row: dict[str, Any]) -> None:
        for name, value in _scalars(run, row).items():
            self.writer.add_scalar(name, value, row["step"])
        self.writer.flush()  # on disk with its metrics row: a crash loses neither alone

    on_train = on_eval = _row

    def on_end(self, run: RunInfo, summary: dict[str, Any]) -> None:
        for key, value in _summary(run, summary).items():
            self.writer.add_scalar(f"summary/{key}", value, summary["steps"])
        self.writer.close()


class MLflow(Callback):
    def __init__(self) -> None:
        self.tracking = need("mlflow.tracking", "pip install 'hosfl[mlflow]'")

    def on_start(self, run: RunInfo) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run.out.resolve()}/mlflow.db"
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating tables"
        # the model registry is not used; a local folder keeps mlflow-skinny from refusing it
        self.client = self.tracking.MlflowClient(
            tracking_uri=uri, registry_uri=(run.out / "mlruns").as_uri()
        )
        kept = run.out / "mlflow_run_id"
        if run.resumed and kept.is_file():
            self.id = kept.read_text().strip()
            self.client.update_run(self.id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(run.cfg.task)
        eid = experiment.experiment_id if experiment else self.client.create_experiment(
            run.cfg.task)  # fmt: skip
        self.id = self.client.create_run(eid, run_name=run.name).info.run_id
        kept.write_text(self.id + "\n")
        for key, value in run.cfg.to_dict().items():
            self.client.log_param(self.id, key, value)

    def _row(self, run: RunInfo, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        at = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[
            Metric(name, value, at, row["step"]) for name, value in _scalars(run, row).items()
        ])  # fmt: skip

    on_train = on_eval = _row

    def on_end(self, run: RunInfo, summary: dict[str, Any]) -> None:
        for key, value in _summary(run, summary).items():
            self.client.log_metric(self.id, f"summary/{key}", value)
        self.client.set_terminated(self.id, "FAILED" if summary.get("diverged_at") else "FINISHED")


TRACKERS = {"tensorboard": TensorBoard, "mlflow": MLflow}


def from_config(cfg: Any) -> list[Callback]:
    """The trackers ``cfg.log_to`` names."""
    return [TRACKERS[name.strip()]() for name in cfg.log_to.split(",") if name.strip()]
