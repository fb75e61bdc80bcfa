"""hosfl compare and hosfl plot: one folder with a table, a CSV and plots, from real runs."""

import csv
import shutil
import subprocess
import sys

import pytest

from hosfl.compare import _for, _gain, _row, compare
from hosfl.config import ConfigError
from hosfl.metrics.plots import legend, load_run, title


def test_compare_runs_each_method_on_the_same_budget_and_writes_table_and_plots(tmp_path):
    overrides = [
        "steps=12",
        "clients=4",
        "sampled=2",
        "train_subset=2000",
        "test_subset=300",
        "eval_every=4",
        "progress=false",
    ]
    rows = compare(
        ["hosfl", "sfl-v1", "frozen"],
        overrides,
        str(tmp_path / "cmp"),
        target=0.05,
        log=lambda *a: None,
    )
    by = {r["method"]: r for r in rows}
    acc = {m: r["final"] for m, r in by.items()}
    if acc["sfl-v1"] - acc["frozen"] >= 0.01:
        expected = (acc["hosfl"] - acc["frozen"]) / (acc["sfl-v1"] - acc["frozen"])
        assert by["hosfl"]["gain_recovered"] == pytest.approx(expected)
    else:
        assert by["hosfl"]["gain_recovered"] is None
    assert all(r["steps_to_target"] == 4 for r in rows)  # every method beats 5% at step 4
    # what keeps clients in sync, per sampled client per step (M=4, K=2, P=5 by default):
    # HO-SFL 4P scalars up, 4P seeds in the plan, 8P to each of M clients in the broadcast;
    # SplitFed V1 4·d_c of weights up, and 4·d_c down to each sampled client that fetches it.
    d_c, P, m_over_k = 4800, 5, 4 / 2
    assert by["hosfl"]["sync_bytes_per_client_step"] == 4 * P + 4 * P + 8 * P * m_over_k
    assert by["sfl-v1"]["sync_bytes_per_client_step"] == 4 * d_c * 2
    assert by["frozen"]["sync_bytes_per_client_step"] == 0
    assert by["hosfl"]["peak_over_inference"] <= 1.2
    assert by["sfl-v1"]["client_peak_bytes"] >= 1.5 * by["hosfl"]["client_peak_bytes"]
    folder = tmp_path / "cmp"
    with open(folder / "results.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["hosfl", "sfl-v1", "frozen"]
    assert "| hosfl |" in (folder / "results.md").read_text()
    for png in ("accuracy_vs_step.png", "accuracy_vs_bytes.png", "client_memory.png"):
        assert (folder / png).read_bytes()[:4] == b"\x89PNG"

    redraw = tmp_path / "redraw"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "hosfl.cli",
            "plot",
            str(folder / "hosfl"),
            str(folder / "frozen"),
            "--out",
            str(redraw),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert (redraw / "accuracy_vs_bytes.png").exists()
    labelled = subprocess.run(
        [sys.executable, "-m", "hosfl.cli", "plot", f"{folder / 'hosfl'}:first",
         f"{folder / 'frozen'}:second", "--out", str(tmp_path / "labelled")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert labelled.returncode == 0, labelled.stderr
    shutil.copytree(folder / "hosfl", tmp_path / "again")
    runs = [load_run(folder / "hosfl"), load_run(tmp_path / "again")]
    assert legend(runs) == ["hosfl (hosfl)", "hosfl (again)"]  # two runs of one method
    assert legend(runs, ["a", "b"]) == ["a", "b"]
    assert title(runs) == "fmnist-cnn: cut=conv2, M=4, K=2, B=32, partition=iid, steps=12, P=5"
    assert [e["step"] for e in runs[0]["evals"]] == [0, 4, 8, 12]  # the curve starts untrained


def test_compare_rejects_unknown_methods_in_one_line(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "hosfl.cli",
            "compare",
            "--methods",
            "hosfl,magic",
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "unknown magic" in done.stderr
    assert not (tmp_path / "x").exists()


def test_plot_of_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "hosfl.cli", "plot", str(tmp_path)], capture_output=True, text=True
    )
    assert done.returncode == 2 and "not a finished run folder" in done.stderr


def test_a_run_folder_from_before_metric_names_reads_as_accuracy(small_cfg):
    import json

    from hosfl.runner import run

    result = run(small_cfg(steps=4, eval_every=2), log=lambda *a: None)
    summary = json.loads((result.out / "summary.json").read_text())
    for key in ("metric", "higher_is_better"):  # as a run folder of an earlier release
        del summary[key]
    (result.out / "summary.json").write_text(json.dumps(summary))
    old = load_run(result.out)
    assert (old["metric"], old["metric_key"], old["higher_is_better"]) == ("accuracy", "test_acc",
                                                                           True)  # fmt: skip
    assert _row(old, 0.05)["final"] == summary["test_acc"]


def test_gain_recovered_is_the_share_of_the_first_order_gain_over_a_frozen_client():
    rows = [
        {"method": "frozen", "final": 0.80},
        {"method": "sfl-v1", "final": 0.90},
        {"method": "hosfl", "final": 0.88},
        {"method": "zo-sfl", "final": 0.70},
    ]
    _gain(rows)
    assert [r["gain_recovered"] for r in rows] == pytest.approx([0.0, 1.0, 0.8, -1.0])
    alone = [{"method": "hosfl", "final": 0.88}]
    _gain(alone)
    assert alone[0]["gain_recovered"] is None  # no frozen or SplitFed V1 row to compare with
    no_gain = [{"method": "frozen", "final": 0.80}, {"method": "sfl-v1", "final": 0.805},
               {"method": "hosfl", "final": 0.81}]  # fmt: skip
    _gain(no_gain)
    assert [r["gain_recovered"] for r in no_gain] == [None] * 3  # SplitFed V1 gains < 1 point
    below = [{"method": "frozen", "final": 0.9167}, {"method": "sfl-v1", "final": 0.9050},
             {"method": "hosfl", "final": 0.9089}]  # fmt: skip
    _gain(below)  # first order worse than the frozen client: there is no gain to recover
    assert [r["gain_recovered"] for r in below] == [None] * 3
    lower = [{"method": "frozen", "final": 3.0, "higher_is_better": False},
             {"method": "sfl-v1", "final": 2.0, "higher_is_better": False},
             {"method": "hosfl", "final": 2.5, "higher_is_better": False}]  # fmt: skip
    _gain(lower)  # a loss: lower is better, and the gain is the fall
    assert [r["gain_recovered"] for r in lower] == pytest.approx([0.0, 1.0, 0.5])


def test_method_prefixed_overrides_apply_to_that_method_only():
    overrides = ["steps=3", "zo-fl.client_lr=1e-4", "hosfl.P=2", "mu=0.01"]
    assert _for("zo-fl", overrides) == ["steps=3", "client_lr=1e-4", "mu=0.01"]
    assert _for("hosfl", overrides) == ["steps=3", "P=2", "mu=0.01"]
    assert _for("frozen", overrides) == ["steps=3"]  # mu: frozen does not probe


def test_compare_over_seeds_gives_mean_and_sd_per_method(tmp_path):
    overrides = ["steps=8", "clients=3", "sampled=2", "train_subset=1000", "test_subset=200",
                 "eval_every=2", "progress=false"]  # fmt: skip
    folder = tmp_path / "seeds"
    rows = compare(["frozen", "hosfl"], overrides, str(folder), seeds=[0, 1],
                   log=lambda *a: None)  # fmt: skip
    assert [(r["method"], r["seed"]) for r in rows] == [
        (m, s) for m in ("frozen", "hosfl") for s in (0, 1)
    ]
    assert len({r["final"] for r in rows if r["method"] == "hosfl"}) > 1  # seeds differ
    hosfl = [r["final"] for r in rows if r["method"] == "hosfl"]
    mean = sum(hosfl) / 2
    sd = (sum((a - mean) ** 2 for a in hosfl) / 1) ** 0.5
    table = (folder / "results.md").read_text()
    assert f"| hosfl | 2 | {mean:.4f} ± {sd:.4f} |" in table
    for r in rows:
        assert r["largest_fall"] >= 0 and 0 <= r["last3"] <= 1
        assert (folder / f"{r['method']}-seed{r['seed']}" / "summary.json").exists()
    assert (folder / "accuracy_vs_step.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ConfigError, match="distinct"):
        compare(["frozen"], overrides, str(tmp_path / "again"), seeds=[1, 1])
