"""``hosfl timeline``: the wall clock a run would take on real devices and links.

A run records the shape of its step (``metrics.exchanges``: in order, each exchange with its
bytes per client, the client's compute and the server's). Under a profile (``profiles.toml``,
or a TOML file of the same keys) each sampled client gets a compute factor and a link speed,
lognormal around the profile's medians and fixed per client, and a step takes

    Σ server compute  +  Σ over the step's round trips of the slowest sampled client's
                          rtt + down bytes / its downlink + compute + up bytes / its uplink

A one-way message (SplitFed's model download, HO-SFL's broadcast of seeds and v̄) adds its
bytes and the client's work to the next round trip of that client, with no round trip of its
own (a step's last one wraps onto its first). A client slower than ``deadline_s`` in one round
trip is dropped there and the step goes on at the deadline, as ``client_timeout`` does over the
network. The model is a prediction for a run the clients follow step by step, with what the
run measured: it knows nothing of contention, of a device's memory, or of a dropped client's
effect on accuracy.
"""

from __future__ import annotations

import csv
import math
import tomllib
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path

import numpy as np

from hosfl.config import Config, ConfigError
from hosfl.methods.shard import sample_clients
from hosfl.metrics.plots import _pyplot, legend, load_run, title

PARTS = ("compute", "upload", "download", "waiting")  # where a step's time goes
SPREAD_SEED = 20_261_204  # clients' draws: the same client is slow under every profile


@dataclass(frozen=True)
class Profile:
    name: str
    about: str = ""
    client_compute: float = 1.0
    compute_spread: float = 0.0
    uplink_mbps: float = 100.0
    downlink_mbps: float = 100.0
    rtt_ms: float = 0.0
    link_spread: float = 0.0
    server_compute: float = 1.0
    deadline_s: float = 0.0
    sources: str = ""

    @classmethod
    def from_dict(cls, name: str, values: dict) -> Profile:
        known = {f.name for f in fields(cls)} - {"name"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"profile {name!r}: unknown key {unknown[0]!r} "
                              f"(valid: {', '.join(sorted(known))})")  # fmt: skip
        for key, value in values.items():
            if key in ("about", "sources"):
                if not isinstance(value, str):
                    raise ConfigError(f"profile {name!r}: {key} must be text")
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"profile {name!r}: {key}={value!r} is not a number")
            low_ok = key in ("compute_spread", "link_spread", "rtt_ms", "deadline_s")
            if not math.isfinite(value) or value < 0 or (value == 0 and not low_ok):
                raise ConfigError(f"profile {name!r}: {key}={value} must be "
                                  f"{'>= 0' if low_ok else '> 0'} and finite")  # fmt: skip
        return cls(name=name, **{k: (v if k in ("about", "sources") else float(v))
                                 for k, v in values.items()})  # fmt: skip


def builtin_profiles() -> dict[str, Profile]:
    text = resources.files("hosfl").joinpath("profiles.toml").read_text()
    return {n: Profile.from_dict(n, v) for n, v in tomllib.loads(text).items()}


def profiles(spec: str | None = None) -> list[Profile]:
    """The built-in profiles (``spec`` None), one of them by name, or those of a TOML file."""
    builtin = builtin_profiles()
    if spec is None:
        return list(builtin.values())
    if spec in builtin:
        return [builtin[spec]]
    path = Path(spec)
    if not path.suffix == ".toml":
        raise ConfigError(f"--profile {spec!r}: not a built-in profile "
                          f"({', '.join(builtin)}) nor a .toml file")  # fmt: skip
    try:
        tables = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--profile {spec}: {e}") from None
    if not tables or not all(isinstance(v, dict) for v in tables.values()):
        raise ConfigError(f"--profile {spec}: expected one [table] a profile")
    return [Profile.from_dict(n, v) for n, v in tables.items()]


def describe() -> str:
    """The built-in profiles with their numbers and sources."""
    keys = [f.name for f in fields(Profile) if f.name not in ("name", "about", "sources")]
    return "\n\n".join(
        f"{p.name}: {p.about}\n  " + ", ".join(f"{k}={getattr(p, k):g}" for k in keys)
        + f"\n  sources: {p.sources}" for p in builtin_profiles().values())


