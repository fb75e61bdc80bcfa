"""Typed run configuration: one dataclass, loaded from TOML and ``key=value`` overrides.

Every field carries its help text (``hosfl run --help`` prints them) and is checked in
``Config.validate``; a bad value raises ``ConfigError`` naming the key and the value.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class ConfigError(ValueError):
    """A configuration that cannot run: unknown key, wrong type or out-of-range value."""


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


OPTIMIZERS = ("sgd", "adam")
PARTITIONS = ("iid", "dirichlet", "shards", "by-source")
TLS = ("auto", "on", "off")
DIRECTIONS = ("gaussian", "rademacher", "lowrank")
TRACKERS = ("tensorboard", "mlflow")
AGGREGATES = ("mean", "median", "trimmed", "clipped", "bounded")
LORA = ("none", "client", "server", "both")
CUT_DTYPES = ("float32", "bfloat16", "int8")  # protocol.CUT_DTYPES (config imports no torch)
LR_RULES = ("fixed", "dimension", "output", "lesser")
# the rules that size HO-SFL's step from how far its probes move the cut layer
SIZED_RULES = ("output", "lesser")
SIMULATE = ("auto", "batched", "per-client")
# server_average=-1: the average's time constant is the run's length over this (100 steps of
# the 1 500-step runs where β = 0.99 was measured best, docs/FINDINGS.md)
AVERAGE_SPAN = 15


# The settings that only some methods read. Each method declares the ones it reads
# (``Method.settings``); one that the chosen method does not read, set away from its default,
# is an error naming the method (``Method.check``), never silently ignored.
METHOD_SETTINGS = frozenset(
    {"P", "mu", "directions", "zo_rank", "zo_lazy", "estimator", "client_optimizer",
     "client_lr", "client_dtype", "server_dtype", "zo_lr_rule", "zo_step", "zo_lr_scale",
     "zo_lr_max", "zo_clip", "server_optimizer", "server_lr", "server_average",
     "server_schedule", "momentum", "local_steps", "aggregate", "outlier_factor",
     "smashed_bound", "cut_dtype"}
)  # fmt: skip


@dataclass(init=False)
class Config:
    """Every setting of a run. ``Config(**kw)``, ``Config.from_dict(kw)`` and the CLI's
    ``key=value`` resolve alike: the task's own defaults (its cut, its learning-rate rule)
    fill in what is not given, then the global defaults."""

    method: str = _f(
        "hosfl",
        "training method: hosfl, sfl-v1, sfl-v2, zo-sfl, hosl, fedavg, "
        "zo-fl, frozen (or one added with hosfl.methods.register)",
    )
    task: str = _f("fmnist-cnn", "task: a built-in or registered name, or package.module:factory")
    clients: int = _f(10, "number of clients M")
    sampled: int = _f(3, "clients sampled per step K (1 <= K <= M)")
    batch_size: int = _f(32, "mini-batch size per sampled client")
    steps: int = _f(1500, "number of steps (aggregations)")
    P: int = _f(5, "zeroth-order probes per step (shared seeds)")
    mu: float = _f(1e-3, "perturbation scale of the probes")
    directions: str = _f(
        "rademacher",
        "probe directions: rademacher (±1 from a counter hash; directions and updates give the "
        "same bits on every IEEE-754 machine), gaussian (a CPU generator; NOT exact across "
        "machines: replicas on another kind of CPU or a GPU drift and are resynced) or lowrank "
        "(each matrix's u = U·Vᵀ/√r, ±1 factors, V kept for zo_lazy steps; exact; hosfl)",
    )
    zo_rank: int = _f(4, "directions=lowrank: the rank r of each matrix's direction U·Vᵀ/√r")
    zo_lazy: int = _f(50, "directions=lowrank: steps one basis V is kept (LoZO's lazy sampling)")
    estimator: str = _f(
        "fd",
        "hosfl client's probe scalar λᵀ(f(θ+μu) − f(θ)): fd (finite differences, P+1 forwards) "
        "or jvp (μ·λᵀJ_c u by forward-mode differentiation, P forward-mode passes)",
    )
    client_optimizer: str = _f("sgd", f"client optimizer: {', '.join(OPTIMIZERS)}")
    client_lr: float = _f(0.05, "client learning rate")
    client_dtype: str = _f(
        "float32", "hosfl client forwards: float32 or bfloat16 (autocast, stochastic rounding)"
    )
    server_dtype: str = _f(
        "float32", "split methods' server forwards: float32 or bfloat16 (autocast; λ float32)"
    )
    cut_dtype: str = _f(
        "float32",
        "split methods: the format smashed data z and its gradient λ travel in, both ways: "
        "float32, bfloat16 (2 bytes a value) or int8 (1 byte a value and a float32 scale per "
        "tensor); the receiver computes in float32, the journal and replicas stay exact",
    )
    zo_lr_rule: str = _f(
        "fixed",
        "zeroth-order client lr: fixed (client_lr), dimension (zo_lr_scale·P/d_c, <= client_lr), "
        "output (set from the first 20 steps so that a step changes the cut layer's output "
        "by zo_step·√(P/d_c) of its size, <= client_lr; hosfl with SGD) or lesser (hosfl: the "
        "smaller of output's and dimension's; the other methods: dimension's)",
    )
    zo_step: float = _f(
        2.0,
        "zo_lr_rule=output or lesser: c in the step's relative change of the cut layer, "
        "c·√(P/d_c)",
    )
    zo_lr_scale: float = _f(50.0, "zo_lr_rule=dimension or lesser: the constant c of c·P/d_c")
    zo_lr_max: float = _f(
        0.0,
        "zo_lr_rule=dimension or lesser: the largest zeroth-order rate (0: the first-order rate)",
    )
    zo_clip: float = _f(
        0.0,
        "cap each step's zeroth-order update at this many times the median size of the last 64 "
        "steps' (‖v̄‖; 0: off): one heavy-tailed step cannot wreck θ_c",
    )
    server_optimizer: str = _f("sgd", f"server optimizer: {', '.join(OPTIMIZERS)}")
    server_lr: float = _f(0.05, "server learning rate")
    server_average: float = _f(
        -1.0,
        "split methods: evaluate (and export) an exponential average of the server part, "
        "a ← β·a + (1 − β)·θ_s after each server step; β in [0, 1) (0: off, evaluate θ_s) or "
        f"-1: from the run's length, β = 1 − {AVERAGE_SPAN}/steps (0.99 at 1 500 steps, 0.95 "
        f"at 300; off under {AVERAGE_SPAN + 1} steps)",
    )
    server_schedule: str = _f(
        "constant",
        "split methods' backprop server rate: constant (server_lr) or cosine (server_lr·"
        "(1 + cos(π·t/steps))/2 at step t: the last steps' noise fades)",
    )
    momentum: float = _f(0.0, "SGD momentum, client and server")
    local_steps: int = _f(1, "local SGD steps per round (fedavg)")
    cut: str = _f("conv2", "cut point: the last layer the client holds")
    seq_len: int = _f(0, "text tasks: tokens per example, longer ones cut (0: the task's)")
    freeze: str = _f("", "comma-separated parameter-name parts to freeze (not trained, not in d_c)")
    lora: str = _f("none", f"LoRA adapters (peft) on: {', '.join(LORA)}")
    lora_rank: int = _f(8, "LoRA rank r")
    lora_alpha: float = _f(16.0, "LoRA scaling alpha (update scaled by alpha/r)")
    lora_targets: str = _f("", "comma-separated module-name endings that get adapters")
    partition: str = _f("iid", f"data partition: {', '.join(PARTITIONS)}")
    alpha: float = _f(0.5, "Dirichlet concentration (partition=dirichlet)")
    shards_per_client: int = _f(2, "label shards per client (partition=shards)")
    train_subset: int = _f(0, "use only the first N training images (0: all)")
    test_subset: int = _f(0, "evaluate on the first N test images (0: all)")
    seed: int = _f(0, "seed of everything: model init, partition, sampling, probes")
    eval_every: int = _f(250, "evaluate on the test set every N steps (0: only at the end)")
    out: str = _f("", "run folder (empty: runs/<method>-<time>)")
    progress: bool = _f(True, "show a progress bar")
    log_to: str = _f(
        "",
        "experiment trackers, comma-separated: tensorboard (OUT/tensorboard), mlflow "
        "(MLFLOW_TRACKING_URI, else OUT/mlflow.db)",
    )
    snapshot_every: int = _f(100, "write checkpoint.pt every N steps (and at each evaluation)")
    engine: str = _f("local", "where clients run: local, ray, net (or one added in engines/)")
    device: str = _f("auto", "where tensors live: auto (cuda when present), cpu, cuda, cuda:N")
    client_device: str = _f("", "the client part's device (empty: device)")
    server_device: str = _f("", "the server part's device (empty: device)")
    simulate: str = _f(
        "auto",
        "in-process clients: batched (the K sampled clients' forwards as one batch), "
        "per-client (one call each: the reference), auto (batched on cuda, per-client on cpu)",
    )
    client_gpus: float = _f(
        0.0,
        "engine=ray, client_device=cuda: GPUs per client process (a fraction shares a card; "
        "0: the cluster's GPUs divided among the clients)",
    )
    ray_address: str = _f("", "engine=ray: cluster address (empty: start Ray on this machine)")
    client_timeout: float = _f(
        60.0, "engine=ray/net: seconds to wait for a client's reply (then it is dropped)"
    )
    client_retries: int = _f(
        1, "engine=ray/net: times a failed client is restarted (ray) or re-synced and asked again"
    )
    client_threads: int = _f(
        1, "engine=ray/net: torch threads per client process (0: as many as the server process)"
    )
    listen: str = _f("127.0.0.1:7070", "engine=net: HOST:PORT the server listens on (port 0: any)")
    secrets: str = _f("", "engine=net: folder of the client tokens, TLS key (empty: RUN/secrets)")
    tls: str = _f("auto", "engine=net: TLS on, off, or auto (on unless listen is loopback)")
    join_timeout: float = _f(
        300.0, "engine=net: seconds to wait at the start for the clients to connect"
    )
    min_clients: int = _f(
        0, "engine=net: start training once this many clients are connected (0: all of them)"
    )
    max_upload_mb: float = _f(64.0, "engine=net: largest frame a client may send, in MiB")
    check_every: int = _f(
        100,
        "engine=ray/net: check every client's replica digest every N steps (0: only at catch-up "
        "and the end); one that differs from the server's record is resynced from it",
    )
    aggregate: str = _f(
        "bounded",
        f"scalar aggregation: {', '.join(AGGREGATES)} (bounded: each client's scalars, and "
        "SplitFed's weight changes, at most the step's median client norm and 3× the run's "
        "recent median: measured to hold one or two ×50 clients of ten where median does not)",
    )
    smashed_bound: float = _f(
        2.0,
        "split methods: scale each client's smashed data down to at most this many times the "
        "median size (RMS) of the step's clients' and of recent uploads' (0: off)",
    )
    outlier_factor: float = _f(
        1000.0,
        "reject a smashed-data or probe-scalar upload whose largest value is more than this "
        "many times the median of recent uploads (0: off)",
    )

    def __init__(self, **values: Any) -> None:
        known = {f.name for f in fields(self)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown setting(s) {', '.join(unknown)} (valid: {', '.join(known)})"
            )
        values = {**_task_defaults(values.get("task", "fmnist-cnn")), **values}
        for f in fields(self):
            setattr(self, f.name, values.get(f.name, f.default))

    def validate(self) -> Config:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"{key}={getattr(self, key)!r}: {why}")

        for key in (
            "clients",
            "sampled",
            "batch_size",
            "steps",
            "P",
            "shards_per_client",
            "local_steps",
            "lora_rank",
            "zo_rank",
            "zo_lazy",
        ):
            if getattr(self, key) < 1:
                raise bad(key, "must be >= 1")
        bounds = {
            "steps": 10**8,
            "P": 4096,
            "batch_size": 2**20,
            "clients": 10**6,
            "local_steps": 10**4,
        }
        for key, most in bounds.items():
            if getattr(self, key) > most:
                raise bad(key, f"must be <= {most:,}")
        if self.sampled > self.clients:
            raise bad("sampled", f"cannot sample more clients than clients={self.clients}")
        for key in ("mu", "alpha", "lora_alpha", "zo_lr_scale"):
            if not (getattr(self, key) > 0 and getattr(self, key) < float("inf")):
                raise bad(key, "must be a finite number > 0")
        if not (self.smashed_bound == 0 or 1 <= self.smashed_bound < float("inf")):
            raise bad("smashed_bound", "must be 0 (off) or a finite number >= 1")
        for key in ("client_lr", "server_lr", "zo_lr_max", "outlier_factor"):
            if not (getattr(self, key) >= 0 and getattr(self, key) < float("inf")):
                raise bad(key, "must be a finite number >= 0")
        if not 0 < self.zo_step < float("inf"):
            raise bad("zo_step", "must be a finite number > 0")
        if self.zo_lr_rule in SIZED_RULES and self.client_optimizer != "sgd":
            raise bad(
                "zo_lr_rule",
                f"{self.zo_lr_rule} sizes an SGD step: client_optimizer=sgd, or zo_lr_rule=fixed "
                "or dimension",
            )
        if not (self.server_average == -1 or 0 <= self.server_average < 1):
            raise bad("server_average", "must be in [0, 1) (0: off) or -1 (from the run's length)")
        if not (self.zo_clip == 0 or 1 <= self.zo_clip < float("inf")):
            raise bad("zo_clip", "must be 0 (off) or a finite number >= 1")
        if 0 < self.outlier_factor < 2:
            raise bad("outlier_factor", "must be 0 (off) or >= 2")
        if not 0 <= self.momentum < 1:
            raise bad("momentum", "must be in [0, 1)")
        if not (0 <= self.client_gpus < float("inf")):
            raise bad("client_gpus", "must be a finite number >= 0")
        for key in ("device", "client_device", "server_device"):
            value = getattr(self, key)
            if value and value != "auto" and value.split(":")[0] not in ("cpu", "cuda"):
                raise bad(key, "must be auto, cpu, cuda or cuda:N")
        if self.simulate == "batched" and self.engine != "local":
            raise bad("simulate", "batched simulation is for engine=local (in-process)")
        for key in ("client_timeout", "join_timeout", "max_upload_mb"):
            if not (getattr(self, key) > 0 and getattr(self, key) < float("inf")):
                raise bad(key, "must be a finite number > 0")
        if self.min_clients > self.clients:
            raise bad("min_clients", f"must be at most clients={self.clients}")
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            raise bad("listen", "must be HOST:PORT")
        if self.estimator == "jvp" and self.client_dtype == "bfloat16":
            raise bad("estimator", "jvp probes are float32 (client_dtype=float32)")
        if self.aggregate == "trimmed" and self.sampled < 3:
            raise bad(
                "aggregate",
                f"trimmed drops two values a probe: needs sampled >= 3, not {self.sampled}",
            )
        keys = ("seq_len", "train_subset", "test_subset", "eval_every", "seed", "snapshot_every")
        for key in (*keys, "client_retries", "client_threads", "check_every", "min_clients"):
            if getattr(self, key) < 0:
                raise bad(key, "must be >= 0")
        if self.seed >= 2**32:
            raise bad("seed", "must be < 2**32")
        choices = {
            "client_optimizer": OPTIMIZERS,
            "server_optimizer": OPTIMIZERS,
            "partition": PARTITIONS,
            "tls": TLS,
            "estimator": ("fd", "jvp"),
            "directions": DIRECTIONS,
            "aggregate": AGGREGATES,
            "lora": LORA,
            "zo_lr_rule": LR_RULES,
            "client_dtype": ("float32", "bfloat16"),
            "simulate": SIMULATE,
            "server_dtype": ("float32", "bfloat16"),
            "cut_dtype": CUT_DTYPES,
            "server_schedule": ("constant", "cosine"),
        }
        unknown = [t for t in self.log_to.split(",") if t.strip() not in ("", *TRACKERS)]
        if unknown:
            valid = ", ".join(TRACKERS)
            raise bad("log_to", f"unknown tracker {unknown[0].strip()!r} (valid: {valid})")
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise bad(key, f"must be one of {', '.join(allowed)}")
        return self

    # --- loading -------------------------------------------------------------------------
    @classmethod
    def help_lines(cls) -> list[str]:
        return [
            f"  {f.name:<18} {f.metadata['help']} (default: {f.default!r})" for f in fields(cls)
        ]

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> Config:
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"{source}: unknown key {key!r} (valid: {', '.join(known)})")
            kwargs[key] = _coerce(key, known[key].type, value)
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] = ()) -> Config:
        """Defaults, then the TOML file, then ``key=value`` overrides; validated."""
        values: dict[str, Any] = {}
        if path is not None:
            try:
                values = tomllib.loads(Path(path).read_text())
            except FileNotFoundError:
                raise ConfigError(f"config file {path} does not exist") from None
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"override {item!r} is not of the form key=value")
            values[key.strip()] = value.strip()
        return cls.from_dict(values, source=str(path) if path else "overrides").validate()

    def changed(self) -> dict[str, Any]:
        """The settings whose value is not the default (the task's own, or the global one)."""
        base = {f.name: f.default for f in fields(self)} | _task_defaults(self.task)
        return {k: v for k, v in self.to_dict().items() if v != base[k]}

    def device_of(self, part: str) -> torch.device:
        """The device of the ``client`` or ``server`` part on this machine; ConfigError if it
        is not here."""
        from hosfl import devices

        name = {"client": self.client_device, "server": self.server_device}[part] or self.device
        try:
            return devices.resolve(name)
        except ValueError as e:
            raise ConfigError(f"{part} device: {e}") from None

    def batched(self) -> bool:
        """Whether in-process clients are simulated as one batch."""
        if self.engine != "local" or self.simulate == "per-client":
            return False
        return self.simulate == "batched" or self.device_of("client").type == "cuda"

    def average_beta(self) -> float:
        """β of the server's evaluated average (``server_average``; 0: none)."""
        if self.server_average != -1:
            return self.server_average
        return max(0.0, 1 - AVERAGE_SPAN / self.steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return "".join(f"{k} = {json.dumps(v)}\n" for k, v in self.to_dict().items())


def _task_defaults(name: str) -> dict[str, Any]:
    """The settings a task brings (its cut, learning rates...) under the user's own."""
    from hosfl import tasks  # the registry imports models; config must stay importable alone

    try:
        return tasks.get(name).defaults
    except ValueError:
        return {}  # an unknown task is reported when the run is built


def _coerce(key: str, type_name: str, value: Any) -> Any:
    """Turn a TOML value or an override string into the field's type, or raise."""
    kind = {"int": int, "float": float, "str": str, "bool": bool}[type_name]
    if isinstance(value, str) and kind is not str:
        text = value.strip().lower()
        try:
            if kind is bool:
                if text not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return text in ("true", "1", "yes")
            if kind is int:
                number = float(text)
                if not number.is_integer():
                    raise ValueError
                return int(number)
            return kind(text)
        except ValueError:
            raise ConfigError(f"{key}={value!r}: expected {type_name}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key}={value!r}: expected {type_name}")
    return value
