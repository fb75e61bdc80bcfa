"""What a client device has to install: the network client (``hosfl[edge]``) against a Ray
client process (``hosfl[ray]``, with matplotlib, a core dependency before the split), from the
distributions installed here: each requirement set's closure (every dependency, transitively,
extras and markers evaluated) and the bytes of its files on disk (from each distribution's
RECORD), with and without torch, which both need.

    python benchmarks/client_install.py

Prints a Markdown table and the command.
"""

from __future__ import annotations

import importlib.metadata as md

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

SETS = {
    "hosfl client (hosfl[edge])": ["hosfl[edge]"],
    "Ray client process (hosfl[ray] + matplotlib)": ["hosfl[ray]", "matplotlib"],
}


def closure(roots: list[str]) -> dict[str, md.Distribution]:
    """Every installed distribution ``roots`` need, by canonical name."""
    found: dict[str, md.Distribution] = {}
    todo = [Requirement(r) for r in roots]
    seen: set[tuple[str, tuple[str, ...]]] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        key = (name, tuple(sorted(req.extras)))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            raise SystemExit(f"{req.name} is not installed: run this in the test venv") from None
        found[name] = dist
        for text in dist.requires or []:
            sub = Requirement(text)
            envs = [{"extra": e} for e in req.extras] or [{"extra": ""}]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in envs):
                todo.append(sub)
    return found


def size(dist: md.Distribution) -> int:
    total = 0
    for f in dist.files or []:
        path = f.locate()
        if path.is_file():
            total += path.stat().st_size
    return total


def main() -> None:
    rows = []
    for label, roots in SETS.items():
        dists = closure(roots)
        sizes = {n: size(d) for n, d in dists.items() if n != "hosfl"}
        without = {n: s for n, s in sizes.items() if n != "torch"}
        big = sorted(without.items(), key=lambda kv: -kv[1])[:5]
        rows.append((label, len(sizes), sum(sizes.values()), len(without),
                     sum(without.values()), big))  # fmt: skip
    print("| client install | packages | MiB on disk | without torch: packages | MiB | largest |")
    print("|---|---|---|---|---|---|")
    for label, n, total, n2, total2, big in rows:
        top = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in big)
        print(f"| {label} | {n} | {total / 2**20:,.0f} | {n2} | {total2 / 2**20:,.0f} | {top} |")
    print("\nfrom the distributions installed in this environment (RECORD file sizes)")
    print("command: python benchmarks/client_install.py")


if __name__ == "__main__":
    main()
