"""``hosfl compare``: several methods on the same data, partitions, batches, seed and budget.

Writes into one folder a run folder per method, results.csv, results.md and the plots, and
returns the rows. Gain recovered = (acc − acc_frozen) / (acc_SplitFedV1 − acc_frozen): the
share of first-order fine-tuning's benefit over an untrained client that a method keeps.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Callable
from itertools import pairwise

from hosfl import methods as registry
from hosfl.config import METHOD_SETTINGS, Config, ConfigError
from hosfl.metrics.plots import load_run, plot_groups, plot_runs
from hosfl.runfolder import prepare as prepare_out
from hosfl.runner import run
from hosfl.tasks.base import metric_label
from hosfl.timeline import profiles, timeline

# Payloads that keep the clients' models in sync (model weights, or seeds and scalars);
# the others (smashed data, labels, λ) are the split-learning activations traffic.
SYNC = ("weights", "seeds", "scalars")


TARGET = 0.8  # the accuracy of the steps-to-target column, from Python and the CLI alike
EVAL_EVERY = 100  # a finer curve than a single run's (given settings come after it and win)


def reached(value: float, target: float, higher_is_better: bool) -> bool:
    return value >= target if higher_is_better else value <= target


def _row(r: dict, target: float | None) -> dict:
    """The figures of one loaded run folder (``load_run``): ``final`` and ``best`` are the
    task's metric (``metric``: accuracy unless the task names another)."""
    s, evals = r["summary"], r["evals"]
    steps, sampled = s["steps"], s["sampled"]
    name, key, up = r["metric"], r["metric_key"], r["higher_is_better"]
    values = [e[key] for e in evals if e["step"] > 0]
    row = {
        "method": s["method"],
        "metric": name,
        "higher_is_better": up,
        "final": s[key],
        "best": (max if up else min)(values, default=float("nan")),
        "steps_to_target": next(
            (e["step"] for e in evals if target is not None and e["step"] > 0
             and reached(e[key], target, up)), None
        ),  # fmt: skip
        "bytes_up": sum(s["bytes"]["up"].values()),
        "bytes_down": sum(s["bytes"]["down"].values()),
        "sync_bytes_per_client_step": sum(
            n for d in ("up", "down") for p, n in s["bytes"][d].items() if p in SYNC
        )
        / (steps * sampled),
        "client_peak_bytes": s["client_peak_bytes"],
        "peak_over_inference": s["client_peak_bytes"] / s["client_inference_peak_bytes"],
        "client_ms_per_step": s["client_ms_per_step"],
        "wall_s": s["wall_s"],
        "diverged_at": s["diverged_at"],
    }
    for d in ("up", "down"):
        for payload, n in s["bytes"][d].items():
            row[f"{d}_{payload}_per_step"] = n / steps
    return row


MIN_GAIN = 0.01  # SplitFed V1 over the frozen client below which "gain recovered" is noise


def _gains(rows: list[dict], final: dict[str, float]) -> bool:
    """Whether gain recovered is defined: SplitFed V1 better than the frozen client by at least
    ``MIN_GAIN`` (in the metric's direction). Where it is not better, there is no gain to
    recover; where it is barely better, the ratio is one of two noises."""
    if "frozen" not in final or "sfl-v1" not in final:
        return False
    sign = 1 if all(r.get("higher_is_better", True) for r in rows) else -1
    return sign * (final["sfl-v1"] - final["frozen"]) >= MIN_GAIN


def _gain(rows: list[dict]) -> None:
    """gain recovered = (acc − frozen) / (SplitFed V1 − frozen), where it is defined (``_gains``;
    else None)."""
    acc = {r["method"]: r["final"] for r in rows}
    ok = _gains(rows, acc)
    for r in rows:
        r["gain_recovered"] = (
            (r["final"] - acc["frozen"]) / (acc["sfl-v1"] - acc["frozen"]) if ok else None
        )


