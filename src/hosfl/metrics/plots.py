"""Plots of saved runs: accuracy against steps and against bytes, and client peak memory.

Everything is read back from run folders (metrics.jsonl, summary.json), so ``hosfl plot``
redraws without rerunning anything.
"""

from __future__ import annotations

import json
from pathlib import Path

from hosfl.checkpoint import CheckpointError
from hosfl.packages import MissingPackage


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


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MissingPackage("plots need matplotlib: pip install 'hosfl[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_runs(folders: list[str | Path], out: str | Path) -> list[Path]:
    """Write accuracy_vs_step.png, accuracy_vs_bytes.png and client_memory.png into ``out``."""
    runs = [load_run(f) for f in folders]
    return _plot([(r["summary"]["method"], [r]) for r in runs], out)


def plot_groups(groups: dict[str, list[str | Path]], out: str | Path) -> list[Path]:
    """The same plots for runs of several seeds: per label, the mean over its runs (at the
    steps every run evaluated), with a band from the lowest to the highest run."""
    loaded = [(f"{label} (n={len(fs)})", [load_run(f) for f in fs]) for label, fs in groups.items()]
    return _plot(loaded, out)


def _plot(groups: list[tuple[str, list[dict]]], out: str | Path) -> list[Path]:
    plt = _pyplot()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, key, xlabel, log in (
        ("accuracy_vs_step.png", "step", "step (aggregation)", False),
        ("accuracy_vs_bytes.png", "bytes", "cumulative bytes sent, up + down", True),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, runs in groups:
            curves = [{e["step"]: e for e in r["evals"]} for r in runs]
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            xs = [sum(c[t][key] for c in curves) / len(curves) for t in steps]
            accs = [[c[t]["test_acc"] for c in curves] for t in steps]
            ax.plot(xs, [sum(a) / len(a) for a in accs], marker=".", label=label)
            if len(runs) > 1:
                ax.fill_between(xs, [min(a) for a in accs], [max(a) for a in accs], alpha=0.2)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy" + (" (band: lowest to highest seed)" if any(
            len(r) > 1 for _, r in groups) else ""))  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    def mean(runs: list[dict], key: str) -> float:
        return sum(r["summary"][key] for r in runs) / len(runs) / 2**20

    labels = [label for label, _ in groups]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.bar(labels, [mean(r, "client_peak_bytes") for _, r in groups], color="tab:blue",
           label="client peak (one step)")  # fmt: skip
    ax.scatter(
        labels,
        [mean(r, "client_inference_peak_bytes") for _, r in groups],
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
