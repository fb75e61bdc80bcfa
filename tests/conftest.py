import os
from contextlib import contextmanager

import pytest

from hosfl.config import METHOD_SETTINGS, Config
from hosfl.journal import Journal
from hosfl.methods import get

# The tests never reach a model hub (CI has no network): Hugging Face's libraries read this when
# first imported, and without it each hub lookup waits for its connection to time out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def journal_entries(folder) -> list[tuple[list[int], list[float]]]:
    """The (seeds, v̄) rows of RUN/journal.sqlite, as lists."""
    journal = Journal(folder / "journal.sqlite", create=False)
    entries = [(s.tolist(), v.tolist()) for s, v in journal.entries()]
    journal.close()
    return entries


def only_read(values: dict) -> dict:
    """``values`` without the method settings its method does not read (a shared set of
    settings given to several methods, as ``hosfl compare`` gives them)."""
    reads = get(values.get("method", "hosfl")).settings
    return {k: v for k, v in values.items() if k not in METHOD_SETTINGS or k in reads}


@pytest.fixture
def small_cfg(tmp_path):
    """A run that takes seconds: a 3000-image subset of the real Fashion-MNIST."""

    def make(**overrides) -> Config:
        values = dict(
            clients=5,
            sampled=2,
            batch_size=16,
            steps=30,
            P=3,
            train_subset=3000,
            test_subset=500,
            eval_every=10,
            progress=False,
            out=str(tmp_path / "run"),
        )
        if "P" not in get(overrides.get("method", "hosfl")).settings:
            del values["P"]  # only the methods that probe read it
        values.update(overrides)
        return Config(**values).validate()

    return make


@contextmanager
def killed_at(cls, step: int):
    """Within the block, a run of method class ``cls`` dies (KeyboardInterrupt, as from a kill)
    when it reaches ``step``: the block must start such a run; the method is restored after."""
    original = cls.step

    def crash(self, t, engine):
        if t == step:
            raise KeyboardInterrupt
        return original(self, t, engine)

    cls.step = crash
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        cls.step = original
