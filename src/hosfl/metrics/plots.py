"""Plots of saved runs: accuracy against steps and against bytes, and client peak memory.

Everything is read back from run folders (metrics.jsonl, summary.json), so ``hosfl plot``
redraws without rerunning anything.
"""

from __future__ import annotations

import json
from pathlib import Path

from hosfl.checkpoint import CheckpointError
from hosfl.tasks.base import MissingPackage


def load_run(folder: str | Path) -> dict:
    """summary.json plus the evaluation rows of metrics.jsonl of one run folder."""
    from hosfl.runfolder import read_metrics

    folder = Path(folder)
    try:
        summary = json.loads((folder / "summary.json").read_text())
        rows, _ = read_metrics(folder / "metrics.jsonl")  # damaged lines are skipped
        evals = [row for row in rows if row.get("event") == "eval"]
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder} is not a finished run folder ({e})") from None
    return {"folder": folder, "summary": summary, "evals": evals}


def plot_runs(folders: list[str | Path], out: str | Path) -> list[Path]:
    """Write accuracy_vs_step.png, accuracy_vs_bytes.png and client_memory.png into ``out``."""
    try:
        import matplotlib
    except ImportError:
        raise MissingPackage("plots need matplotlib: pip install 'hosfl[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load_run(f) for f in folders]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    label = [f"{r['summary']['method']}" for r in runs]
    written = []

    for name, key, xlabel, log in (
        ("accuracy_vs_step.png", "step", "step (aggregation)", False),
        ("accuracy_vs_bytes.png", "bytes", "cumulative bytes sent, up + down", True),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r, lab in zip(runs, label, strict=True):
            xs = [e[key] for e in r["evals"]]
            ax.plot(xs, [e["test_acc"] for e in r["evals"]], marker=".", label=lab)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    peaks = [r["summary"]["client_peak_bytes"] / 2**20 for r in runs]
    floors = [r["summary"]["client_inference_peak_bytes"] / 2**20 for r in runs]
    ax.bar(label, peaks, color="tab:blue", label="client peak (one step)")
    ax.scatter(
        label,
        floors,
        color="black",
        marker="_",
        s=400,
        zorder=3,
        label="inference-only peak of the same client model",
    )
    ax.set_ylabel("MiB")
    ax.tick_params(axis="x", rotation=30)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "client_memory.png", dpi=110)
    plt.close(fig)
    written.append(out / "client_memory.png")
    return written
