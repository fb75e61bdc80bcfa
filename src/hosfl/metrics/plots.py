"""Plots of saved runs: the task's metric against steps (from step 0) and against bytes, and
client peak memory; titled with the task and the settings the runs share.

Everything is read back from run folders (metrics.jsonl, summary.json), so ``hosfl plot``
redraws without rerunning anything.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from hosfl.checkpoint import CheckpointError
from hosfl.packages import MissingPackage


def load_run(folder: str | Path) -> dict:
    """summary.json, the settings of config.toml and the evaluation rows of metrics.jsonl of
    one run folder, with its metric (``metric``, ``metric_key``, ``higher_is_better``)."""
    from hosfl.runfolder import read_metrics
    from hosfl.tasks.base import metric_key

    folder = Path(folder)
    try:
        summary = json.loads((folder / "summary.json").read_text())
        rows, _ = read_metrics(folder / "metrics.jsonl")  # damaged lines are skipped
        evals = [row for row in rows if row.get("event") == "eval"]
        settings = tomllib.loads((folder / "config.toml").read_text())
    except (OSError, json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise CheckpointError(f"{folder} is not a finished run folder ({e})") from None
    metric = summary.get("metric", "accuracy")  # folders from before metrics had names
    return {"folder": folder, "summary": summary, "evals": evals, "settings": settings,
            "metric": metric, "metric_key": metric_key(metric),
            "higher_is_better": summary.get("higher_is_better", True)}  # fmt: skip


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MissingPackage("plots need matplotlib: pip install 'hosfl[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_runs(
    folders: list[str | Path], out: str | Path, labels: list[str] | None = None
) -> list[Path]:
    """Write accuracy_vs_step.png, accuracy_vs_bytes.png and client_memory.png into ``out``
    (the task's metric on the y axis). A run's label is ``labels[i]`` where given, else its
    method, with its folder's name where two runs share a method."""
    runs = [load_run(f) for f in folders]
    names = legend(runs, labels)
    return _plot([(name, [r]) for name, r in zip(names, runs, strict=True)], out)


def legend(runs: list[dict], labels: list[str] | None = None) -> list[str]:
    """Each run's label: the one given, else its method, with its folder's name where two runs
    share a method."""
    methods = [r["summary"]["method"] for r in runs]
    return [
        (labels[i] if labels and labels[i] else
         m if methods.count(m) == 1 else f"{m} ({r['folder'].name})")
        for i, (m, r) in enumerate(zip(methods, runs, strict=True))
    ]  # fmt: skip


def plot_groups(groups: dict[str, list[str | Path]], out: str | Path) -> list[Path]:
    """The same plots for runs of several seeds: per label, the mean over its runs (at the
    steps every run evaluated), with a band from the lowest to the highest run."""
    loaded = [(f"{label} (n={len(fs)})", [load_run(f) for f in fs]) for label, fs in groups.items()]
    return _plot(loaded, out)


TITLED = ("task", "cut", "clients", "sampled", "batch_size", "partition", "alpha", "steps", "P")


def title(runs: list[dict]) -> str:
    """The task and the key settings the runs share (a setting that differs is left out)."""
    shared = {}
    for key in TITLED:
        values = {str(r["settings"].get(key)) for r in runs}
        if len(values) == 1 and None not in {r["settings"].get(key) for r in runs}:
            shared[key] = values.pop()
    if shared.get("partition") != "dirichlet":
        shared.pop("alpha", None)
    head = shared.pop("task", "")
    names = {"clients": "M", "sampled": "K", "batch_size": "B"}
    return head + (": " if head and shared else "") + ", ".join(
        f"{names.get(k, k)}={v}" for k, v in shared.items())  # fmt: skip


def _plot(groups: list[tuple[str, list[dict]]], out: str | Path) -> list[Path]:
    plt = _pyplot()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    everything = [r for _, runs in groups for r in runs]
    metric, key = everything[0]["metric"], everything[0]["metric_key"]
    heading = title(everything)
    banded = any(len(r) > 1 for _, r in groups)
    written = []
    for name, x, xlabel, log in (
        ("accuracy_vs_step.png", "step", "step (aggregation)", False),
        ("accuracy_vs_bytes.png", "bytes", "cumulative bytes sent, up + down", True),
    ):
        fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
        for label, runs in groups:
            curves = [{e["step"]: e for e in r["evals"] if key in e} for r in runs]
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            if log:  # no bytes at step 0: it has no place on a log axis
                steps = [t for t in steps if t > 0]
            xs = [sum(c[t][x] for c in curves) / len(curves) for t in steps]
            ys = [[c[t][key] for c in curves] for t in steps]
            ax.plot(xs, [sum(v) / len(v) for v in ys], marker=".", label=label)
            if len(runs) > 1:
                ax.fill_between(xs, [min(v) for v in ys], [max(v) for v in ys], alpha=0.2)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"test {metric}" + (" (band: lowest to highest seed)" if banded else ""))
        fig.suptitle(heading, fontsize=9)
        ax.grid(alpha=0.3)
        fig.legend(fontsize=8, loc="outside right upper")  # beside the axes: it covers nothing
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    def mean(runs: list[dict], key: str) -> float:
        return sum(r["summary"][key] for r in runs) / len(runs) / 2**20

    labels = [label for label, _ in groups]
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
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
    fig.suptitle(heading, fontsize=9)
    ax.tick_params(axis="x", rotation=30)
    fig.legend(fontsize=8, loc="outside lower center", ncol=2)
    fig.savefig(out / "client_memory.png", dpi=110)
    plt.close(fig)
    written.append(out / "client_memory.png")
    return written
