"""Where to cut: accuracy, client peak memory and d_c of several methods at several cut depths.

For one task, each (cut, method) is one ``hosfl run`` with the same config, data, partition,
batches, seed and budget; ``--jobs`` runs go at once, each on one torch thread. A finished run
folder is kept and not run again, so an interrupted sweep picks up where it stopped;
``--collect`` tabulates what is finished. Writes
OUT/results.json, OUT/results.md and OUT/cut_sweep.png, and prints the table and the command.

    python benchmarks/cut_sweep.py --task sentiment-minilm --cuts embeddings,encoder.1,encoder.3,encoder.5 partition=by-source
    python benchmarks/cut_sweep.py --task fmnist-effnet --cuts stem,blocks.2,blocks.7,conv_head
"""  # noqa: E501

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hosfl.compare import _for, _gain, _row

METHODS = ("frozen", "hosfl", "sfl-v1", "zo-sfl")


def _run(folder: Path, settings: list[str]) -> Path:
    if (folder / "summary.json").exists():
        return folder
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "hosfl.cli", "run", *settings, "progress=false", f"out={folder}"]
    with open(folder.parent / f"{folder.name}.log", "w") as log:  # cut names hold dots
        subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return folder


def _plot(rows: list[dict], cuts: list[str], out: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, mem) = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = {r["cut"]: r for r in rows if r["method"] == method}
        at = [i for i, c in enumerate(cuts) if c in mine]
        acc.plot(at, [mine[cuts[i]]["final"] for i in at], marker="o", label=method)
        mem.plot(at, [mine[cuts[i]]["client_peak_bytes"] / 2**20 for i in at], marker="o",
                 label=method)  # fmt: skip
    d_c = {r["cut"]: r["d_c"] for r in rows if r["method"] == "hosfl"}
    acc.set(title=f"{task}: test accuracy by cut", xlabel="cut (last client stage)",
            ylabel="final test accuracy")  # fmt: skip
    mem.set(title="client peak memory", xlabel="cut", ylabel="MiB", yscale="log")
    for ax in (acc, mem):
        ax.grid(alpha=0.3)
        ax.legend()
    acc.set_xticks(range(len(cuts)), cuts, fontsize=7)
    mem.set_xticks(range(len(cuts)), [f"{c}\nd_c={d_c.get(c, 0):,}" for c in cuts], fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "cut_sweep.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True)
    parser.add_argument("--cuts", required=True, help="comma-separated cut names")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="")
    parser.add_argument(
        "--collect", action="store_true", help="only tabulate the finished runs in --out"
    )
    parser.add_argument("overrides", nargs="*", help="key=value or METHOD.key=value")
    args = parser.parse_args()
    cuts, methods = args.cuts.split(","), args.methods.split(",")
    out = Path(args.out or f"benchmarks/results/cut_sweep-{args.task}")
    out.mkdir(parents=True, exist_ok=True)
    if not args.collect:
        with ThreadPoolExecutor(args.jobs) as pool:
            for cut in cuts:
                for m in methods:
                    settings = [f"task={args.task}", f"cut={cut}", *_for(m, args.overrides),
                                f"method={m}"]  # fmt: skip
                    pool.submit(_run, out / f"{cut}-{m}", settings)
    rows = []
    for cut in cuts:
        done = [m for m in methods if (out / f"{cut}-{m}" / "summary.json").exists()]
        at_cut = [_row(out / f"{cut}-{m}", None) for m in done]
        _gain(at_cut)
        for r, m in zip(at_cut, done, strict=True):
            summary = json.loads((out / f"{cut}-{m}" / "summary.json").read_text())
            r.update(cut=cut, d_c=summary["d_c"], d_s=summary["d_s"],
                     inference_peak_bytes=summary["client_inference_peak_bytes"])  # fmt: skip
        rows += at_cut
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    lines = ["| cut | d_c | method | final acc | gain recovered | client peak MiB | × inference |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        gain = "—" if r["gain_recovered"] is None else f"{r['gain_recovered']:.2f}"
        name = r["method"] + (f" (diverged at {r['diverged_at']})" if r["diverged_at"] else "")
        lines.append(
            f"| {r['cut']} | {r['d_c']:,} | {name} | {r['final']:.4f} | {gain} "
            f"| {r['client_peak_bytes'] / 2**20:.1f} | {r['peak_over_inference']:.2f} |"
        )
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    _plot(rows, cuts, out, args.task)
    print(table)
    print(f"\ncommand: python benchmarks/cut_sweep.py {' '.join(sys.argv[1:])}")
    print(f"written: {out}/results.json, results.md, cut_sweep.png")


if __name__ == "__main__":
    main()
