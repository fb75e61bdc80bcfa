"""The defects the library's contracts let through (issue 24), each with the check that
failed before its fix: probes of parameters used outside their module, a probe that raises,
engines left open, a client that lies, dropout, settings a method ignores, data mistakes."""

import json

import pytest
import torch
import torch.nn.functional as F
from test_library import autompg, r2
from torch import nn

import hosfl
from hosfl import engines, zo
from hosfl.config import METHOD_SETTINGS
from hosfl.edge.process import ClientProcess
from hosfl.engines.remote import RemoteEngine
from hosfl.methods import METHODS
from hosfl.protocol import Synced, decode, encode


class Functional(nn.Module):
    """A user's layer that reads its weight outside ``lin``'s own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(7, 16)

    def forward(self, x):
        return torch.tanh(F.linear(x, self.lin.weight, self.lin.bias))


def test_a_probe_that_raises_leaves_theta_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    before = [p.detach().clone() for p in model.parameters()]
    model[2].register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"), zo.perturbed(model, 3, 0.1, "rademacher"):
        model(torch.randn(2, 4))
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)


def test_parameters_read_outside_their_module_are_found_by_name():
    model = nn.Sequential(Functional(), nn.Linear(16, 2))
    assert zo.unperturbable(model, torch.randn(3, 7)) == ["0.lin.weight", "0.lin.bias"]
    # what the probe would have seen: no change at all from them
    with torch.no_grad(), zo.perturbed(model[0], 5, 1e-2, "rademacher"):
        moved = model[0](torch.ones(1, 7))
    assert torch.equal(moved, model[0](torch.ones(1, 7)).detach())
    assert zo.unperturbable(nn.Sequential(nn.Linear(7, 16), nn.Linear(16, 2)),
                            torch.randn(3, 7)) == []  # fmt: skip


@pytest.mark.parametrize("method", ["hosfl", "zo-fl"])
def test_a_run_whose_probes_cannot_reach_a_parameter_is_refused_before_its_folder(
    method, tmp_path
):
    task = autompg()
    torch.manual_seed(0)
    task = hosfl.ModelTask(
        client=Functional(), server=nn.Sequential(nn.Linear(16, 1), nn.Flatten(0)),
        train=task.load("train"), test=task.load("test"), loss=F.mse_loss, metric=r2,
        name="functional",
    )  # fmt: skip
    hosfl.register_task(task)
    cfg = hosfl.Config(task="functional", method=method, clients=2, sampled=1, steps=2,
                       batch_size=8, progress=False, out=str(tmp_path / "run"))  # fmt: skip
    with pytest.raises(hosfl.config.ConfigError, match=r"lin\.weight, .*lin\.bias"):
        hosfl.run(cfg, log=lambda *a: None)
    assert not (tmp_path / "run").exists()


# a valid value away from its default for every setting that only some methods read
AWAY = dict(P=3, mu=1e-2, directions="gaussian", zo_rank=2, zo_lazy=10, estimator="jvp",
            client_optimizer="adam", client_lr=0.01, client_dtype="bfloat16",
            server_dtype="bfloat16", zo_lr_rule="dimension", zo_step=1.0, zo_lr_scale=10.0,
            zo_lr_max=0.01, zo_clip=3.0, server_optimizer="adam", server_lr=0.01,
            server_average=0.9, server_schedule="cosine", momentum=0.5, local_steps=2,
            aggregate="mean", outlier_factor=10.0, smashed_bound=3.0, cut_dtype="int8")  # fmt: skip


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_refuses_a_setting_it_does_not_read_and_takes_those_it_does(method):
    assert set(AWAY) == set(METHOD_SETTINGS)
    cls = METHODS[method]
    for key, value in AWAY.items():
        cfg = hosfl.Config(method=method, **{key: value})
        if key in cls.settings:
            cls.check(cfg)
        else:
            with pytest.raises(hosfl.ConfigError, match=f"method={method} does not use {key}="):
                cls.check(cfg)
    # the task's own defaults are not the user's: a task that sets one is not refused
    cls.check(hosfl.Config(method=method, task="sentiment-minilm"))


def test_a_setting_the_method_ignores_stops_the_run_before_its_folder(tmp_path):
    cfg = hosfl.Config(method="hosl", zo_clip=3.0, out=str(tmp_path / "run"), progress=False)
    with pytest.raises(hosfl.ConfigError, match="method=hosl does not use zo_clip=3.0"):
        hosfl.run(cfg, log=lambda *a: None)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("targets", "why"),
    [("label12", r"loss cannot take the model's output of shape \(1, 10\).*target \[12\]"),
     ("floats", "targets are floats, but .* classification")],
)  # fmt: skip
def test_data_mistakes_are_one_line_errors_before_the_run_folder(targets, why, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    y = torch.arange(64) % 10
    if targets == "label12":
        y[7] = 12  # a 10-class model: the task counts 13 classes from its labels
    else:
        y = y.float()
    task = hosfl.ModelTask(client=nn.Linear(5, 8), server=nn.Linear(8, 10), train=(x, y),
                           test=(x, y), classes=None if targets == "label12" else 10,
                           name=f"mistake-{targets}")  # fmt: skip
    hosfl.register_task(task)
    cfg = hosfl.Config(task=task.name, clients=2, sampled=1, batch_size=4, steps=2,
                       progress=False, out=str(tmp_path / "run"))  # fmt: skip
    with pytest.raises(hosfl.ConfigError, match=why):
        hosfl.run(cfg, log=lambda *a: None)
    assert not (tmp_path / "run").exists()


def dropout_task() -> hosfl.ModelTask:
    """Dropout on both sides of the cut, on real regression data (UCI Auto MPG)."""
    data = autompg()
    torch.manual_seed(0)
    return hosfl.ModelTask(
        client=nn.Sequential(nn.Linear(7, 32), nn.Tanh(), nn.Dropout(0.3)),
        server=nn.Sequential(nn.Dropout(0.3), nn.Linear(32, 1), nn.Flatten(0)),
        train=data.load("train"), test=data.load("test"), loss=F.mse_loss, metric=r2,
        classes=0, name="dropout",
    )  # fmt: skip


@pytest.mark.parametrize("method", ["sfl-v1", "fedavg", "hosfl"])
def test_a_dropout_model_is_bit_identical_across_runs_and_a_kill_and_resume(method, tmp_path):
    from conftest import killed_at

    hosfl.register_task(dropout_task())
    cfg = dict(task="dropout", method=method, clients=3, sampled=2, batch_size=16, steps=8,
               snapshot_every=3, eval_every=4, progress=False)  # fmt: skip
    a = hosfl.run(hosfl.Config(**cfg, out=str(tmp_path / "a")), log=lambda *a: None)
    torch.rand(5)  # whatever the generator's state between runs
    b = hosfl.run(hosfl.Config(**cfg, out=str(tmp_path / "b")), log=lambda *a: None)
    with killed_at(METHODS[method], 5):
        hosfl.run(hosfl.Config(**cfg, out=str(tmp_path / "c")), log=lambda *a: None)
    c = hosfl.resume(tmp_path / "c", log=lambda *a: None)
    for other in (b, c):
        for part in ("client_model", "server_model"):
            mine, theirs = getattr(a, part).state_dict(), getattr(other, part).state_dict()
            assert all(torch.equal(mine[k], theirs[k]) for k in mine), (method, part)


class LyingEngine(RemoteEngine):
    """Client processes as objects of this process (the remote engine's whole logic, no
    transport); client 1 answers every digest with another one, as a forged client would."""

    LIAR = 1

    @classmethod
    def for_run(cls, run):
        return cls(run.cfg, run.fed.server, run.ledger, run.measure_step, run.journal)

    def __init__(self, cfg, method, ledger, measure_step, journal):
        super().__init__(cfg, method, ledger, measure_step, journal)
        threads = torch.get_num_threads()
        self.procs = {c: ClientProcess(cfg.to_dict(), c, threads) for c in range(cfg.clients)}

    def _post(self, cid, data):
        reply = self.procs[cid].handle(data)
        if cid == self.LIAR and reply is not None:
            msg = decode(reply)
            if isinstance(msg, Synced):
                reply = encode(Synced(msg.step, msg.digest ^ 1))
        return reply

    def _collect(self, cid, handles, timeout):
        return list(handles)

    def _restart(self, cid):
        pass

    def _release(self):
        pass


def test_a_client_that_lies_about_its_digest_is_dropped_and_the_run_completes(
    small_cfg, monkeypatch
):
    monkeypatch.setitem(engines.ENGINES, "liar", ("test_contracts:LyingEngine", ""))
    cfg = small_cfg(clients=3, sampled=2, steps=6, check_every=2, engine="liar")
    result = hosfl.run(cfg, log=lambda *a: None)
    rows = [json.loads(x) for x in (result.out / "metrics.jsonl").read_text().splitlines()]
    dropped = [r for r in rows if r["event"] == "reject" and "did not take" in r["reason"]]
    assert dropped and {r["client"] for r in dropped} == {LyingEngine.LIAR}
    assert json.loads((result.out / "summary.json").read_text())["clients_in_sync"] == 2
    assert result.steps == 6
