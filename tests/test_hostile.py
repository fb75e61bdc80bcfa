"""Hostile or broken client messages: each is rejected with a reason, that client's part of the
step is dropped, and the server's state is exactly what the honest clients alone give."""

import copy

import pytest
import torch

from hosfl.protocol import CutGradient, ProbeScalars, SmashedData
from hosfl.runner import build


@pytest.fixture
def step0(small_cfg):
    """A federation at step 0 with each sampled client's honest smashed data."""
    fed, _, _ = build(small_cfg(clients=4, sampled=3))
    sampled, plan = fed.server.plan(0)
    honest = {m: fed.clients[m].handle(plan) for m in sampled}
    return fed, sampled, plan, honest


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _bad_smashed(kind, good: SmashedData) -> SmashedData:
    z, y = good.z, good.y
    if kind == "shape":
        return SmashedData(0, z[:, :, :-1], y)
    if kind == "dtype":
        return SmashedData(0, z.double(), y)
    if kind == "nan":
        return SmashedData(0, torch.where(z > 0, float("nan"), z), y)
    if kind == "inf":
        return SmashedData(0, z.masked_fill(z > 0, float("inf")), y)
    if kind == "labels":
        return SmashedData(0, z, y + 10)
    if kind == "step":
        return SmashedData(7, z, y)
    if kind == "type":
        return ProbeScalars(0, torch.ones(3))
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("shape", "smashed data of shape"),
        ("dtype", "dtype torch.float64"),
        ("nan", "NaN or infinite"),
        ("inf", "NaN or infinite"),
        ("labels", "labels outside 0..9"),
        ("step", "of step 7 at step 0"),
        ("type", "expected SmashedData"),
    ],
)
def test_a_bad_upload_is_dropped_and_theta_s_is_what_the_honest_clients_give(step0, kind, reason):
    fed, sampled, _, honest = step0
    bad_cid = sampled[1]
    twin = copy.deepcopy(fed.server)
    lams, _ = twin.train({m: s for m, s in honest.items() if m != bad_cid}, 0)
    hostile = {**honest, bad_cid: _bad_smashed(kind, honest[bad_cid])}
    got, _ = fed.server.train(hostile, 0)
    assert sorted(got) == sorted(lams) and bad_cid not in got
    assert _same(_params(fed.server.model), _params(twin.model))
    assert all(torch.equal(got[m].lam, lams[m].lam) for m in got)
    (rejection,) = fed.server.rejections
    assert rejection["client"] == bad_cid and reason in rejection["reason"], rejection


def test_a_client_that_was_not_sampled_is_refused(step0):
    fed, sampled, _, honest = step0
    outsider = next(m for m in range(4) if m not in sampled)
    before = _params(fed.server.model)
    twin = copy.deepcopy(fed.server)
    twin.train(honest, 0)
    fed.server.train({**honest, outsider: honest[sampled[0]]}, 0)
    assert _same(_params(fed.server.model), _params(twin.model))
    assert not _same(before, _params(fed.server.model))  # the honest step did happen
    assert fed.server.rejections == [
        {"step": 0, "client": outsider, "reason": f"client {outsider} was not sampled at step 0"}
    ]


def _honest_scalars(sampled):
    return {m: ProbeScalars(0, torch.tensor([0.5, -1.0, 2.0]) * (m + 1)) for m in sampled}


@pytest.mark.parametrize(
    "bad, reason",
    [
        (ProbeScalars(0, torch.ones(5)), "expected 3 probe scalars"),
        (ProbeScalars(0, torch.tensor([1.0, float("nan"), 0.0])), "NaN or infinite"),
        (ProbeScalars(0, torch.tensor([float("inf"), 0.0, 0.0])), "NaN or infinite"),
        (ProbeScalars(3, torch.ones(3)), "of step 3 at step 0"),
        (CutGradient(0, torch.ones(3)), "expected ProbeScalars"),
    ],
)
def test_bad_scalars_are_dropped_and_vbar_is_the_honest_mean(step0, bad, reason):
    fed, sampled, plan, _ = step0
    honest = _honest_scalars(sampled)
    want = fed.server.aggregate(plan, {m: v for m, v in honest.items() if m != sampled[0]})
    got = fed.server.aggregate(plan, {**honest, sampled[0]: bad})
    assert torch.equal(got.values, want.values) and torch.equal(got.seeds, plan.seeds)
    (rejection,) = fed.server.rejections
    assert rejection["client"] == sampled[0] and reason in rejection["reason"], rejection


def test_no_admissible_scalars_moves_no_client(step0):
    fed, sampled, plan, _ = step0
    update = fed.server.aggregate(plan, {sampled[0]: ProbeScalars(0, torch.ones(4))})
    assert torch.equal(update.values, torch.zeros(3))
    replica = fed.clients[0].replica
    before = _params(replica.model)
    replica.apply(update)
    assert _same(before, _params(replica.model))


def test_median_aggregation_resists_an_outlier_the_mean_does_not(small_cfg):
    fed, _, _ = build(small_cfg(clients=4, sampled=3, aggregate="median"))
    sampled, plan = fed.server.plan(0)
    scalars = _honest_scalars(sampled)
    scalars[sampled[2]] = ProbeScalars(0, torch.full((3,), 1e6))
    median = fed.server.aggregate(plan, scalars).values
    honest = torch.stack([scalars[m].values for m in sampled[:2]])
    assert torch.all(median.abs() <= honest.abs().max(0).values)
    fed.server.cfg.aggregate = "mean"
    # 1e6 is far beyond 1000× the honest scalars: the bound on contributions drops it...
    assert torch.all(fed.server.aggregate(plan, scalars).values.abs() < 10)
    assert "median of recent uploads" in fed.server.rejections[-1]["reason"]
    fed.server.cfg.outlier_factor = 0  # ...and without the bound the mean is dragged along
    assert torch.all(fed.server.aggregate(plan, scalars).values > 1e5)
