"""The zeroth-order verbs: directions are reproducible, probes leave θ untouched, and the
estimate is an unbiased estimate of the true gradient whose error falls as P grows."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hosfl import directions as dirs
from hosfl import zo


def _estimate(model, x, lam, seeds, mu, kind="gaussian"):
    """ĝ as a client computes it: P probes, then the update verb with SGD(lr=1) on θ."""
    params = zo.trainable(model)
    with torch.no_grad():
        z = model(x)
        values = []
        for s in seeds:
            with zo.perturbed(model, s, mu, kind):
                values.append(zo.estimate(lam, model(x), zo.project(lam, z)))
    before = [p.detach().clone() for p in params]
    zo.apply_update_(params, seeds, values, mu, torch.optim.SGD(params, lr=1.0), kind)
    g = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, params, strict=True)])
    with torch.no_grad():
        for p, b in zip(params, before, strict=True):
            p.copy_(b)
    return g


def _true_grad(model, x, lam):
    params = zo.trainable(model)
    grads = torch.autograd.grad((lam * model(x)).sum(), params)
    return torch.cat([g.flatten() for g in grads])


def _linear():
    torch.manual_seed(0)
    return nn.Linear(4, 3).double(), torch.randn(8, 4, dtype=torch.float64)


def _mlp():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    return model, torch.randn(6, 3, dtype=torch.float64)


def test_direction_is_a_pure_function_of_seed_and_parameter():
    p = torch.empty(3, 4)
    assert torch.equal(zo.direction(7, 2, p), zo.direction(7, 2, p))
    assert not torch.equal(zo.direction(7, 2, p), zo.direction(8, 2, p))
    assert not torch.equal(zo.direction(7, 2, p), zo.direction(7, 3, p))
    assert zo.direction(7, 2, torch.empty(3, 4, dtype=torch.float64)).dtype == torch.float64


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), mu=st.floats(1e-4, 1.0), layout=st.booleans(),
       at_once=st.booleans())  # fmt: skip
def test_perturbed_forward_sees_theta_plus_mu_u_and_leaves_theta_untouched(
    seed, mu, layout, at_once
):
    model, x = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    target = zo.Layout(model) if layout else model
    with torch.no_grad(), zo.perturbed(target, seed, mu, at_once=at_once):
        out = model(x)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)  # bit for bit: no rounding drift from the probe
    expected = torch.func.functional_call(
        model,
        {n: p + mu * zo.direction(seed, i, p) for i, (n, p) in enumerate(model.named_parameters())},
        (x,),
    )
    assert torch.equal(out, expected)


@pytest.mark.parametrize("at_once", [False, True])
def test_a_forward_that_raises_inside_perturbed_leaves_theta_as_it_was(at_once):
    model, x = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad(), pytest.raises(RuntimeError, match="shape"):
        with zo.perturbed(model, 3, 0.5, at_once=at_once):
            model(x[:, :1])  # the wrong width: the first layer raises
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)


def test_frozen_parameters_are_neither_perturbed_nor_updated():
    model, x = _mlp()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    lam = torch.ones(6, 2, dtype=torch.float64)
    g = _estimate(model, x, lam, [1, 2, 3], 1e-3)
    assert g.numel() == sum(p.numel() for p in zo.trainable(model))
    with torch.no_grad(), zo.perturbed(model, 5, 1.0):
        seen = model[0].weight.detach().clone()
    assert torch.equal(seen, frozen)


def _mean_and_bound(model, x, lam, n, P, mu, kind="gaussian"):
    g = _true_grad(model, x, lam)
    est = torch.stack(
        [_estimate(model, x, lam, list(range(k * P, (k + 1) * P)), mu, kind) for k in range(n)]
    )
    # For Gaussian u, Var[ĝ_i] = (‖g‖² + g_i²) / P; the mean of n estimates has std sqrt(Var/n).
    std = ((g.pow(2).sum() + g.pow(2)) / (P * n)).sqrt()
    return est, g, std


def test_estimate_is_unbiased_on_a_linear_client():
    model, x = _linear()
    lam = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    est, g, std = _mean_and_bound(model, x, lam, n=2000, P=2, mu=1e-3)
    assert ((est.mean(0) - g).abs() < 4.5 * std).all()
    # and the spread matches the predicted variance (not an estimator that is trivially zero)
    predicted = (g.pow(2).sum() + g.pow(2)) / 2
    assert torch.allclose(est.var(0), predicted, rtol=0.25)


def test_estimate_matches_autograd_on_a_small_mlp():
    model, x = _mlp()
    lam = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    est, g, std = _mean_and_bound(model, x, lam, n=2000, P=4, mu=1e-5)
    assert ((est.mean(0) - g).abs() < 4.5 * std).all()


def test_estimate_error_shrinks_as_P_grows():
    model, x = _mlp()
    lam = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    g = _true_grad(model, x, lam)
    mse = {}
    for P in (1, 4, 16):
        est = torch.stack(
            [_estimate(model, x, lam, list(range(k * P, (k + 1) * P)), 1e-5) for k in range(300)]
        )
        mse[P] = (est - g).pow(2).sum(1).mean().item()
    # the mean squared error is (d + 1)‖g‖² / P: a factor 4 per step here, asserted loosely
    assert mse[4] < mse[1] / 2.5
    assert mse[16] < mse[4] / 2.5


@settings(max_examples=20, deadline=None)
@given(
    history=st.lists(
        st.tuples(
            st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=4),
            st.floats(-10, 10, width=32),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_replay_of_a_history_equals_the_live_updates(history):
    """Two replicas that receive the same (seeds, v̄) end bit-identical, whatever the log."""
    log = [(seeds, [v] * len(seeds)) for seeds, v in history]
    a, _ = _mlp()
    b, _ = _mlp()
    pa, pb = zo.trainable(a), zo.trainable(b)
    oa = torch.optim.Adam(pa, lr=1e-2)
    for seeds, values in log:  # live: one update per step, as the broadcast arrives
        zo.apply_update_(pa, seeds, values, 1e-3, oa)
    assert zo.replay_(pb, log, 1e-3, torch.optim.Adam(pb, lr=1e-2)) == len(log)
    assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))


def test_stateless_sgd_update_matches_torch_sgd_without_a_gradient_buffer():
    a, _ = _mlp()
    b, _ = _mlp()
    seeds, values = [3, 5, 8], [0.5, -1.25, 2.0]
    pa = zo.trainable(a)
    zo.apply_update_(pa, seeds, values, 1e-3, torch.optim.SGD(pa, lr=0.1))
    assert all(p.grad is None for p in pa)  # updated in place, no .grad was built
    # the reference: the same ĝ handed to torch's SGD as a gradient
    pb = zo.trainable(b)
    with torch.no_grad():
        for i, p in enumerate(pb):
            p.grad = sum(
                v / (3 * 1e-3) * zo.direction(s, i, p) for s, v in zip(seeds, values, strict=True)
            )
    torch.optim.SGD(pb, lr=0.1).step()
    assert all(torch.allclose(x, y, rtol=0, atol=1e-12) for x, y in zip(pa, pb, strict=True))


def _reference_rademacher(seed, index, n):
    """The spec of ``dirs.rademacher`` in plain Python integers: what any device must produce."""

    def mix(x):
        x = ((x ^ (x >> 16)) * 0x7FEB352D) & 0xFFFFFFFF
        x = ((x ^ (x >> 15)) * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    key = dirs._stream_seed(seed, index)
    k1, k2 = key & 0xFFFFFFFF, key >> 32 & 0xFFFFFFFF
    return [1 - 2 * (mix(mix(i ^ k1) ^ k2) >> 31) for i in range(n)]


@pytest.mark.parametrize(
    "seed, index, shape",
    [(0, 0, (7,)), (12345, 3, (40, 25)), (2**31 - 1, 9, (3, 4, 5)), (7, 2, (300, 300))],
)  # the last spans two of the 64 Ki-element slices the hash is computed in
def test_rademacher_directions_follow_their_integer_spec(seed, index, shape):
    u = dirs.rademacher(seed, index, torch.Size(shape), torch.device("cpu"))
    assert u.shape == shape and u.dtype == torch.float32
    assert u.flatten().int().tolist() == _reference_rademacher(seed, index, u.numel())
    assert abs(float(dirs.rademacher(seed, index, torch.Size([20000]), u.device).mean())) < 0.05


def test_the_cpu_and_accelerator_forms_of_the_counter_hash_give_the_same_bits():
    # numpy's wrapping uint32 on a CPU; torch int64 ops elsewhere (run here on the CPU)
    key = dirs._stream_seed(99, 4)
    for a, b in [(0, 1000), (70000, 71003), (2**32 - 5, 2**32)]:
        cpu = dirs._counter_bits(key, a, b, torch.device("cpu"))
        other = dirs._counter_bits_torch(key, a, b, torch.device("cpu"))
        assert cpu.dtype == other.dtype == torch.int64 and torch.equal(cpu, other)
    with pytest.raises(ValueError, match="2\\*\\*32 elements"):
        dirs._counter_bits(key, 0, 2**32 + 1, torch.device("cpu"))


def test_rademacher_estimate_is_unbiased_on_a_small_mlp():
    model, x = _mlp()
    lam = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    # Var[ĝ_i] = (‖g‖² − g_i²) / P for ±1 directions: within the Gaussian bound used here
    est, g, std = _mean_and_bound(model, x, lam, n=2000, P=4, mu=1e-5, kind="rademacher")
    assert ((est.mean(0) - g).abs() < 4.5 * std).all()


def test_bf16_probes_with_stochastic_rounding_keep_the_estimate_unbiased():
    """Weights of magnitude 1-2 have a bfloat16 spacing of 2⁻⁷ ≫ μ = 10⁻³. Round-to-nearest
    turns most perturbations into 0 and a few into a whole spacing: the mean estimate's norm
    is far off. Stochastic rounding keeps E[θ + μu] and the estimate's mean on the gradient."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(4, 6).sign() * (1 + torch.rand(4, 6)))
    x, lam = torch.randn(16, 6), torch.randn(16, 4)
    grad = lam.T @ x  # ∂(λᵀ(xWᵀ + b))/∂W
    mu, draws = 1e-3, 3000

    def mean_estimate(stochastic: bool) -> torch.Tensor:
        total = torch.zeros(4, 6)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            base = zo.project(lam, lin(x).float())
            for s in range(draws):
                with zo.perturbed(lin, s, mu, bf16=stochastic):
                    v = zo.estimate(lam, lin(x).float(), base)
                total += v / mu * zo.direction(s, 0, lin.weight)
        return total / draws

    ratio = {sr: float(mean_estimate(sr).norm() / grad.norm()) for sr in (True, False)}
    assert 0.9 < ratio[True] < 1.1
    assert ratio[False] > 1.4
    w = torch.tensor([1.0 + 2**-9, -1.0 - 2**-9, 3.0])  # a quarter of the way up; exact
    rounded = torch.stack([dirs.round_bf16(w, s, 0) for s in range(4000)])
    assert torch.equal(rounded.bfloat16().float(), rounded)  # bfloat16 values exactly
    assert rounded[:, 0].mean().item() == pytest.approx(1.0 + 2**-9, abs=2e-4)
    assert rounded[:, 1].mean().item() == pytest.approx(-1.0 - 2**-9, abs=2e-4)
    assert (rounded[:, 2] == 3.0).all()
    big = torch.randn(70_000)  # hashed in two slices: an element's bits depend on its index only
    assert torch.equal(dirs.round_bf16(big, 5, 1)[:1000], dirs.round_bf16(big[:1000], 5, 1))