def markdown(rows: list[dict], target: float | None) -> str:
    def f(v, fmt):
        return "—" if v is None else format(v, fmt)

    metric = metric_label(rows[0].get("metric", "accuracy")) if rows else "acc"
    head = (
        f"| method | final {metric} | best {metric} | steps to "
        + f(target, ".2f")
        + " | gain recovered | MB up | MB down | sync B/client/step | client peak MiB "
        "| × inference | client ms/step | wall s |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        name = r["method"] + (f" (diverged at {r['diverged_at']})" if r["diverged_at"] else "")
        lines.append(
            f"| {name} | {r['final']:.4f} | {r['best']:.4f} "
            f"| {f(r['steps_to_target'], 'd')} | {f(r['gain_recovered'], '.2f')} "
            f"| {r['bytes_up'] / 1e6:,.1f} | {r['bytes_down'] / 1e6:,.1f} "
            f"| {r['sync_bytes_per_client_step']:,.0f} | {r['client_peak_bytes'] / 2**20:.2f} "
            f"| {r['peak_over_inference']:.2f} | {r['client_ms_per_step']:.1f} "
            f"| {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def _for(method: str, overrides: list[str]) -> list[str]:
    """The overrides that apply to ``method``: plain ``key=value`` ones (a method setting
    only where the method reads it: ``P=2`` is for the methods that probe), and
    ``METHOD.key=value`` ones naming it (for example ``zo-fl.client_lr=1e-4``)."""
    chosen = []
    for item in overrides:
        prefix, dot, rest = item.partition(".")
        if dot and prefix in registry.METHODS and "=" in rest and "=" not in prefix:
            if prefix == method:
                chosen.append(rest)
        elif item.partition("=")[0].strip() not in METHOD_SETTINGS - registry.get(method).settings:
            chosen.append(item)
    return chosen


def mean_sd(values: list[float]) -> str:
    """``mean ± sd`` over seeds (the project's one form of it), or the value marked as one
    seed, or a dash where there is none."""
    if len(values) < 2:
        return f"{values[0]:.4f} (one seed)" if values else "–"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def seeds_markdown(rows: list[dict]) -> str:
    """Per method, over its seeds: final accuracy and the mean of its last three evaluations
    (mean ± sd), gain recovered from the means, and the largest fall between two evaluations
    after the first quarter of a run (a collapse shows there)."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)
    final = {m: statistics.mean(r["final"] for r in rs) for m, rs in by.items()}
    ok = _gains(rows, final)
    metric = metric_label(rows[0].get("metric", "accuracy")) if rows else "acc"
    lines = [
        f"| method | seeds | final {metric} | mean of last 3 evaluations | gain recovered "
        "| largest fall after ¼ (points) | client ms/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, rs in by.items():
        gain = (final[m] - final["frozen"]) / (final["sfl-v1"] - final["frozen"]) if ok else None
        lines.append(
            f"| {m} | {len(rs)} | {mean_sd([r['final'] for r in rs])} "
            f"| {mean_sd([r['last3'] for r in rs])} "
            f"| {'—' if gain is None else f'{gain:.2f}'} "
            f"| {max(r['largest_fall'] for r in rs):.1f} "
            f"| {statistics.mean(r['client_ms_per_step'] for r in rs):.1f} |"
        )
    return "\n".join(lines)


def _stability(r: dict, row: dict) -> None:
    """The run's mean of its last three evaluations, and its largest fall (points: in the
    metric's worse direction) between two evaluations after the first quarter of its steps."""
    key, sign = r["metric_key"], 1 if r["higher_is_better"] else -1
    values = [e[key] for e in r["evals"] if e["step"] > 0]
    row["last3"] = statistics.mean(values[-3:]) if values else float("nan")
    later = [e[key] for e in r["evals"] if e["step"] >= row["steps"] / 4 and e["step"] > 0]
    row["largest_fall"] = max([0.0, *(100 * sign * (a - b) for a, b in pairwise(later))])


def compare(
    methods: list[str],
    overrides: list[str],
    out: str,
    target: float | None = TARGET,
    config: str | None = None,
    log: Callable[[str], None] = print,
    seeds: list[int] | None = None,
    profile: str | None = None,
) -> list[dict]:
    """Run each method (for each of ``seeds``, when given) on the same settings into one
    folder; write results.csv (a row a run), results.md and the plots (with ``seeds``: the
    table as mean ± sd over seeds, the curves as the mean with a band from the lowest to the
    highest seed; with ``profile``, each run's time to ``target`` under that device and link
    profile, ``hosfl timeline``'s table, CSV and plots). Returns the rows."""
    unknown = [m for m in methods if m not in registry.METHODS]
    if unknown or not methods:
        raise ConfigError(
            f"--methods: unknown {', '.join(unknown) or '(none)'} "
            f"(valid: {', '.join(registry.METHODS)})"
        )
    if target is not None and not math.isfinite(target):
        raise ConfigError(f"--target={target}: must be a finite number")
    if profile is not None:
        profiles(profile)  # a bad profile is refused before any run
    if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
        raise ConfigError(f"--seeds: give distinct seeds, not {seeds}")
    runs = [
        (m, s, Config.load(config, [f"eval_every={EVAL_EVERY}", *_for(m, overrides),
                                    f"method={m}", "out=",
                                    *([f"seed={s}"] if s is not None else [])]))  # fmt: skip
        for m in methods
        for s in (seeds or [None])
    ]
    folder = prepare_out(out, "compare")
    names = []
    for i, (m, seed, cfg) in enumerate(runs):
        names.append(m if seed is None else f"{m}-seed{seed}")
        cfg.out = str(folder / names[-1])
        log(f"[{i + 1}/{len(runs)}] {names[-1]}")
        run(cfg, log=log)
    loaded = [load_run(folder / name) for name in names]  # each run folder read once
    rows = [_row(r, target) for r in loaded]
    for row, r, (_, _, cfg) in zip(rows, loaded, runs, strict=True):
        row["seed"], row["steps"] = cfg.seed, cfg.steps
        _stability(r, row)
    if not seeds:
        _gain(rows)
    with open(folder / "results.csv", "w", newline="") as f:
        columns = sorted({k for r in rows for k in r}, key=lambda k: (k not in rows[0], k))
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    table = seeds_markdown(rows) if seeds else markdown(rows, target)
    if profile is not None:  # the same folder gets timeline.csv and accuracy_vs_time_*.png
        timed, _ = timeline([folder / name for name in names], profile, target, folder)
        table += f"\n\nUnder profile {profile} (hosfl timeline):\n\n{timed}"
    (folder / "results.md").write_text(table + "\n")
    if seeds:
        plot_groups({m: [folder / f"{m}-seed{s}" for s in seeds] for m in methods}, folder)
    else:
        plot_runs([folder / name for name in names], folder)
    log(table)
    log(
        f"written: {folder}/results.csv, results.md, accuracy_vs_step.png, "
        "accuracy_vs_bytes.png, client_memory.png"
    )
    return rows