def client_draws(profile: Profile, clients: int) -> tuple[np.ndarray, np.ndarray]:
    """Each client's compute factor and link-speed factor (lognormal, median 1), fixed per
    client and the same standard draws under every profile."""
    z = np.array([np.random.default_rng([SPREAD_SEED, m]).standard_normal(2)
                  for m in range(clients)]).reshape(clients, 2)  # fmt: skip
    compute = profile.client_compute * np.exp(profile.compute_spread * z[:, 0])
    link = np.exp(profile.link_spread * z[:, 1])
    return compute, link


def legs(exchanges: list[dict]) -> list[dict]:
    """The step's round trips, each with the one-way messages before it folded in (those
    after the last round trip onto the first), and the server's compute of the step."""
    asks = [i for i, e in enumerate(exchanges) if e["kind"] == "ask"]
    if not asks:  # nothing but one-way messages: one leg that waits for no reply
        asks = [len(exchanges) - 1]
    out, carried = [], {"down_bytes": 0.0, "client_ms": 0.0}
    for i, e in enumerate(exchanges):
        carried["down_bytes"] += e["down_bytes"]
        carried["client_ms"] += e["client_ms"]
        if i in asks:
            out.append({**carried, "up_bytes": e["up_bytes"] if e["kind"] == "ask" else 0.0})
            carried = {"down_bytes": 0.0, "client_ms": 0.0}
    out[0]["down_bytes"] += carried["down_bytes"]
    out[0]["client_ms"] += carried["client_ms"]
    return out


def step_time(
    trips: list[dict], server_ms: float, profile: Profile, compute: np.ndarray,
    link: np.ndarray, clients: list[int],
) -> tuple[float, dict[str, float], int]:  # fmt: skip
    """Seconds of one step with these sampled clients, its split over ``PARTS``, and how many
    client round trips the deadline cut."""
    parts = dict.fromkeys(PARTS, 0.0)
    parts["waiting"] = server_ms / 1000 * profile.server_compute
    total, dropped = parts["waiting"], 0
    latency = profile.rtt_ms / 1000
    for trip in trips:
        best = None
        for m in clients:
            down = 8 * trip["down_bytes"] / (profile.downlink_mbps * 1e6 * link[m])
            up = 8 * trip["up_bytes"] / (profile.uplink_mbps * 1e6 * link[m])
            work = trip["client_ms"] / 1000 * compute[m]
            t = latency + down + work + up
            if profile.deadline_s and t > profile.deadline_s:
                dropped += 1
                continue
            if best is None or t > best[0]:
                best = (t, work, up, down)
        took = profile.deadline_s if dropped and profile.deadline_s else best[0]
        total += took
        if best is not None:
            parts["compute"] += best[1]
            parts["upload"] += best[2]
            parts["download"] += best[3]
            parts["waiting"] += took - best[1] - best[2] - best[3]
        else:
            parts["waiting"] += took
    return total, parts, dropped


def simulate(folder: str | Path, profile: Profile) -> dict:
    """One run folder under one profile: the simulated clock at every step, the evaluations
    against it, and where the time went."""
    run = load_run(folder)
    shape = run["summary"].get("exchanges")
    if not shape:
        raise ConfigError(
            f"{folder}: no step shape in summary.json (recorded by the in-process engine from "
            "hosfl 0.1 on; a run with engine=ray or net has none): run it in-process"
        )
    cfg = Config.from_dict(run["settings"])
    trips = legs(shape)
    server_ms = sum(e["server_ms"] for e in shape)
    compute, link = client_draws(profile, cfg.clients)
    steps = run["summary"]["steps"] if run["summary"].get("diverged_at") is None else \
        run["summary"]["diverged_at"]  # fmt: skip
    clock = np.zeros(steps + 1)
    parts = dict.fromkeys(PARTS, 0.0)
    dropped = 0
    for t in range(steps):
        took, split, cut = step_time(trips, server_ms, profile, compute, link,
                                     sample_clients(cfg, t))  # fmt: skip
        clock[t + 1] = clock[t] + took
        dropped += cut
        for k in PARTS:
            parts[k] += split[k]
    key = run["metric_key"]
    evals = [(e["step"], e[key]) for e in run["evals"] if key in e and e["step"] <= steps]
    whole = sum(parts.values()) or 1.0
    return {"run": run, "profile": profile, "clock": clock, "evals": evals,
            "seconds_per_step": clock[-1] / max(steps, 1), "dropped": dropped,
            "shares": {k: v / whole for k, v in parts.items()}}  # fmt: skip


