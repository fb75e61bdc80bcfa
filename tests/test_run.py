"""Whole runs on real Fashion-MNIST: learning, replay, reproducibility, exact byte counts."""

import json

import numpy as np
import pytest
import torch
from conftest import journal_entries as _journal

import hosfl
from hosfl import checkpoint, engines, zo
from hosfl.data import partition
from hosfl.engines import local
from hosfl.methods import METHODS
from hosfl.protocol import decode, encode
from hosfl.replay import replay_run
from hosfl.runner import run


def _metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("wall_s", None)
    return rows


def test_run_folder_holds_config_metrics_history_and_checkpoint(small_cfg):
    result = run(small_cfg(), log=lambda *a: None)
    names = {p.name for p in result.out.iterdir()}
    assert {
        "config.toml",
        "metrics.jsonl",
        "journal.sqlite",
        "checkpoint.pt",
        "client_init.pt",
        "summary.json",
    } <= names
    assert len(_journal(result.out)) == 30
    evals = [r for r in _metrics(result.out) if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [0, 10, 20, 30]  # from the untrained model on
    summary = json.loads((result.out / "summary.json").read_text())
    assert summary["bytes"]["up"]["scalars"] == 30 * 2 * 3 * 4  # steps × K × P × 4 bytes


@pytest.mark.parametrize(
    "settings",
    [
        dict(client_optimizer="adam", client_lr=1e-3),
        dict(directions="gaussian"),  # CPU-generator directions replay just as exactly
        dict(client_dtype="bfloat16"),  # bfloat16 probes; the update stays float32
    ],
)
def test_replaying_the_history_gives_the_live_client_weights_bit_for_bit(small_cfg, settings):
    result = run(small_cfg(**settings), log=lambda *a: None)
    report = replay_run(result.out)
    assert report.steps == 30 and report.identical and report.max_abs_diff == 0.0
    init = checkpoint.load(result.out / "client_init.pt")["client"]
    moved = [k for k in init if not torch.equal(init[k], result.client_model.state_dict()[k])]
    assert moved  # the replay had something to reproduce


def test_same_config_and_seed_give_bit_identical_runs(small_cfg, tmp_path):
    a = run(small_cfg(out=str(tmp_path / "a")), log=lambda *a: None)
    b = run(small_cfg(out=str(tmp_path / "b")), log=lambda *a: None)
    c = run(small_cfg(out=str(tmp_path / "c"), seed=1), log=lambda *a: None)
    assert _metrics(a.out) == _metrics(b.out)
    assert _journal(a.out) == _journal(b.out)
    for ma, mb in ((a.client_model, b.client_model), (a.server_model, b.server_model)):
        assert all(
            torch.equal(x, y)
            for x, y in zip(ma.state_dict().values(), mb.state_dict().values(), strict=True)
        )
    assert _metrics(a.out) != _metrics(c.out)


class WireEngine(local.LocalEngine):
    """Sends every message as bytes through the codec (z and λ in the run's cut_dtype) and
    counts the bytes it sent; an engine added as a user would, by one line in the registry."""

    sent = 0
    made: list = []

    @classmethod
    def for_run(cls, run):
        cls.made.append(super().for_run(run))
        return cls.made[-1]

    def carry(self, direction, msg, copies=1):
        data = encode(msg, self.ledger.cut_dtype)
        self.sent += len(data) * copies
        self.ledger.record(direction, msg, copies)
        return decode(data)


@pytest.mark.parametrize(
    ("method", "cut_dtype"),
    [(m, "float32") for m in METHODS]
    # the split methods with z and λ in 8 bits: the in-process engine's rounding is the codec's
    + [(m, "int8") for m in ("hosfl", "sfl-v1", "hosl", "zo-sfl")],
)
def test_ledger_equals_the_bytes_of_the_serialized_messages(
    small_cfg, monkeypatch, method, cut_dtype
):
    monkeypatch.setitem(engines.ENGINES, "wire", ("test_run:WireEngine", ""))
    WireEngine.made.clear()
    cfg = small_cfg(method=method, steps=4, engine="wire", cut_dtype=cut_dtype)
    through_bytes = run(cfg, log=lambda *a: None)
    assert through_bytes.ledger.total() == WireEngine.made[0].sent > 0
    by_reference = run(
        small_cfg(method=method, steps=4, out=str(through_bytes.out) + "-ref",
                  cut_dtype=cut_dtype), log=lambda *a: None,
    )  # fmt: skip
    assert by_reference.ledger.as_dict() == through_bytes.ledger.as_dict()
    assert all(
        torch.equal(x, y)
        for x, y in zip(
            through_bytes.client_model.parameters(),
            by_reference.client_model.parameters(),
            strict=True,
        )
    )


def test_hosfl_learns_fashion_mnist_and_moves_its_client(small_cfg):
    cfg = small_cfg(
        clients=10,
        sampled=3,
        batch_size=32,
        steps=300,
        P=5,
        train_subset=12000,
        test_subset=2000,
        eval_every=0,
    )
    result = run(cfg, log=lambda *a: None)
    assert result.accuracy > 0.65  # chance is 0.10
    init = checkpoint.load(result.out / "client_init.pt")["client"]
    now = result.client_model.state_dict()
    change = sum((now[k] - init[k]).norm() ** 2 for k in init) ** 0.5
    size = sum(init[k].norm() ** 2 for k in init) ** 0.5
    assert change / size > 0.01  # a client that trains: weights moved by over 1% of their norm
    assert len(zo.trainable(result.client_model)) == 4  # two convs, weight and bias


def test_partitions_cover_the_data_exactly_once_and_skew_as_asked():
    labels = np.repeat(np.arange(10), 100)
    for kind in ("iid", "dirichlet", "shards"):
        parts = partition.split(kind, labels, 8, seed=0, alpha=0.1, per_client=2)
        assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    hist = partition.histogram(labels, partition.split("shards", labels, 10, 0, 1.0, 2), 10)
    assert ((hist > 0).sum(1) <= 2).all()
    skewed = partition.histogram(labels, partition.split("dirichlet", labels, 10, 0, 0.1, 2), 10)
    even = partition.histogram(labels, partition.split("iid", labels, 10, 0, 0.1, 2), 10)
    assert skewed.max() > 3 * even.max()


def test_hosfl_aggregation_traffic_is_4P_bytes_up_per_client_step_whatever_d_c(small_cfg, tmp_path):
    per_client_step = []
    for cut in ("conv1", "fc1"):  # d_c = 1 248 and 217 008
        r = run(small_cfg(cut=cut, steps=3, out=str(tmp_path / cut)), log=lambda *a: None)
        up = r.ledger.as_dict()["up"]
        per_client_step.append((up["scalars"] / (3 * 2), r.summary["d_c"]))
    assert [b for b, _ in per_client_step] == [4 * 3, 4 * 3]  # 4P bytes, P = 3
    assert per_client_step[1][1] > 100 * per_client_step[0][1]


def test_the_public_facade_runs_a_federation(tmp_path):
    import hosfl

    cfg = hosfl.Config(
        steps=3,
        clients=3,
        sampled=2,
        train_subset=300,
        test_subset=100,
        progress=False,
        out=str(tmp_path / "api"),
    )
    result = hosfl.run(cfg, log=lambda *a: None)
    assert isinstance(result, hosfl.RunResult) and result.steps == 3
    assert (result.out / "checkpoint.pt").exists()


def test_a_cosine_server_schedule_decays_the_server_rate(small_cfg, tmp_path):
    from hosfl.runner import build

    method = build(small_cfg(method="sfl-v1", server_schedule="cosine", steps=20))[0].server
    assert method.server_lr(0) == pytest.approx(0.05)
    assert method.server_lr(10) == pytest.approx(0.025)
    assert method.server_lr(19) == pytest.approx(0.05 * (1 + np.cos(np.pi * 19 / 20)) / 2)
    runs = {
        s: run(small_cfg(method="hosfl", server_schedule=s, steps=20, eval_every=20,
                         out=str(tmp_path / s)), log=lambda *a: None)  # fmt: skip
        for s in ("constant", "cosine")
    }
    # the same seeds and batches: the journal's first step (before any server rate differs)
    # agrees, the decayed server ends elsewhere
    assert _journal(runs["constant"].out)[0] == _journal(runs["cosine"].out)[0]
    assert not torch.equal(*(next(r.server_model.parameters()) for r in runs.values()))
    with pytest.raises(ValueError, match="fedavg does not use server_schedule"):
        METHODS["fedavg"].check(small_cfg(method="fedavg", server_schedule="cosine"))


def test_a_server_average_changes_what_is_evaluated_and_nothing_that_is_trained(
    small_cfg, tmp_path
):
    from hosfl.runner import build, evaluate_checkpoint

    method = build(small_cfg(method="sfl-v1", server_average=0.9))[0].server
    before = [a.clone() for a in method.averaged.parameters()]
    with torch.no_grad():
        for p in method.model.parameters():
            p.add_(1.0)
    method.update_average()  # a ← 0.9·a + 0.1·(a + 1) = a + 0.1
    for a, b in zip(method.averaged.parameters(), before, strict=True):
        torch.testing.assert_close(a, b + 0.1)
    runs = {
        beta: run(small_cfg(method="hosfl", server_average=beta, steps=20, eval_every=20,
                            out=str(tmp_path / f"b{beta}")), log=lambda *a: None)  # fmt: skip
        for beta in (0.0, 0.9)
    }
    plain, averaged = runs[0.0], runs[0.9]
    assert _journal(plain.out) == _journal(averaged.out)  # training never sees the average
    trained = [checkpoint.load(r.out / "checkpoint.pt")["server"] for r in runs.values()]
    assert all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])
    assert not torch.equal(*(next(r.server_model.parameters()) for r in runs.values()))
    assert plain.accuracy != averaged.accuracy  # the evaluated server is another one
    assert evaluate_checkpoint(averaged.out / "checkpoint.pt")[0] == averaged.accuracy
    with pytest.raises(ValueError, match="server_average"):
        small_cfg(server_average=1.0)
    # the default: β from the run's length, a time constant of a fifteenth of the run
    assert hosfl.Config().server_average == -1 and hosfl.Config().average_beta() == 0.99
    assert hosfl.Config(steps=300).average_beta() == 0.95
    assert hosfl.Config(steps=15).average_beta() == 0.0  # too short: off
    assert hosfl.Config(steps=300, server_average=0.5).average_beta() == 0.5
    # a zeroth-order server (zo-sfl) keeps no average: it is evaluated as trained
    assert build(small_cfg(method="zo-sfl", steps=300))[0].server.averaged is None
    assert build(small_cfg(method="hosl", steps=300))[0].server.averaged is not None
