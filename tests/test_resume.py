"""Crash recovery: a server process killed mid-run and resumed ends exactly where an
uninterrupted run ends; the steps redone are checked against the journal."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import journal_entries

from hosfl import checkpoint
from hosfl.config import Config
from hosfl.runner import resume, run

HOSFL = [sys.executable, "-m", "hosfl.cli"]
ARGS = [
    "steps=120",
    "clients=4",
    "sampled=2",
    "batch_size=16",
    "P=3",
    "train_subset=3000",
    "test_subset=500",
    "eval_every=40",
    "snapshot_every=10",
    "progress=false",
]


def _last_step(metrics) -> int:
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return 0
    rows = [json.loads(x) for x in lines[:-1]]  # the last line may be half written
    return max((r["step"] for r in rows), default=0)


def _evals(folder):
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["test_acc"], r["bytes"]) for r in rows if r["event"] == "eval"]


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_a_killed_server_resumed_ends_with_the_uninterrupted_weights(tmp_path, engine):
    killed = tmp_path / "killed"
    args = [*ARGS, f"engine={engine}"]
    # its own session: the kill takes the server and everything it started (Ray's processes)
    one = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the reference run below
    proc = subprocess.Popen(
        [*HOSFL, "run", *args, f"out={killed}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=one,
    )
    deadline = time.monotonic() + 180
    while _last_step(killed / "metrics.jsonl") < 45 and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    at = checkpoint.load(killed / "checkpoint.pt")["step"]
    assert 40 <= at < 120, at  # killed after an evaluation, before the end
    done = subprocess.run([*HOSFL, "resume", str(killed)], capture_output=True, text=True, env=one)
    assert done.returncode == 0, done.stderr
    # the uninterrupted run, in this process on the same one thread (Ray's clients give the
    # in-process weights bit for bit: tests/test_ray.py)
    full = tmp_path / "full"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(Config.load(None, [*ARGS, f"out={full}"]), log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    a, b = checkpoint.load(killed / "checkpoint.pt"), checkpoint.load(full / "checkpoint.pt")
    assert a["step"] == b["step"] == 120
    for part in ("client", "server"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in b[part])
    assert journal_entries(killed) == journal_entries(full)
    resumed, straight = _evals(killed), _evals(full)
    assert [r[:2] for r in resumed] == [r[:2] for r in straight]  # same steps, same accuracy
    if engine == "local":  # the byte ledger, too, went on where it stopped
        assert resumed == straight
    else:  # Ray's clients also answer state queries, and the restarted ones caught up from
        # the journal: that traffic is counted
        assert all(r[2] >= s[2] for r, s in zip(resumed, straight, strict=True))
        assert resumed[-1][2] > straight[-1][2]
    again = subprocess.run([*HOSFL, "resume", str(killed)], capture_output=True, text=True)
    assert again.returncode == 2 and "is complete" in again.stderr


def test_a_journal_that_disagrees_with_the_redone_steps_stops_the_resume(small_cfg, tmp_path):
    cfg = small_cfg(steps=30, snapshot_every=10, eval_every=0)
    result = run(cfg, log=lambda *a: None)
    state = checkpoint.load(result.out / "checkpoint.pt")
    state["step"] = 10  # pretend the crash came after step 10: steps 10.. are redone
    state["replica"]["step"] = 10
    state["server"] = {k: v + 1e-3 for k, v in state["server"].items()}  # but from other weights
    checkpoint.save(result.out / "checkpoint.pt", state)
    try:
        resume(result.out, log=lambda *a: None)
    except checkpoint.CheckpointError as e:
        assert "differs from the journal" in str(e)
    else:
        raise AssertionError("a resume that diverges from the journal must stop")
