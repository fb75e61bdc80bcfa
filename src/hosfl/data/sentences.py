"""The 3000 labelled sentences of Kotzias et al. (KDD 2015), vendored in ``data/sentiment``.

Three sources (IMDB, Amazon, Yelp), 1000 sentences each, balanced positive/negative. A fixed
split, the same for every seed: of each source and class, 400 sentences train and 100 test
(2400 train, 600 test), each split in a fixed shuffled order so that its first N sentences
(``train_subset``, ``test_subset``) mix sources and classes. ``load`` returns texts, labels
and the source of each sentence, the natural non-IID split that ``partition=by-source`` uses.
"""

from __future__ import annotations

import json
from importlib import resources

import numpy as np

SOURCES = ("imdb", "amazon", "yelp")
TEST_PER_CLASS = 100  # per source and class


def _read(source: str) -> list[dict]:
    text = resources.files("hosfl.data").joinpath("sentiment", f"{source}.json").read_text("utf-8")
    return [e for e in json.loads(text) if e.get("class") in (0, 1)]


def load(split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(texts, labels, sources) of ``split`` ('train' or 'test'), in a fixed order."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}")
    texts, labels, sources = [], [], []
    for s, source in enumerate(SOURCES):
        entries = _read(source)
        for c in (0, 1):
            of_class = [e["text"].strip() for e in entries if e["class"] == c]
            order = np.random.default_rng([s, c]).permutation(len(of_class))
            pick = order[:TEST_PER_CLASS] if split == "test" else order[TEST_PER_CLASS:]
            texts += [of_class[i] for i in sorted(pick)]
            labels += [c] * len(pick)
            sources += [s] * len(pick)
    order = np.random.default_rng(len(texts)).permutation(len(texts))
    return (
        [texts[i] for i in order],
        np.array(labels, dtype=np.int64)[order],
        np.array(sources, dtype=np.int64)[order],
    )
