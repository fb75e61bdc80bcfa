"""Nothing lost, nothing trusted: a client that stays inside the type checks cannot wreck the
run; a damaged run folder is a clear error that changes nothing; one process per run folder;
settings out of range are refused with their bound."""

import dataclasses
import json
import shutil
import sqlite3
import subprocess
import sys

import pytest
import torch
from conftest import killed_at

from hosfl import checkpoint, runfolder
from hosfl.methods import hosfl as hosfl_method
from hosfl.methods.base import Diverged
from hosfl.protocol import ProbeScalars, ScalarBroadcast, SmashedData
from hosfl.replay import replay_run
from hosfl.runner import build, evaluate_checkpoint, resume, run

HOSFL = [sys.executable, "-m", "hosfl.cli"]
QUIET = {"log": lambda *a: None}
HONEST_HANDLE = hosfl_method.Client.handle


def _files(folder):
    """Every file of a run folder, byte for byte."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 30-step HO-SFL run whose last checkpoint is at step 20 (it was killed after step 26)."""
    from hosfl.config import Config

    folder = tmp_path_factory.mktemp("runs") / "run"
    cfg = Config(
        clients=5,
        sampled=3,
        batch_size=16,
        steps=30,
        P=3,
        train_subset=3000,
        test_subset=500,
        eval_every=0,
        snapshot_every=10,
        progress=False,
        out=str(folder),
    ).validate()
    with killed_at(hosfl_method.HOSFL, 26):
        run(cfg, **QUIET)
    return folder


