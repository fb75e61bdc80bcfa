"""The client's zeroth-order step: ``zo_clip`` bounds what one outlier step can do to θ_c;
``estimator=jvp`` computes the probe scalar exactly by forward-mode differentiation;
``zo_lr_rule=output`` sets the rate from how far the probes move the cut layer, ``lesser``
at most the dimension rule's;
``directions=lowrank`` draws each matrix's direction in a rank-r basis kept for ``zo_lazy``
steps. All replay bit for bit from the journal."""

import json
import math
import statistics

import pytest
import torch
from conftest import journal_entries
from torch import nn

from hosfl import checkpoint, zo
from hosfl import directions as dirs
from hosfl.config import ConfigError
from hosfl.data import source
from hosfl.methods import METHODS
from hosfl.methods.controls import Rate
from hosfl.methods.hosfl import HOSFL
from hosfl.protocol import ProbeReport, ProbeScalars, ScalarBroadcast
from hosfl.replay import replay_run
from hosfl.runner import build, load_models, run


def test_an_outlier_step_moves_theta_c_no_more_than_the_clip_allows(small_cfg):
    cfg = small_cfg(zo_clip=3.0)
    method = build(cfg)[0].server
    rng = torch.Generator().manual_seed(0)
    history = [torch.randn(cfg.P, generator=rng) * 1e-3 for _ in range(20)]  # ordinary steps
    for v in history:
        assert torch.equal(method.bound.clip(v), v)  # inside the cap: untouched
    cap = 3.0 * float(torch.tensor([v.double().norm() for v in history]).median())
    outlier = torch.full((cfg.P,), 1e3)  # a probe scalar far in the tail
    clipped = method.bound.clip(outlier)
    assert float(clipped.double().norm()) <= cap * (1 + 1e-6)
    seeds = torch.arange(cfg.P, dtype=torch.int32)
    before = [p.detach().clone() for p in method.replica.params]
    method.replica.apply(ScalarBroadcast(0, seeds, clipped))
    moved = math.sqrt(sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(
        method.replica.params, before, strict=True)))  # fmt: skip
    # ‖ĝ‖ ≤ √(Pd)·‖v̄‖/(Pμ) for ±1 directions: SGD moves θ_c by at most lr times that
    bound = method.client_lr * math.sqrt(cfg.P * method.replica.size) * cap / (cfg.P * cfg.mu)
    assert 0 < moved <= bound
    unclipped = method.client_lr * math.sqrt(method.replica.size) * 1e3 / cfg.mu  # about
    assert unclipped > 1e5 * bound


def test_a_clipped_run_differs_from_an_unclipped_one_and_replays_bit_for_bit(small_cfg, tmp_path):
    steps = dict(steps=30, eval_every=30)
    plain = run(small_cfg(**steps, out=str(tmp_path / "plain")), log=lambda *a: None)
    capped = run(small_cfg(**steps, zo_clip=1.0, out=str(tmp_path / "capped")),
                 log=lambda *a: None)  # fmt: skip
    # a cap at the median itself: about half the steps are scaled down
    assert not torch.equal(
        next(plain.client_model.parameters()), next(capped.client_model.parameters())
    )
    assert replay_run(capped.out).identical


def _mlp():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    return model, torch.randn(6, 3, dtype=torch.float64)


def _true_grad(model, x, lam):
    grads = torch.autograd.grad((lam * model(x)).sum(), zo.trainable(model))
    return torch.cat([g.flatten() for g in grads])


def _directions(model, seed, kind):
    return torch.cat([zo.direction(seed, i, p, kind).flatten()
                      for i, p in enumerate(zo.trainable(model))])  # fmt: skip


