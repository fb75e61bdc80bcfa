"""Is every default run bit-identical to another version's? A digest of a short run of each
method (and of HO-SFL simulated as one batch, ``hosfl-batched``): the final client and server
tensors (weights and buffers), the metrics' losses and the journal's rows. Run it on two
checkouts and compare the JSON (``--against FILE``).

    OMP_NUM_THREADS=1 python benchmarks/digests.py --out before.json
    OMP_NUM_THREADS=1 python benchmarks/digests.py --against before.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import hosfl
from hosfl import methods


def digest_run(result: hosfl.RunResult) -> str:
    h = hashlib.blake2b(digest_size=16)
    folder = result.out
    for part in (result.client_model, result.server_model):
        for name, t in sorted(part.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        h.update(json.dumps([row.get("event"), row.get("step"), row.get("loss"),
                             row.get("test_acc")]).encode())  # fmt: skip
    journal = folder / "journal.sqlite"
    if journal.is_file():
        with sqlite3.connect(journal) as db:
            for row in db.execute("SELECT * FROM steps ORDER BY step"):
                h.update(repr(row).encode())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default="benchmarks/results/digests.json")
    ap.add_argument("--against", default="", help="a digests JSON to compare with")
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: {"method": name} for name in methods.METHODS}
        runs["hosfl-batched"] = {"method": "hosfl", "simulate": "batched"}
        for name, settings in runs.items():
            start = time.perf_counter()
            cfg = hosfl.Config(
                **settings, steps=args.steps, eval_every=0, progress=False,
                out=f"{tmp}/{name}", snapshot_every=args.steps,
            )  # fmt: skip
            rows[name] = digest_run(hosfl.run(cfg, log=lambda _: None))
            print(f"{name:<8} {rows[name]}  ({time.perf_counter() - start:.0f} s)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    print(f"command: OMP_NUM_THREADS=1 python benchmarks/digests.py --steps {args.steps}")
    if args.against:
        before = json.loads(Path(args.against).read_text())
        same = {k: before.get(k) == v for k, v in rows.items() if k in before}
        for k, ok in same.items():
            print(f"{k:<8} {'identical' if ok else 'DIFFERENT'} to {args.against}")
        sys.exit(0 if all(same.values()) else 1)


if __name__ == "__main__":
    main()
