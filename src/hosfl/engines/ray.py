"""Ray engine: each client is a Ray actor, a process of its own (on this machine or another),
holding its own data shard and its own client role (``remote.ClientProcess``), built from the
config alone. The server (this process) and the actors exchange nothing but encoded protocol
messages (bytes); the ledger counts those bytes. Catch-up, drift checks, retries and the final
check are ``remote.RemoteEngine``'s; this file is the transport: an actor per client, restarted
by Ray (max_restarts=-1) when it fails.

Ray's own guarantees are what they are: the actors are reached by the handles this run created
(the server accepts replies only to its own calls on them), and cluster membership is guarded
by Ray's token authentication and TLS (docs/DISTRIBUTED.md). Ray unpickles what its workers
return: for clients that are not trusted, use ``engine=net`` (``hosfl serve``).
"""

from __future__ import annotations

import os
import time

import ray
import torch

from hosfl import devices
from hosfl.config import Config, ConfigError
from hosfl.edge.process import ClientProcess
from hosfl.engines.remote import ClientFailed, RemoteEngine
from hosfl.journal import Journal
from hosfl.methods.base import Method
from hosfl.metrics.ledger import ByteLedger
from hosfl.protocol import Synced


class RayClient(ClientProcess):
    """A client process as a Ray actor: ``handle`` and its process id. A simulation's process,
    not a device: freed memory is kept for the next forward (``devices.keep_freed_memory``)."""

    def __init__(self, *args, **kwargs) -> None:
        devices.keep_freed_memory()
        super().__init__(*args, **kwargs)

    def pid(self) -> int:
        return os.getpid()


STARTUP = 300.0  # seconds a client process may take to start (import torch, load its data)


class RayEngine(RemoteEngine):
    # Environment variables of chosen client processes, by client id (the tests run one client
    # under another ATEN_CPU_CAPABILITY: another kind of CPU, on one machine).
    actor_env: dict[int, dict[str, str]] = {}

    @classmethod
    def for_run(cls, run) -> RayEngine:
        return cls(run.cfg, run.fed.server, run.ledger, run.measure_step, run.journal)

    def __init__(
        self,
        cfg: Config,
        method: Method,
        ledger: ByteLedger,
        measure_step: int | None,
        journal: Journal | None,
    ) -> None:
        super().__init__(cfg, method, ledger, measure_step, journal)
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            # Ray runs workers at nice 15 by default; a client is on the step's critical path.
            # On one machine: a loopback node address, no dashboard (Ray 2.60 still listens on
            # every interface: docs/DISTRIBUTED.md).
            local = (
                {}
                if cfg.ray_address
                else {"_system_config": {"worker_niceness": 0}, "_node_ip_address": "127.0.0.1"}
            )
            ray.init(
                address=cfg.ray_address or None,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
                **local,
            )
        actor = ray.remote(RayClient)
        # The K clients of a step run at once; on one machine more threads each only contend.
        # (Results depend on the thread count: equal counts give bit-identical runs.)
        threads = cfg.client_threads or torch.get_num_threads()
        gpus = self._gpus_per_client(cfg)
        self.actors = []
        for cid in range(cfg.clients):
            # Across machines each client goes to the node that offers its resource
            # (``ray start --resources='{"hosfl_client_3": 1}'``); on one machine, anywhere.
            res = {f"hosfl_client_{cid}": 1} if cfg.ray_address else {}
            opts = dict(num_cpus=0, num_gpus=gpus, max_restarts=-1, resources=res)
            if cid in self.actor_env:
                opts["runtime_env"] = {"env_vars": self.actor_env[cid]}
            self.actors.append(actor.options(**opts).remote(cfg.to_dict(), cid, threads))
        for cid in range(cfg.clients):  # every process is up; each starts from the record
            self._welcome(cid)
        self._pids = ray.get([a.pid.remote() for a in self.actors])

    # --- the transport ----------------------------------------------------------------------
    def _post(self, cid: int, data: bytes) -> ray.ObjectRef:
        try:
            return self.actors[cid].handle.remote(data)
        except ray.exceptions.RayError as e:
            raise ClientFailed(_reason(e)) from e

    def _collect(self, cid: int, handles: list, timeout: float) -> list[bytes | None]:
        try:
            return ray.get(handles, timeout=timeout)
        except ray.exceptions.RayError as e:
            raise ClientFailed(_reason(e)) from e

    def _state(self, cid: int) -> Synced:
        """As ``RemoteEngine._state``, waiting (up to STARTUP seconds) while the client's
        process starts or restarts (loading its data takes a while)."""
        deadline = time.monotonic() + max(STARTUP, self.timeout)
        while True:
            try:
                return super()._state(cid)
            except ClientFailed as e:
                starting = isinstance(e.__cause__, ray.exceptions.ActorUnavailableError)
                if not starting or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _restart(self, cid: int) -> None:
        """Kill client ``cid``'s process; Ray starts a new one, which re-syncs."""
        ray.kill(self.actors[cid], no_restart=False)
        # ray.kill returns at once: wait for the new process, so no call reaches the old one
        deadline = time.monotonic() + STARTUP
        while time.monotonic() < deadline:
            try:
                pid = ray.get(self.actors[cid].pid.remote(), timeout=self.timeout)
            except ray.exceptions.RayError:
                pid = self._pids[cid]
            if pid != self._pids[cid]:
                self._pids[cid] = pid
                return
            time.sleep(0.1)

    def _release(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        if self.started_ray:
            ray.shutdown()

    @staticmethod
    def _gpus_per_client(cfg: Config) -> float:
        """Ray's GPU share of one client process: none unless the clients compute on CUDA;
        ``client_gpus``, or the cluster's GPUs divided among the M clients (at most one)."""
        name = cfg.client_device or cfg.device
        if not name.startswith(("cuda", "auto")):
            return 0.0
        total = ray.cluster_resources().get("GPU", 0.0)
        if name == "auto" and not total:
            return 0.0  # auto on a cluster without GPUs: the CPU
        if not total:
            raise ConfigError("client_device=cuda: this Ray cluster offers no GPU")
        return cfg.client_gpus or min(1.0, total / cfg.clients)


def _reason(e: Exception) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:200]}"