LOWRANK = dirs.Directions("lowrank", rank=1, lazy=1, salt=3)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian", LOWRANK.at(5)])
def test_jvp_equals_autograds_directional_derivative(kind):
    model, x = _mlp()
    lam = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    g = _true_grad(model, x, lam)
    for seed in range(5):
        with torch.no_grad():  # as the client runs it
            value = zo.project(lam, zo.jvp(model, x, seed, 1e-3, kind))
        exact = 1e-3 * float(g @ _directions(model, seed, kind))
        assert value == pytest.approx(exact, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(("kind", "n"), [("rademacher", 4000), (LOWRANK, 2000)])
def test_the_jvp_estimate_is_unbiased_and_its_error_falls_like_one_over_sqrt_n(kind, n):
    model, x = _mlp()
    lam = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    g = _true_grad(model, x, lam)
    mu = 1e-3
    terms = []
    for seed in range(n):  # ĝ = v u / μ with v = λᵀ(μ J u): one probe each, one a step
        how = kind.at(seed) if isinstance(kind, dirs.Directions) else kind
        u = _directions(model, seed, how)
        with torch.no_grad():
            terms.append(zo.project(lam, zo.jvp(model, x, seed, mu, how)) / mu * u)
    terms = torch.stack(terms)
    errors = {k: float((terms[:k].mean(0) - g).norm() / g.norm()) for k in (n // 16, n)}
    # 16 times the estimates: the relative error about 4 times smaller (loosely: 2.5)
    assert errors[n] < errors[n // 16] / 2.5
    # each coordinate's mean is within 4.5 standard errors of g (measured spread: the
    # low-rank directions' ĝ has other variances than ±1's ‖g‖² − g_i²)
    sd = terms.std(0) / math.sqrt(len(terms))
    assert ((terms.mean(0) - g).abs() < 4.5 * sd + 1e-12).all()


def test_a_jvp_run_learns_and_replays_bit_for_bit(small_cfg, tmp_path):
    fd = run(small_cfg(steps=30, eval_every=30, out=str(tmp_path / "fd")), log=lambda *a: None)
    jvp = run(small_cfg(steps=30, eval_every=30, estimator="jvp", out=str(tmp_path / "jvp")),
              log=lambda *a: None)  # fmt: skip
    # the first step, from the same θ_c: the same seeds, and scalars that differ by the
    # finite differences' error (float32 rounding of λᵀz' − λᵀz, ReLU kinks within μ)
    fd_rows, jvp_rows = journal_entries(fd.out), journal_entries(jvp.out)
    assert fd_rows[0][0] == jvp_rows[0][0]
    a, b = torch.tensor(fd_rows[0][1]), torch.tensor(jvp_rows[0][1])
    assert 0 < (a - b).norm() < 0.5 * b.norm()
    assert jvp.accuracy > 0.3
    assert replay_run(jvp.out).identical


def test_lowrank_directions_keep_one_basis_for_zo_lazy_steps():
    how = dirs.Directions("lowrank", rank=2, lazy=3, salt=7)
    w = torch.zeros(6, 4, 3)  # a convolution-shaped weight, read as a 6 × 12 matrix

    def u(seed, step, salted=how):
        return zo.direction(seed, 0, w, salted.at(step)).reshape(6, -1)

    def rank(*us):
        return int(torch.linalg.matrix_rank(torch.cat(us)))

    assert rank(u(1, 0), u(2, 2)) == 2  # steps 0-2 share V: every row in its span
    assert rank(u(1, 0), u(2, 3)) == 4  # step 3 draws another
    assert not torch.equal(u(1, 0), u(1, 0, dirs.Directions("lowrank", 2, 3, salt=8)))
    assert set((u(1, 0) * math.sqrt(2)).round().unique().tolist()) <= {-2.0, 0.0, 2.0}
    many = torch.stack([u(s, s) for s in range(300)])
    assert float(many.pow(2).mean()) == pytest.approx(1.0, abs=0.05)  # E[u²] = 1, as ±1
    assert set(zo.direction(1, 1, torch.zeros(7), how).unique().tolist()) == {-1.0, 1.0}
    with pytest.raises(ValueError, match="rank >= 1"):
        zo.direction(1, 0, w, "lowrank")


def test_a_lowrank_run_moves_each_matrix_in_its_basis_learns_and_replays(small_cfg, tmp_path):
    settings = dict(directions="lowrank", zo_rank=2, zo_lazy=4, eval_every=30)
    window = run(small_cfg(steps=4, **settings, out=str(tmp_path / "window")),
                 log=lambda *a: None)  # fmt: skip
    start = load_models(checkpoint.load(window.out / "client_init.pt"))[1]
    moved = {n: (p.detach() - dict(start.named_parameters())[n].detach()).flatten(1).double()
             for n, p in window.client_model.named_parameters() if p.dim() > 1}  # fmt: skip
    for name, delta in moved.items():  # four steps in one basis: rank 2 where a matrix has more
        s = torch.linalg.svdvals(delta)
        assert s[0] > 0 and float(s[2] / s[0]) < 1e-3, (name, s[:4])
    learned = run(small_cfg(steps=30, **settings, out=str(tmp_path / "run")), log=lambda *a: None)
    assert learned.accuracy > 0.3
    assert replay_run(learned.out).identical


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return nn.functional.scaled_dot_product_attention(q, k, v)


def test_jvp_goes_through_attention():
    """CPU's fused attention kernel has no forward-mode derivative; zo.jvp runs attention as
    plain math, and the result is still the exact directional derivative."""
    torch.manual_seed(0)
    model, x = _Attention(), torch.randn(2, 5, 8)
    lam = torch.randn(2, 5, 8)
    g = _true_grad(model, x, lam)
    with torch.no_grad():
        value = zo.project(lam, zo.jvp(model, x, 3, 1.0, "rademacher"))
    exact = float(g @ _directions(model, 3, "rademacher"))
    assert value == pytest.approx(exact, rel=1e-4)


def test_the_output_rate_takes_the_warmup_median_and_never_exceeds_the_cap():
    rate = Rate(target=0.02, base=0.05, mu=1e-3, warmup=3)
    sizes = torch.full((2,), 1e-3)
    # moved = √(Σ v̄²r²) = 1e-3·‖v̄‖; the rate for 2 % is 0.02·P·μ²/moved = 4e-8/(1e-3·‖v̄‖)
    for norm, want in ((4e-3, 1e-2), (2e-3, 1.5e-2), (8e-3, 1e-2)):  # medians 1e-2, 1.5e-2, 1e-2
        v = torch.tensor([norm, 0.0])
        assert torch.allclose(rate.scale(v, sizes).double(), v.double() * want / 0.05)
    later = torch.tensor([1e-6, 0.0])  # after the warm-up the rate stays
    assert torch.allclose(rate.scale(later, sizes).double(), later.double() * 1e-2 / 0.05)
    assert rate.rate() == pytest.approx(1e-2) and len(rate.seen) == 3
    capped = Rate(target=0.02, base=0.05, mu=1e-3, warmup=3)
    tiny = torch.tensor([1e-9, 0.0])  # the rate for 2 % would be 40: the first-order 0.05 caps it
    assert torch.equal(capped.scale(tiny, sizes), tiny) and capped.rate() == 0.05


def test_the_output_rule_moves_the_cut_layer_by_about_its_target(small_cfg):
    cfg = small_cfg(zo_lr_rule="output", zo_step=1.0, steps=30, eval_every=30, sampled=3)
    target = math.sqrt(cfg.P / 4800)  # 2.5 %: c·√(P/d_c), d_c = 4 800
    result = run(cfg, log=lambda *a: None)
    assert replay_run(result.out).identical  # the journal holds the scaled v̄
    rate = json.loads((result.out / "summary.json").read_text())["client_lr"]
    assert 0 < rate < cfg.client_lr
    # replay the run and measure each step's change of the cut layer on test images
    _, client, server, task = load_models(checkpoint.load(result.out / "client_init.pt"))
    replica = HOSFL(cfg, client, server, task).replica
    x, _ = next(source.batches(task.load("test", 64), 64))
    rho, z = [], client(x).detach()
    with torch.no_grad():
        for seeds, values in journal_entries(result.out):
            zo.apply_update_(replica.params, seeds, values, cfg.mu, replica.optimizer,
                             cfg.directions)  # fmt: skip
            z_next = client(x)
            rho.append(float((z_next - z).norm() / z.norm()))
            z = z_next
    # the warm-up's steps aim at the target; later ones take the warm-up's rate
    assert target / 2 < statistics.median(rho[:20]) < target * 2, rho


@pytest.mark.parametrize(
    "settings, same_as",
    [
        # the probes would allow 100× the target: the dimension rule's 5·P/d_c binds
        (dict(zo_step=100.0, zo_lr_scale=5.0), "dimension"),
        # the dimension rule allows the first-order rate: the probes' (smaller) rate binds
        (dict(zo_step=0.5, zo_lr_scale=1e6), "output"),
    ],
)
def test_the_lesser_rule_steps_at_the_smaller_of_the_two_rules(small_cfg, tmp_path, settings,
                                                                 same_as):
    runs = {}
    for rule in ("lesser", same_as):
        cfg = small_cfg(zo_lr_rule=rule, steps=25, eval_every=25, out=str(tmp_path / rule),
                        **settings)  # fmt: skip
        runs[rule] = run(cfg, log=lambda *a: None)
    lesser, other = (json.loads((runs[r].out / "summary.json").read_text())["client_lr"]
                     for r in runs)  # fmt: skip
    assert lesser == other and journal_entries(runs["lesser"].out) == journal_entries(
        runs[same_as].out)  # fmt: skip
    if same_as == "dimension":
        assert lesser == pytest.approx(5.0 * 3 / 4800)  # P = 3, d_c = 4 800
    else:
        assert 0 < lesser < small_cfg().client_lr
    assert replay_run(runs["lesser"].out).identical


@pytest.mark.parametrize("method", ["hosl", "zo-sfl", "zo-fl"])
def test_the_lesser_rule_is_the_dimension_rule_for_methods_without_probe_sizes(small_cfg,
                                                                                method):
    cfg = small_cfg(method=method, zo_lr_rule="lesser", zo_lr_scale=5.0)
    METHODS[method].check(cfg)
    as_dimension = build(small_cfg(method=method, zo_lr_rule="dimension", zo_lr_scale=5.0))[0]
    lesser = build(cfg)[0]
    assert lesser.server.client_lr == as_dimension.server.client_lr
    assert lesser.server.record.optimizer.param_groups[0]["lr"] == (
        as_dimension.server.record.optimizer.param_groups[0]["lr"]) < cfg.client_lr  # fmt: skip


@pytest.mark.parametrize(
    "bad, reason",
    [
        (lambda v: ProbeScalars(0, v), "expected the probes' sizes"),
        (lambda v: ProbeReport(0, v, torch.ones(2)), "probe sizes >= 0"),
        (lambda v: ProbeReport(0, v, -torch.ones(3)), "probe sizes >= 0"),
    ],
)
def test_the_output_rule_drops_a_client_without_valid_sizes(small_cfg, bad, reason):
    fed, _, _ = build(small_cfg(clients=4, sampled=3, zo_lr_rule="output"))
    sampled, plan = fed.server.plan(0)
    honest = {m: fed.clients[m].handle(plan) for m in sampled}
    lams, _ = fed.server.train(honest, 0)
    replies = {m: fed.clients[m].handle(lams[m]) for m in sampled}
    assert all(isinstance(r, ProbeReport) and bool((r.sizes > 0).all()) for r in replies.values())
    replies[sampled[0]] = bad(replies[sampled[0]].values)
    admitted = fed.server.admit(replies, 0, ProbeScalars)
    assert sorted(admitted) == sorted(sampled[1:])
    (rejection,) = fed.server.rejections
    assert rejection["client"] == sampled[0] and reason in rejection["reason"], rejection


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(zo_lr_rule="output", client_optimizer="adam"), "client_optimizer=sgd"),
        (dict(zo_lr_rule="lesser", client_optimizer="adam"), "client_optimizer=sgd"),
        (dict(zo_lr_rule="output", method="sfl-v1"), "method=sfl-v1 does not use zo_lr_rule"),
        (dict(zo_step=0.0), "zo_step"),
        (dict(directions="lowrank", method="zo-fl"), "zo-fl cannot run with directions='lowrank'"),
        (dict(directions="lowrank", zo_rank=0), "zo_rank"),
        (dict(directions="lowrank", zo_lazy=0), "zo_lazy"),
    ],
)
def test_settings_the_client_step_cannot_take_are_refused(small_cfg, settings, message):
    with pytest.raises(ConfigError, match=message):  # the config's checks, then the method's
        cfg = small_cfg(**settings)
        METHODS[cfg.method].check(cfg)
