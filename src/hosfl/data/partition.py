"""Split a labelled dataset among M clients: IID, Dirichlet(α) over labels, label shards, or
by source (each client holds examples of one source only, for data that has sources).

Each partitioner returns one index array per client, drawn from ``np.random.default_rng(seed)``
so the same seed gives the same split.
"""

from __future__ import annotations

import numpy as np


def iid(labels: np.ndarray, clients: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(part) for part in np.array_split(order, clients)]


def dirichlet(
    labels: np.ndarray, clients: int, seed: int, alpha: float, min_size: int = 1
) -> list[np.ndarray]:
    """Per class, proportions ~ Dir(α) over clients (Hsu et al. 2019); redrawn until every
    client holds at least ``min_size`` examples."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * clients)) * len(idx)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"alpha={alpha}: could not give every client {min_size} examples")


def shards(labels: np.ndarray, clients: int, seed: int, per_client: int) -> list[np.ndarray]:
    """Sort by label, cut into clients × per_client shards, deal them out (McMahan et al.)."""
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    pieces = np.array_split(order, clients * per_client)
    deal = rng.permutation(len(pieces))
    return [
        np.sort(np.concatenate([pieces[j] for j in deal[k * per_client : (k + 1) * per_client]]))
        for k in range(clients)
    ]


def by_source(sources: np.ndarray, clients: int, seed: int) -> list[np.ndarray]:
    """Client k holds source k mod S (S sources), the source's examples split IID among the
    clients that hold it: a natural non-IID split (reviews of films, products, restaurants)."""
    names = np.unique(sources)
    if clients < len(names):
        raise ValueError(f"partition=by-source needs clients >= {len(names)} (one per source)")
    parts: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * clients
    for s, name in enumerate(names):
        holders = list(range(s, clients, len(names)))
        mine = np.flatnonzero(sources == name)
        for k, sub in zip(holders, iid(sources[mine], len(holders), seed + s), strict=True):
            parts[k] = mine[sub]
    return parts


def split(
    kind: str,
    labels: np.ndarray,
    clients: int,
    seed: int,
    alpha: float,
    per_client: int,
    sources: np.ndarray | None = None,
) -> list[np.ndarray]:
    if clients > len(labels):
        raise ValueError(f"clients={clients} but only {len(labels)} training examples")
    if kind == "iid":
        return iid(labels, clients, seed)
    if kind == "dirichlet":
        return dirichlet(labels, clients, seed, alpha)
    if kind == "shards":
        return shards(labels, clients, seed, per_client)
    if kind == "by-source":
        if sources is None:
            raise ValueError("partition=by-source: this task's data has no sources")
        return by_source(sources, clients, seed)
    raise ValueError(f"unknown partition {kind!r}")


def histogram(labels: np.ndarray, parts: list[np.ndarray], classes: int) -> np.ndarray:
    """(clients, classes) counts of each label on each client."""
    return np.stack([np.bincount(labels[p], minlength=classes) for p in parts])