@pytest.fixture
def folder(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def _cli(*args):
    return subprocess.run([*HOSFL, *map(str, args)], capture_output=True, text=True, timeout=300)


# --- damaged run folders: a clear error, and nothing in the folder changes -----------------


def _flip_a_tensor_bit(path):
    data = bytearray(path.read_bytes())
    state = torch.load(path, weights_only=True)
    weight = state["client"]["conv2.0.weight"].numpy().tobytes()
    at = bytes(data).index(weight[:64]) + 17  # inside the stored tensor
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


def _rewrite(path, change, forge=False):
    """Change a checkpoint's contents; keep its old digest, or ``forge`` a matching one."""
    state = torch.load(path, weights_only=True)
    change(state)
    if forge:
        state["digest"] = checkpoint.digest(state)
    torch.save(state, path)


def _journal(folder, sql, *args):
    db = sqlite3.connect(folder / "journal.sqlite")
    db.execute(sql, args)
    db.commit()
    db.close()


DAMAGE = {
    "a flipped bit in a checkpoint tensor": (
        lambda f: _flip_a_tensor_bit(f / "checkpoint.pt"),
        "digest",
    ),
    "a negative checkpoint step": (
        lambda f: _rewrite(f / "checkpoint.pt", lambda s: s.update(step=-5)),
        "digest",
    ),
    "a checkpoint config that is not a table": (
        lambda f: _rewrite(f / "checkpoint.pt", lambda s: s.update(config=3)),
        "digest",
    ),
    "a zeroed journal row": (
        lambda f: _journal(f, "UPDATE steps SET vbar = zeroblob(12) WHERE step = 4"),
        "row 4 fails its checksum",
    ),
    "an odd-length journal row": (
        lambda f: _journal(f, "UPDATE steps SET vbar = zeroblob(7) WHERE step = 4"),
        "row 4",
    ),
    "a missing journal": (lambda f: (f / "journal.sqlite").unlink(), "journal.sqlite is missing"),
    "a garbled journal": (
        lambda f: (f / "journal.sqlite").write_bytes(b"\0" * 4096),
        "not a journal",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_run_folder_is_a_clear_error_that_changes_nothing(folder, damage):
    hurt, message = DAMAGE[damage]
    hurt(folder)
    before = _files(folder)
    done = _cli("resume", folder)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert _files(folder) == before


def test_a_checkpoint_whose_contents_do_not_fit_is_a_clear_error(folder):
    def wrong_shape(state):
        state["client"]["conv2.0.weight"] = torch.zeros(3, 3)

    _rewrite(folder / "checkpoint.pt", wrong_shape, forge=True)  # consistent, but wrong
    before = _files(folder)
    for args in (["resume", folder], ["eval", folder / "checkpoint.pt"]):
        done = _cli(*args)
        assert done.returncode == 2 and "does not fit" in done.stderr, done.stderr
    assert _files(folder) == before


def test_eval_and_replay_check_the_digest_too(folder):
    _flip_a_tensor_bit(folder / "checkpoint.pt")
    for call in (lambda: evaluate_checkpoint(folder / "checkpoint.pt"), lambda: replay_run(folder)):
        with pytest.raises(checkpoint.CheckpointError, match="digest"):
            call()


def test_replay_never_writes_to_an_empty_journal_file(folder):
    (folder / "journal.sqlite").write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointError, match="not a journal"):
        replay_run(folder)
    assert (folder / "journal.sqlite").read_bytes() == b""


def test_a_damaged_metrics_line_is_kept_and_no_row_is_ever_deleted(folder):
    path = folder / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[5] = '{"event": "tr'  # garbled
    path.write_text("\n".join(lines) + "\n")
    before = path.read_bytes()
    result = resume(folder, **QUIET)
    after = path.read_bytes()
    assert after.startswith(before)  # appended to, never rewritten
    rows, damaged = runfolder.read_metrics(path)
    assert damaged == [6]
    steps = [r["step"] for r in rows if r["event"] == "train"]
    # the steps after the checkpoint were redone: the rows in force count each step once
    assert sorted(steps) == [s for s in range(1, 31) if s != 6]
    assert result.steps == 30


def test_a_run_killed_right_after_its_config_is_resumed_from_the_start(small_cfg, tmp_path):
    cfg = small_cfg(steps=5, eval_every=0)
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.toml").write_text(cfg.to_toml())
    result = resume(folder, **QUIET)
    reference = run(small_cfg(steps=5, eval_every=0, out=str(tmp_path / "ref")), **QUIET)
    assert result.accuracy == reference.accuracy


def test_one_process_at_a_time_in_a_run_folder(folder):
    before = _files(folder)
    with runfolder.locked(folder):  # another process is running, resuming or replaying it
        done = _cli("resume", folder)
        assert done.returncode == 2 and "in use by another hosfl process" in done.stderr
        done = _cli("replay", folder)
        assert done.returncode == 2 and "in use" in done.stderr
    assert _files(folder) == before


# --- clients that stay inside the type checks --------------------------------------------


def _attack(monkeypatch, kind, value):
    """Client 0 answers with ``value`` in every smashed-data tensor or probe scalar; with
    ``value`` None its answers are simply of another step: the client is absent."""

    def hostile(self, msg):
        reply = HONEST_HANDLE(self, msg)
        if self.shard.cid != 0 or not isinstance(reply, kind):
            return reply
        if value is None:
            return dataclasses.replace(reply, step=reply.step + 1)
        if kind is SmashedData:
            return SmashedData(reply.step, torch.full_like(reply.z, value), reply.y)
        return ProbeScalars(reply.step, torch.full_like(reply.values, value))

    monkeypatch.setattr(hosfl_method.Client, "handle", hostile)


@pytest.mark.parametrize(
    ("kind", "value"), [(ProbeScalars, 3e38), (ProbeScalars, 1e30), (SmashedData, 1e38)]
)
def test_a_client_sending_huge_finite_values_changes_nothing_but_its_own_absence(
    small_cfg, tmp_path, monkeypatch, kind, value
):
    cfg = dict(clients=4, sampled=3, steps=60, eval_every=0)
    _attack(monkeypatch, kind, None)
    absent = run(small_cfg(**cfg, out=str(tmp_path / "absent")), **QUIET)
    _attack(monkeypatch, kind, value)
    attacked = run(small_cfg(**cfg, out=str(tmp_path / "attacked")), **QUIET)
    assert attacked.summary["diverged_at"] is None
    assert attacked.summary["rejected"] == absent.summary["rejected"] > 0
    # the run goes on exactly as if the attacker had sent nothing usable: same weights
    for a, b in (
        (attacked.client_model, absent.client_model),
        (attacked.server_model, absent.server_model),
    ):
        assert all(
            torch.equal(x, y)
            for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
        )
    assert attacked.accuracy == absent.accuracy
    rows, _ = runfolder.read_metrics(attacked.out / "metrics.jsonl")
    rejects = [r for r in rows if r["event"] == "reject"]
    assert {r["client"] for r in rejects} == {0}
    assert all("median of recent uploads" in r["reason"] for r in rejects), rejects[:3]


def test_an_update_that_would_move_theta_absurdly_is_never_committed(small_cfg):
    fed, _, _ = build(small_cfg())
    sent = []

    class Engine:
        def broadcast(self, msg):
            sent.append(msg)

    plan = fed.server.plan(0)[1]
    huge = ScalarBroadcast(0, plan.seeds, torch.full((len(plan.seeds),), 1e30))
    with pytest.raises(Diverged, match="would move θ_c"):
        fed.server.commit(huge, Engine())
    assert sent == [] and fed.server.replica.step == 0


def test_a_large_update_within_the_bound_of_a_large_theta_is_committed(small_cfg):
    """|θ_c| is only computed for a move over the bound's floor: there it is still read."""
    fed, _, _ = build(small_cfg())
    replica, sent = fed.server.replica, []

    class Engine:
        def broadcast(self, msg):
            sent.append(msg)

    with torch.no_grad():
        for p in replica.params:
            p.fill_(1e4)  # |θ_c| ≫ 1: the bound is 100·|θ_c|
    plan = fed.server.plan(0)[1]
    values = torch.ones(len(plan.seeds))
    moved = replica.movement(ScalarBroadcast(0, plan.seeds, values))
    scale = 1e3 / moved  # a move of 1 000: over 100, under 100·|θ_c|
    fed.server.commit(ScalarBroadcast(0, plan.seeds, values * scale), Engine())
    assert len(sent) == 1 and replica.step == 1


# --- settings at their edges ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("steps=1e30", "<= 100,000,000"),
        ("P=1e8", "<= 4,096"),
        ("batch_size=1e9", "<= 1,048,576"),
        ("batch_size=5000", "no client holds that many"),
    ],
)
def test_settings_out_of_range_name_their_bound(tmp_path, setting, message):
    done = _cli("run", setting, "train_subset=3000", f"out={tmp_path / 'r'}")
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "r").exists()