def time_to(result: dict, target: float) -> float | None:
    """Simulated seconds until the first evaluation at or past ``target``."""
    better = result["run"]["higher_is_better"]
    for step, value in result["evals"]:
        if (value >= target) if better else (value <= target):
            return float(result["clock"][step])
    return None


def default_target(results: list[dict]) -> float:
    """The best value the worst of the runs reached: every run reaches it."""
    better = results[0]["run"]["higher_is_better"]
    bests = [(max if better else min)(v for _, v in r["evals"]) for r in results if r["evals"]]
    if not bests:
        raise ConfigError("no run has an evaluation: nothing to time")
    return min(bests) if better else max(bests)


def hms(seconds: float | None) -> str:
    if seconds is None:
        return "not reached"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def table(results: list[dict], target: float) -> str:
    """Markdown: a row per run and profile."""
    names = [r["name"] for r in results]
    metric = results[0]["run"]["metric"]
    lines = [f"| profile | run | s / step | time to {metric} {target:.4g} | final {metric} | "
             "compute | upload | download | waiting | dropped |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, r in zip(names, results, strict=True):
        final = r["evals"][-1][1] if r["evals"] else float("nan")
        s = r["shares"]
        lines.append(f"| {r['profile'].name} | {name} | {r['seconds_per_step']:.3f} | "
                     f"{hms(time_to(r, target))} | {final:.4f} | "
                     + " | ".join(f"{100 * s[k]:.0f} %" for k in PARTS)
                     + f" | {r['dropped']} |")  # fmt: skip
    return "\n".join(lines)


def write(results: list[dict], target: float, out: str | Path) -> list[Path]:
    """timeline.csv (each evaluation against each profile's clock), timeline.md, and per
    profile accuracy_vs_time_<profile>.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = [r["name"] for r in results]
    with open(out / "timeline.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["profile", "run", "folder", "step", "seconds", "metric", "value"])
        for name, r in zip(names, results, strict=True):
            for step, value in r["evals"]:
                w.writerow([r["profile"].name, name, r["run"]["folder"], step,
                            f"{r['clock'][step]:.3f}", r["run"]["metric"], value])  # fmt: skip
    (out / "timeline.md").write_text(table(results, target) + "\n")
    plt = _pyplot()
    written = [out / "timeline.csv", out / "timeline.md"]
    for prof in dict.fromkeys(r["profile"].name for r in results):
        mine = [(n, r) for n, r in zip(names, results, strict=True) if r["profile"].name == prof]
        fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
        for name, r in mine:  # log time: the methods' clocks differ by orders of magnitude
            points = [(r["clock"][s] / 60, v) for s, v in r["evals"] if s > 0]
            ax.plot(*zip(*points, strict=True), marker=".", label=name)
        ax.set_xscale("log")
        ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:.4g}")
        ax.set_xlabel(f"simulated wall clock (minutes): {prof}, {mine[0][1]['profile'].about}")
        ax.set_ylabel(f"test {mine[0][1]['run']['metric']}")
        fig.suptitle(title([r["run"] for _, r in mine]), fontsize=9)
        ax.grid(alpha=0.3)
        fig.legend(fontsize=8, loc="outside right upper")
        path = out / f"accuracy_vs_time_{prof}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def timeline(
    folders: list[str | Path], profile: str | None = None, target: float | None = None,
    out: str | Path | None = None, labels: list[str] | None = None,
) -> tuple[str, list[dict]]:  # fmt: skip
    """Every run under every chosen profile: the Markdown table and the results (and, with
    ``out``, the CSV, the table and the plots written there). A run's label is ``labels[i]``
    where given, else its method (with its folder's name where two runs share one)."""
    if not folders:
        raise ConfigError("give at least one run folder")
    chosen = profiles(profile)
    results = [simulate(f, p) for p in chosen for f in folders]
    names = legend([r["run"] for r in results[: len(folders)]], labels)
    for i, r in enumerate(results):
        r["name"] = names[i % len(folders)]
    metrics = {r["run"]["metric"] for r in results}
    if len(metrics) > 1:
        raise ConfigError(f"the runs measure different metrics ({', '.join(sorted(metrics))})")
    if target is not None and not math.isfinite(target):
        raise ConfigError(f"--target={target}: must be a finite number")
    goal = default_target(results) if target is None else target
    text = table(results, goal)
    if out is not None:
        write(results, goal, out)
    return text, results
