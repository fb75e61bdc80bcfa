"""The run folder's last gaps (issue 30): a moved folder resumes, a resume that fails changes
nothing, files of releases before checksums are refused unless asked for, every JSON file is
JSON, refusals cannot flood the log, and settings go anywhere on the command line."""

import json
import shutil
import sqlite3
import struct

import pytest
import torch
from conftest import killed_at

from hosfl import checkpoint
from hosfl.cli import main
from hosfl.journal import _check
from hosfl.methods.hosfl import HOSFL
from hosfl.runfolder import read_metrics
from hosfl.runner import resume, run

QUIET = dict(log=lambda *a: None)


def _killed(cfg, step):
    with killed_at(HOSFL, step):
        run(cfg, **QUIET)


def test_a_moved_folder_that_crashed_again_resumes(small_cfg, tmp_path):
    cfg = small_cfg(steps=24, snapshot_every=5, eval_every=0, out=str(tmp_path / "a"))
    whole = run(small_cfg(steps=24, eval_every=0, out=str(tmp_path / "whole")), **QUIET)
    _killed(cfg, 8)
    shutil.move(tmp_path / "a", tmp_path / "b")  # moved: its files still say out=.../a
    with killed_at(HOSFL, 17):
        resume(tmp_path / "b", **QUIET)  # crashed again, after a checkpoint written from b
    done = resume(tmp_path / "b", **QUIET)
    mine, reference = done.client_model.state_dict(), whole.client_model.state_dict()
    assert all(torch.equal(mine[k], reference[k]) for k in reference)


def test_a_resume_that_fails_on_a_journal_row_changes_nothing(small_cfg, tmp_path):
    folder = tmp_path / "run"
    _killed(small_cfg(steps=30, snapshot_every=10, eval_every=10, out=str(folder)), 27)
    # the checkpoint is of step 20; the journal and the metrics go on to 27
    with sqlite3.connect(folder / "journal.sqlite") as db:  # row 24 altered, its checksum too
        seeds, vbar = db.execute("SELECT seeds, vbar FROM steps WHERE step = 24").fetchone()
        vbar = struct.pack("<f", 0.5) + vbar[4:]
        db.execute("UPDATE steps SET vbar = ?, checksum = ? WHERE step = 24",
                   (vbar, _check(24, seeds, vbar)))  # fmt: skip
    rows_before, _ = read_metrics(folder / "metrics.jsonl")
    checkpoint_before = (folder / "checkpoint.pt").read_bytes()
    with pytest.raises(checkpoint.CheckpointError, match="step 24 redone differs"):
        resume(folder, **QUIET)
    assert read_metrics(folder / "metrics.jsonl")[0] == rows_before
    assert max(r["step"] for r in rows_before if r["event"] == "train") == 27
    assert (folder / "checkpoint.pt").read_bytes() == checkpoint_before


def test_files_without_checksums_or_digests_are_refused_unless_asked_for(small_cfg, tmp_path):
    folder = tmp_path / "run"
    _killed(small_cfg(steps=20, snapshot_every=5, eval_every=0, out=str(folder)), 12)
    with sqlite3.connect(folder / "journal.sqlite") as db:  # as an earlier release wrote it
        db.execute("ALTER TABLE steps DROP COLUMN checksum")
    with pytest.raises(checkpoint.CheckpointError, match="before journal rows carried checksums"):
        resume(folder, **QUIET)
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    del state["digest"]
    state["format"] = "hosfl-checkpoint-1"
    torch.save(state, folder / "old.pt")
    with pytest.raises(checkpoint.CheckpointError, match="before checkpoints carried a digest"):
        checkpoint.load(folder / "old.pt")
    assert checkpoint.load(folder / "old.pt", legacy=True)["step"] == 10
    assert resume(folder, legacy=True, **QUIET).steps == 20


def _strict(text):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_a_diverged_run_writes_json_that_any_parser_reads(small_cfg, tmp_path):
    result = run(small_cfg(method="fedavg", client_lr=1e30, steps=3, out=str(tmp_path / "r")),
                 **QUIET)  # fmt: skip
    summary = _strict((result.out / "summary.json").read_text())
    assert summary["diverged_at"] in (1, 2, 3) and summary["test_acc"] is None
    for line in (result.out / "metrics.jsonl").read_text().splitlines():
        _strict(line)


def test_settings_go_before_and_after_the_config_file(tmp_path, capsys):
    toml = tmp_path / "c.toml"
    toml.write_text("clients = 4\n")
    assert main(["run", "sampled=9", "--config", str(toml), "eval_every=1"]) == 2
    assert "sampled=9: cannot sample more clients than clients=4" in capsys.readouterr().err
    assert main(["compare", "P=0", "--config", str(toml), "steps=2", "--out", str(tmp_path)]) == 2
    assert "P=0: must be >= 1" in capsys.readouterr().err