def test_an_unwritable_out_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    done = _cli("run", "steps=1", "train_subset=3000", f"out={tmp_path / 'file' / 'run'}")
    assert done.returncode == 2 and "cannot write a run folder there" in done.stderr, done.stderr


@pytest.mark.parametrize("setting", ["mu=1e300", "client_lr=1e30"])
def test_non_finite_training_at_step_one_is_divergence(tmp_path, setting):
    out = tmp_path / "r"
    done = _cli(
        "run",
        setting,
        "steps=3",
        "train_subset=3000",
        "test_subset=300",
        "progress=false",
        f"out={out}",
    )
    assert done.returncode == 3, (done.returncode, done.stderr[-500:])
    assert "diverged at step 1" in done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diverged_cause"]


def test_eval_refuses_a_step_outside_the_run(folder):
    _rewrite(folder / "checkpoint.pt", lambda s: s.update(step=10**6), forge=True)
    done = _cli("eval", folder / "checkpoint.pt")
    assert done.returncode == 2 and "step 1000000" in done.stderr, done.stderr


def test_clipped_aggregation_bounds_one_client_inside_the_outlier_bound(small_cfg):
    fed, _, _ = build(small_cfg(clients=4, sampled=3, aggregate="clipped"))
    sampled, plan = fed.server.plan(0)
    honest = torch.tensor([[1.0, -2.0, 0.5], [1.2, -1.8, 0.4], [0.9, -2.1, 0.6]])
    scalars = {m: ProbeScalars(0, v) for m, v in zip(sampled, honest, strict=True)}
    scalars[sampled[0]] = ProbeScalars(0, honest[0] * 100)  # inside 1000×, 100× too long
    got = fed.server.aggregate(plan, scalars).values
    norm = torch.stack([s.values for s in scalars.values()]).norm(dim=1).median()
    assert got.norm() <= norm * (1 + 1e-6)  # no longer than the median client's vector
    assert torch.allclose(
        fed.server.aggregate(
            plan, {m: ProbeScalars(0, v) for m, v in zip(sampled, honest, strict=True)}
        ).values,
        honest.mean(0),
        atol=0.05,
    )
