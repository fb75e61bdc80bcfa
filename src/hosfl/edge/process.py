"""One client of a run in a process of its own (a Ray actor, or ``hosfl client`` on a device):
built from the run's config alone, it answers encoded messages with encoded messages,
including the engine's ``StateQuery`` (where its replica is) and ``StatsQuery`` (its figures).
It imports nothing of an engine: the server side lives in ``engines/``."""

from __future__ import annotations

import time

import torch

from hosfl import methods, tasks
from hosfl.config import Config
from hosfl.methods.shard import Shard
from hosfl.metrics.memory import meter, process_peak_rss
from hosfl.protocol import (
    CatchUp,
    ClientStats,
    ReplicaState,
    ScalarBroadcast,
    StateQuery,
    StatsQuery,
    Synced,
    decode,
    encode,
)


class ClientProcess:
    """One client, in its own process: builds its shard and replica from the config alone."""

    def __init__(self, config: dict, cid: int, threads: int) -> None:
        torch.set_num_threads(threads)
        cfg = Config.from_dict(config).validate()
        task, client_model, server_model = tasks.prepare(cfg)
        device = cfg.device_of("client")  # resolved here, on the client's own machine
        client_model.to(device)
        train = task.load("train", cfg.train_subset)
        shard = Shard(cid, train, task.partition(cfg, train)[cid], cfg.seed, device)
        method = methods.get(cfg.method)(cfg, client_model, server_model, task)
        self.role = method.client(shard)
        self.measure_step = min(1, cfg.steps - 1)
        self.meter = meter(device)  # one meter across the calls of the measured step
        self.seconds = 0.0
        self.cut_dtype = cfg.cut_dtype  # the format z and λ travel in

    def handle(self, data: bytes) -> bytes | None:
        msg = decode(data)
        if isinstance(msg, StateQuery):  # where the replica is; Synced(0, 0): it keeps none
            return encode(self.role.synced() or Synced(0, 0))
        if isinstance(msg, StatsQuery):
            micros = round(self.seconds * 1e6)
            return encode(ClientStats(msg.step, self.meter.peak, micros, process_peak_rss()))
        if isinstance(msg, CatchUp):
            return encode(self.role.catch_up(msg))
        if isinstance(msg, ReplicaState):
            return encode(self.role.restore(msg))
        start = time.perf_counter()
        if msg.step == self.measure_step and not isinstance(msg, ScalarBroadcast):
            with self.meter:
                reply = self.role.handle(msg)
        else:
            reply = self.role.handle(msg)
            self.seconds += time.perf_counter() - start
        return None if reply is None else encode(reply, self.cut_dtype)
