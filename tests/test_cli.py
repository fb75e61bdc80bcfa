"""The command line as a user meets it: help, a short run, and one-line errors (exit 2) that
leave everything on disk as it was."""

import gzip
import http.server
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import journal_entries as _journal

from hosfl.data import fashion_mnist

HOSFL = [sys.executable, "-m", "hosfl.cli"]
SHORT = [
    "steps=4",
    "clients=3",
    "sampled=2",
    "train_subset=300",
    "test_subset=100",
    "progress=false",
]


def hosfl(*args, env=None, cwd=None):
    return subprocess.run(
        [*HOSFL, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def test_help_lists_every_setting_with_its_help():
    out = hosfl("run", "--help").stdout
    for key in (
        "clients",
        "sampled",
        "batch_size",
        "steps",
        "P",
        "mu",
        "client_optimizer",
        "client_lr",
        "server_optimizer",
        "server_lr",
        "cut",
        "partition",
        "alpha",
        "seed",
        "eval_every",
        "out",
    ):
        assert f"  {key} " in out


def test_a_short_run_then_eval_and_replay_of_its_folder(tmp_path):
    out = tmp_path / "run"
    done = hosfl("run", *SHORT, f"out={out}")
    assert done.returncode == 0, done.stderr
    assert "test accuracy" in done.stdout and "bytes up: scalars" in done.stdout
    assert "client  " in done.stdout  # the label histogram
    ev = hosfl("eval", str(out / "checkpoint.pt"))
    assert ev.returncode == 0 and "test accuracy" in ev.stdout
    rp = hosfl("replay", str(out))
    assert rp.returncode == 0 and "bit-identical" in rp.stdout
    cfg_run = hosfl("run", "--config", str(out / "config.toml"), f"out={tmp_path / 'again'}")
    assert cfg_run.returncode == 0, cfg_run.stderr
    assert _journal(tmp_path / "again") == _journal(out)


@pytest.mark.parametrize(
    "args, message",
    [
        (["colour=red"], "unknown key 'colour'"),
        (["sampled=11"], "sampled=11"),
        (["P=0"], "P=0: must be >= 1"),
        (["mu=0"], "mu=0.0: must be a finite number > 0"),
        (["mu=nan"], "mu=nan"),
        (["client_lr=-1"], "client_lr=-1.0"),
        (["steps=ten"], "steps='ten': expected int"),
        (["partition=random"], "partition='random': must be one of"),
        (["cut=fc9"], "cut='fc9' is not a cut point of fmnist-cnn (valid: conv1, conv2, fc1)"),
        (["task=cifar"], "unknown task 'cifar' (valid: fmnist-cnn,"),
        (["clients"], "not of the form key=value"),
        (["--config", "/nonexistent.toml"], "does not exist"),
    ],
)
def test_bad_configs_fail_in_one_line_with_exit_2_and_write_nothing(tmp_path, args, message):
    done = hosfl("run", *args, f"out={tmp_path / 'never'}", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert not (tmp_path / "never").exists() and not (tmp_path / "runs").exists()


def test_an_invalid_toml_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = = 3\n")
    done = hosfl("run", "--config", str(bad))
    assert done.returncode == 2 and "not valid TOML" in done.stderr


def test_an_existing_run_folder_is_never_overwritten(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    done = hosfl("run", *SHORT, f"out={out}")
    assert done.returncode == 2 and "already exists" in done.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("damage", [b"", b"not a checkpoint", b"PK\x03\x04" + bytes(100)])
def test_a_corrupt_checkpoint_is_a_clear_error(tmp_path, damage):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(damage)
    done = hosfl("eval", str(bad))
    assert done.returncode == 2 and "corrupt" in done.stderr
    assert done.stderr.count("\n") == 1
    assert bad.read_bytes() == damage


def test_a_truncated_real_checkpoint_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    assert hosfl("run", *SHORT, f"out={out}").returncode == 0
    ckpt = out / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    done = hosfl("eval", str(ckpt))
    assert done.returncode == 2 and "corrupt" in done.stderr


def test_missing_dataset_says_how_to_get_it(tmp_path):
    env = {"HOSFL_DATA": str(tmp_path / "empty"), "HOSFL_FMNIST_MIRROR": "http://127.0.0.1:9/"}
    done = hosfl("run", *SHORT, f"out={tmp_path / 'never'}", env=env)
    assert done.returncode == 2
    assert "apt-get install dataset-fashion-mnist" in done.stderr
    assert not (tmp_path / "never").exists()


def _idx(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def test_download_fetches_the_original_files_when_they_are_missing(tmp_path, monkeypatch):
    """A loopback HTTP server stands in for the mirror, serving tiny real-format IDX files."""
    site = tmp_path / "site"
    site.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("test", 10)):
        images, labels = fashion_mnist.FILES[split]
        (site / images).write_bytes(_idx(rng.integers(0, 256, (n, 28, 28)), 0x803))
        (site / labels).write_bytes(_idx(np.arange(n) % 10, 0x801))
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(site))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HOSFL_DATA", str(tmp_path / "cache"))
        x, y = fashion_mnist.load("train", mirror=f"http://127.0.0.1:{server.server_port}/")
    finally:
        server.shutdown()
    assert x.shape == (20, 1, 28, 28) and y.tolist() == [i % 10 for i in range(20)]
    assert (tmp_path / "cache" / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").exists()


def test_a_diverging_run_stops_with_a_clear_message_and_keeps_its_folder(tmp_path):
    out = tmp_path / "run"
    done = hosfl("run", *SHORT, "client_lr=1e6", "steps=20", f"out={out}")
    assert done.returncode == 3
    assert "training diverged at step 1: the step's update would move θ_c" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diverged_at"] == 1 and "would move θ_c" in summary["diverged_cause"]
