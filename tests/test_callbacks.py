"""Callbacks, trackers and a task's own metric (issue 29): what a callback sees is what
metrics.jsonl holds, once; TensorBoard's and MLflow's stores read back with their own readers;
a metric that is not a mean of batches is computed over the whole test set."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import killed_at
from test_library import autompg

import hosfl
from hosfl.methods import METHODS
from hosfl.runfolder import read_metrics


class Seen(hosfl.Callback):
    """Every hook call, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_start(self, run):
        self.calls.append(("start", run.start, run.resumed))

    def on_train(self, run, row):
        self.calls.append(("train", row["step"], row["loss"]))

    def on_eval(self, run, row):
        self.calls.append(("eval", row["step"], row[run.metric_key]))

    def on_checkpoint(self, run, step, path):
        assert path.is_file()
        self.calls.append(("checkpoint", step))

    def on_end(self, run, summary):
        self.calls.append(("end", summary["steps"]))


def _rows(folder, event):
    rows, _ = read_metrics(folder / "metrics.jsonl")
    return [r for r in rows if r["event"] == event]


def test_callbacks_see_every_step_once_across_a_kill_and_its_resume(small_cfg):
    cfg = small_cfg(steps=40, eval_every=10, snapshot_every=10)
    seen = Seen()
    with killed_at(METHODS["hosfl"], 27):  # checkpoint at 20: steps 21-27 are redone
        hosfl.run(cfg, log=lambda *a: None, callbacks=[seen])
    hosfl.resume(cfg.out, log=lambda *a: None, callbacks=[seen])
    steps = [c[1] for c in seen.calls if c[0] == "train"]
    assert steps == list(range(1, 41))  # each once, in order
    assert [c[1] for c in seen.calls if c[0] == "eval"] == [0, 10, 20, 30, 40]
    assert ("start", 20, True) in seen.calls and seen.calls[-1] == ("end", 40)
    # what they saw is what the folder holds
    train = {r["step"]: r["loss"] for r in _rows(Path(cfg.out), "train")}
    assert {c[1]: c[2] for c in seen.calls if c[0] == "train"} == train


def test_a_callback_that_stops_the_run_leaves_a_folder_that_resumes_to_the_same_end(small_cfg):
    whole = hosfl.run(small_cfg(out=small_cfg().out + "-whole"), log=lambda *a: None)
    cfg = small_cfg()
    stopped = hosfl.run(cfg, log=lambda *a: None, callbacks=[hosfl.StopAt(0.0)])
    assert stopped.steps == 10 and stopped.summary["stopped_at"] == 10  # the first evaluation
    assert "reached the target 0.0 at step 10" in stopped.summary["stopped_by"]
    assert json.loads((stopped.out / "summary.json").read_text())["stopped_at"] == 10
    resumed = hosfl.resume(cfg.out, log=lambda *a: None)
    assert resumed.steps == 30 and resumed.summary["stopped_at"] is None
    for a, b in zip(whole.client_model.state_dict().values(),
                    resumed.client_model.state_dict().values(), strict=True):  # fmt: skip
        assert torch.equal(a, b)
    assert resumed.metric == whole.metric


def test_tensorboard_and_mlflow_hold_the_values_of_metrics_jsonl(small_cfg, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = hosfl.run(small_cfg(log_to="tensorboard,mlflow"), log=lambda *a: None)
    train, evals = _rows(result.out, "train"), _rows(result.out, "eval")
    assert len(train) == 30 and [e["step"] for e in evals] == [0, 10, 20, 30]

    board = EventAccumulator(str(result.out / "tensorboard")).Reload()
    loss = [(e.step, e.value) for e in board.Scalars("train/loss")]
    assert loss == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in train]
    acc = [(e.step, e.value) for e in board.Scalars("eval/accuracy")]
    assert acc == [(r["step"], pytest.approx(r["test_acc"], rel=1e-6)) for r in evals]

    client = MlflowClient(tracking_uri=f"sqlite:///{result.out}/mlflow.db",
                          registry_uri=(result.out / "mlruns").as_uri())  # fmt: skip
    run_id = (result.out / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.run_name == result.out.name and run.info.status == "FINISHED"
    assert run.data.params["steps"] == "30" and run.data.params["task"] == "fmnist-cnn"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))
    assert history == [(r["step"], r["loss"]) for r in train]
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "eval/accuracy"))
    assert history == [(r["step"], r["test_acc"]) for r in evals]


def test_a_resumed_run_logs_on_into_the_same_mlflow_run(small_cfg, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = small_cfg(log_to="mlflow", snapshot_every=10)
    with killed_at(METHODS["hosfl"], 15):
        hosfl.run(cfg, log=lambda *a: None)
    result = hosfl.resume(cfg.out, log=lambda *a: None)
    client = MlflowClient(tracking_uri=f"sqlite:///{result.out}/mlflow.db",
                          registry_uri=(result.out / "mlruns").as_uri())  # fmt: skip
    runs = client.search_runs([client.get_experiment_by_name("fmnist-cnn").experiment_id])
    assert len(runs) == 1
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 31))


def test_an_unknown_tracker_is_refused_by_name(small_cfg):
    with pytest.raises(hosfl.ConfigError, match="log_to.*unknown tracker 'wandb'"):
        small_cfg(log_to="tensorboard,wandb")


def test_r2_is_named_and_computed_over_the_whole_test_set_as_scikit_learn_does(tmp_path):
    from sklearn.metrics import r2_score

    from hosfl.runner import evaluate

    task = autompg()
    assert task.metric_name == "r2" and not task.metric_is_mean
    hosfl.register_task(task)
    cfg = hosfl.Config(task="autompg", clients=4, sampled=2, batch_size=16, steps=60,
                       eval_every=20, client_lr=0.02, server_lr=0.02, progress=False,
                       out=str(tmp_path / "r2"))  # fmt: skip
    result = hosfl.run(cfg, log=lambda *a: None)
    assert result.metric_name == "r2" and "test_acc" not in result.summary
    assert result.summary["test_r2"] == result.metric
    with pytest.raises(AttributeError, match="metric is r2"):
        _ = result.accuracy
    client, server = result.client_model.eval(), result.server_model.eval()
    test = task.load("test")
    x = torch.stack([test[i][0] for i in range(len(test))])
    y = torch.stack([test[i][1] for i in range(len(test))])
    with torch.no_grad():
        predicted = server(client(x))
    assert result.metric == pytest.approx(r2_score(y.numpy(), predicted.numpy()), abs=1e-5)
    # in batches of 8 the mean of per-batch R² is another number: the whole set's is kept
    whole, _ = evaluate(client, server, task, test, batch=8)
    assert whole == pytest.approx(result.metric, abs=1e-6)
    batches = [(r2_score(y[i:i + 8], predicted[i:i + 8]), len(y[i:i + 8]))
               for i in range(0, len(y), 8)]  # fmt: skip
    assert abs(sum(v * n for v, n in batches) / len(y) - whole) > 1e-3
    keys = [set(r) & {"test_r2", "test_acc"} for r in _rows(result.out, "eval")]
    assert keys == [{"test_r2"}] * 4


def test_a_tracker_whose_package_is_missing_stops_the_run_before_its_folder(small_cfg,
                                                                            monkeypatch):
    from hosfl.packages import MissingPackage

    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)  # as if not installed
    cfg = small_cfg(log_to="mlflow")
    with pytest.raises(MissingPackage, match=r"pip install 'hosfl\[mlflow\]'"):
        hosfl.run(cfg, log=lambda *a: None)
    assert not Path(cfg.out).exists()
