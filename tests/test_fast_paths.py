"""The simulation's fast paths give the bits of the plain ones: the CNN's pooling, and the
directions that in-process clients share within a step."""

import torch
from conftest import killed_at
from torch import nn

from hosfl import directions as d
from hosfl import runner
from hosfl.methods.hosfl import HOSFL
from hosfl.metrics.memory import LiveTensorMeter
from hosfl.replay import replay_run
from hosfl.tasks.fmnist_cnn import MaxPool2d


def test_the_cnns_pooling_gives_the_librarys_values_and_gradients_ties_and_nan_included():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (4, 3, 8, 6), generator=g).float()  # many tied windows
    x[0, 0, 0, 0] = float("nan")
    x[1, 1] = 0.0  # a whole map of ties, as after a ReLU
    ours, theirs = MaxPool2d(), nn.MaxPool2d(2)
    with torch.no_grad():
        for part in (x, x[:, :, :7]):  # odd sizes go the library's way
            torch.testing.assert_close(ours(part), theirs(part), rtol=0, atol=0, equal_nan=True)
    weights = torch.randn(4, 3, 4, 3, generator=g)
    grads = []
    for pool in (ours, theirs):
        leaf = x.nan_to_num().requires_grad_(True)
        (pool(leaf) * weights).sum().backward()
        grads.append(leaf.grad)
    assert torch.equal(*grads)
    # what the backward keeps: the maxima's indices, as the library's pooling, not the
    # channels-last copy of the input (a backprop client would pay it in peak memory)
    kept = []
    for pool in (ours, theirs):
        leaf = torch.randn(8, 16, 28, 28, generator=g).requires_grad_(True)
        with LiveTensorMeter() as meter:
            out = pool(leaf)
        kept.append(meter.current - out.nbytes)
    assert kept[0] == kept[1] == 8 * 16 * 14 * 14 * 8  # int64 indices, one per output


def test_a_steps_directions_made_once_are_the_bits_made_anew_and_the_memo_stays_bounded():
    theta = torch.randn(300, 7, generator=torch.Generator().manual_seed(1))
    kinds = [d.Directions("rademacher"), d.Directions("gaussian"),
             d.Directions("lowrank", rank=2, lazy=3, salt=5)]  # fmt: skip
    memo = d.Memo(limit_bytes=3 * theta.nbytes)
    for step in (4, 5):
        for how in (k.at(step) for k in kinds):
            fresh = [d.direction(s, 2, theta, how) for s in (11, 12)]
            moved = [d.shifted(s, 2, theta, how, 1e-3) for s in (11, 12)]
            for _ in range(2):  # made, then read back
                with d.remembering(memo):
                    for s, u, w in zip((11, 12), fresh, moved, strict=True):
                        assert torch.equal(d.direction(s, 2, theta, how), u)
                        assert torch.equal(d.shifted(s, 2, theta, how, 1e-3), w)
                        d.direction(s, 2, theta, how).mul_(7)  # a caller's copy: the memo keeps u
            assert memo.bytes <= memo.limit and memo.step == step
    kept = [key[2] if key[0] == "μu" else key[0] for key in memo.kept]
    assert kept and all(how.step == 5 for how in kept)  # step 4's are gone


def test_a_steps_directions_hashed_together_are_the_bits_made_one_by_one():
    g = torch.Generator().manual_seed(2)
    params = [torch.randn(5, 3, generator=g), torch.randn(1, generator=g),
              torch.randn(d._TOGETHER + 1, generator=g),  # too large: made as before
              torch.randn(4, 2, generator=g, dtype=torch.float64),  # not float32: as before
              torch.randn(300, 7, generator=g)]  # fmt: skip
    seeds = [3, 2**31 - 1, 0]
    for how in (d.Directions("rademacher").at(6), d.Directions("gaussian")):
        alone = [[d.direction(s, i, p, how) for i, p in enumerate(params)] for s in seeds]
        memo = d.Memo()
        with d.remembering(memo):
            d.prefill(seeds, params, how)
            filled = len(memo.kept)
            for s, made in zip(seeds, alone, strict=True):
                for i, (p, u) in enumerate(zip(params, made, strict=True)):
                    assert torch.equal(d.direction(s, i, p, how), u)
                    assert torch.equal(d.shifted(s, i, p, how, 1e-3), u * 1e-3 + p)
        assert filled == (9 if how.kind == "rademacher" else 0)  # 3 small float32 × 3 seeds
    d.prefill(seeds, params, d.Directions("rademacher"))  # no memo open: nothing, no error


def test_a_batched_run_killed_resumes_to_the_uninterrupted_weights_and_replays(small_cfg, tmp_path):
    cfg = dict(simulate="batched", steps=16, snapshot_every=5, eval_every=0, sampled=3)
    whole = runner.run(small_cfg(**cfg, out=str(tmp_path / "whole")), log=lambda *a: None)
    assert replay_run(whole.out).identical  # the journal rebuilds θ_c bit for bit
    with killed_at(HOSFL, 12):
        runner.run(small_cfg(**cfg, out=str(tmp_path / "killed")), log=lambda *a: None)
    resumed = runner.resume(tmp_path / "killed", log=lambda *a: None)
    for a, b in ((whole.client_model, resumed.client_model),
                 (whole.server_model, resumed.server_model)):  # fmt: skip
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                     b.state_dict().values(), strict=True))
