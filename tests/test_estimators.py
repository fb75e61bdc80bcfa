"""The client's zeroth-order step against its heavy tail: ``zo_clip`` bounds what one outlier
step can do to θ_c, and the capped run still replays bit for bit from its journal."""

import math

import torch

from hosfl.protocol import ScalarBroadcast
from hosfl.replay import replay_run
from hosfl.runner import build, run


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
