"""The typed messages that cross between client and server, and their wire format.

A message is a frozen dataclass of integers and tensors. ``encode`` writes it as

    b"HSFL" | u8 version | u8 type | header | raw tensor bytes

where the header holds, field by field, an i64 for an integer field and (u8 dtype, u8 rank,
u32 × rank dims) for a tensor field, all little-endian. ``decode`` reads it back without ever
unpickling, checking every field against the message's declared schema (dtype, rank, finite
values) and the byte count against the shapes. ``payload_bytes`` gives the exact size of
an encoded message split by payload type; the byte ledger is built from it.

The cut layer's tensors (smashed data z and its gradient λ, the bulk of a split method's
traffic) may travel in a smaller format, the run's ``cut_dtype``: ``bfloat16`` (2 bytes a
value, rounded to nearest even) or ``int8`` (1 byte a value and one float32 scale per tensor,
max|x|/127, rounded to nearest: within scale/2 of x). Whatever the format, the receiver
decodes float32; ``rounded`` gives the values it decodes without encoding, for the in-process
engine, bit for bit what the wire delivers.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

MAGIC = b"HSFL"
VERSION = 1
_PREFIX = struct.Struct("<4sBB")
_INT = struct.Struct("<q")
_TENSOR = struct.Struct("<BB")
_DIM = struct.Struct("<I")
_MAX_RANK = 8
FRAMING = "framing"

_DTYPES = {1: torch.float32, 2: torch.int64, 3: torch.int32}
_NUMPY = {torch.float32: "<f4", torch.int64: "<i8", torch.int32: "<i4"}
_CODES = {v: k for k, v in _DTYPES.items()}
# a lossy float32 field (``Tensor.lossy``) in a smaller format: its code and bytes per value
CUT_DTYPES = ("float32", "bfloat16", "int8")
_LOSSY = {"bfloat16": 4, "int8": 5}
_SCALE = struct.Struct("<f")  # an int8 field's bytes start with its float32 scale


def finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite (an integer tensor always is): its least and
    greatest values are, NaN propagating into both. One pass and no mask: a fifth of
    ``isfinite(t).all()``'s time on the default task's cut layer (50 176 values)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    return bool(torch.isfinite(torch.stack(t.aminmax())).all())


class ProtocolError(ValueError):
    """A message that is malformed, of the wrong shape or type, or carries non-finite values."""


@dataclass(frozen=True)
class Tensor:
    """Schema of one tensor field: its payload type (for the ledger), dtype and rank."""

    payload: str
    dtype: torch.dtype | tuple[torch.dtype, ...]  # a tuple: any of these
    ndim: int | None = None  # None: any rank
    lossy: bool = False  # float32 that may travel in the run's ``cut_dtype``


def _is_lossy(spec: Tensor, t: torch.Tensor, cut_dtype: str) -> bool:
    """Whether this tensor field travels in ``cut_dtype`` rather than its own dtype."""
    return spec.lossy and cut_dtype != "float32" and t.dtype == torch.float32


def _wire_size(spec: Tensor, t: torch.Tensor, cut_dtype: str) -> int:
    """Bytes of one tensor field's values on the wire."""
    if not _is_lossy(spec, t, cut_dtype):
        return t.numel() * t.element_size()
    return 2 * t.numel() if cut_dtype == "bfloat16" else t.numel() + _SCALE.size


def _int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x ≈ q·s with q integer-valued in [-127, 127] (float32) and s = max|x|/127 (1 for an
    all-zero tensor); a non-finite x gives a non-finite s, which the receiver refuses."""
    amax = t.detach().abs().amax() if t.numel() else torch.zeros(())
    scale = torch.where(amax == 0, torch.ones(()), amax / 127).float()
    return torch.round(t.detach().float() / scale).clamp(-127, 127), scale


def _lossy(t: torch.Tensor, cut_dtype: str) -> torch.Tensor:
    """The float32 values a receiver decodes from ``t`` sent in ``cut_dtype``."""
    if cut_dtype == "bfloat16":
        return t.detach().to(torch.bfloat16).float()
    q, scale = _int8(t)
    return q * scale


class Message:
    """Base of all messages: subclasses are frozen dataclasses with a ``SCHEMA``."""

    TYPE_ID: ClassVar[int]
    SCHEMA: ClassVar[dict[str, Tensor]]
    _registry: ClassVar[dict[int, type[Message]]] = {}

    def __init_subclass__(cls, type_id: int, **kw: object) -> None:
        super().__init_subclass__(**kw)
        if type_id in Message._registry:
            raise TypeError(f"message type id {type_id} used twice")
        cls.TYPE_ID = type_id
        Message._registry[type_id] = cls

    def _header(self, cut_dtype: str) -> bytes:
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in self.SCHEMA:
                code = (_LOSSY[cut_dtype] if _is_lossy(self.SCHEMA[f.name], value, cut_dtype)
                        else _CODES[value.dtype])  # fmt: skip
                parts.append(_TENSOR.pack(code, value.dim()))
                parts.extend(_DIM.pack(d) for d in value.shape)
            else:
                parts.append(_INT.pack(int(value)))
        return b"".join(parts)

    def payload_bytes(self, cut_dtype: str = "float32") -> dict[str, int]:
        """Exact encoded size by payload type; the sum equals ``len(encode(self, cut_dtype))``."""
        framing = _PREFIX.size
        for f in dataclasses.fields(self):
            spec = self.SCHEMA.get(f.name)
            rank = getattr(self, f.name).dim() if spec else 0
            framing += _TENSOR.size + _DIM.size * rank if spec else _INT.size
        sizes = {FRAMING: framing}
        for name, spec in self.SCHEMA.items():
            t = getattr(self, name)
            sizes[spec.payload] = sizes.get(spec.payload, 0) + _wire_size(spec, t, cut_dtype)
        return sizes

    def nbytes(self, cut_dtype: str = "float32") -> int:
        return sum(self.payload_bytes(cut_dtype).values())

    def validate(self) -> None:
        """Raise ProtocolError unless every tensor matches the schema and is finite."""
        for name, spec in self.SCHEMA.items():
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise ProtocolError(f"{type(self).__name__}.{name} is not a tensor")
            allowed = spec.dtype if isinstance(spec.dtype, tuple) else (spec.dtype,)
            if t.dtype not in allowed:
                raise ProtocolError(
                    f"{type(self).__name__}.{name}: dtype {t.dtype}, expected {spec.dtype}"
                )
            if spec.ndim is not None and t.dim() != spec.ndim:
                raise ProtocolError(
                    f"{type(self).__name__}.{name}: {t.dim()} dimensions, expected {spec.ndim}"
                )
            if not finite(t):
                raise ProtocolError(f"{type(self).__name__}.{name} has NaN or infinite values")


def rounded(msg: Message, cut_dtype: str) -> Message:
    """``msg`` as its receiver decodes it when sent in ``cut_dtype`` (itself for float32)."""
    lossy = [n for n, spec in msg.SCHEMA.items() if spec.lossy]
    if cut_dtype == "float32" or not lossy:
        return msg
    if cut_dtype not in _LOSSY:
        raise ValueError(f"cut_dtype {cut_dtype!r}: expected one of {', '.join(CUT_DTYPES)}")
    return dataclasses.replace(msg, **{n: _lossy(getattr(msg, n), cut_dtype) for n in lossy})


def encode(msg: Message, cut_dtype: str = "float32") -> bytes:
    """The message's bytes; its lossy fields (z, λ) in ``cut_dtype``."""
    if cut_dtype not in CUT_DTYPES:
        raise ValueError(f"cut_dtype {cut_dtype!r}: expected one of {', '.join(CUT_DTYPES)}")
    parts = [_PREFIX.pack(MAGIC, VERSION, msg.TYPE_ID), msg._header(cut_dtype)]
    for name, spec in msg.SCHEMA.items():
        t = getattr(msg, name).detach().cpu()
        if not _is_lossy(spec, t, cut_dtype):
            parts.append(t.numpy().astype(_NUMPY[t.dtype], copy=False).tobytes())
        elif cut_dtype == "bfloat16":
            parts.append(t.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes())
        else:
            q, scale = _int8(t)
            parts.append(_SCALE.pack(float(scale)) + q.to(torch.int8).numpy().tobytes())
    return b"".join(parts)


def _read_lossy(data: bytes, offset: int, code: int, count: int) -> tuple[torch.Tensor, int]:
    """A float32 field sent as bfloat16 or int8: its values and the bytes it took."""
    if code == _LOSSY["bfloat16"]:
        bits = np.frombuffer(data, dtype="<i2", count=count, offset=offset).astype(np.int16)
        return torch.from_numpy(bits).view(torch.bfloat16).float(), 2 * count
    (scale,) = _SCALE.unpack_from(data, offset)
    q = np.frombuffer(data, dtype=np.int8, count=count, offset=offset + _SCALE.size)
    if not (math.isfinite(scale) and scale > 0) or (count and int(q.min()) < -127):
        raise ProtocolError(f"int8 values with scale {scale} (expected > 0, |q| <= 127)")
    values = torch.from_numpy(q.astype(np.float32)) * torch.tensor(scale, dtype=torch.float32)
    return values, _SCALE.size + count


def decode(data: bytes) -> Message:
    """Parse and validate one message; raises ProtocolError, never executes anything."""
    if len(data) < _PREFIX.size:
        raise ProtocolError(f"message of {len(data)} bytes is shorter than its prefix")
    magic, version, type_id = _PREFIX.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise ProtocolError(f"not a hosfl v{VERSION} message (magic {magic!r}, v{version})")
    cls = Message._registry.get(type_id)
    if cls is None:
        raise ProtocolError(f"unknown message type {type_id}")
    offset = _PREFIX.size
    values: dict[str, object] = {}
    shapes: dict[str, tuple[int, list[int]]] = {}
    try:
        for f in dataclasses.fields(cls):
            if f.name not in cls.SCHEMA:
                (values[f.name],) = _INT.unpack_from(data, offset)
                offset += _INT.size
                continue
            code, rank = _TENSOR.unpack_from(data, offset)
            offset += _TENSOR.size
            lossy = cls.SCHEMA[f.name].lossy and code in _LOSSY.values()
            if (code not in _DTYPES and not lossy) or rank > _MAX_RANK:
                raise ProtocolError(f"{cls.__name__}.{f.name}: dtype code {code}, rank {rank}")
            dims = [_DIM.unpack_from(data, offset + _DIM.size * i)[0] for i in range(rank)]
            offset += _DIM.size * rank
            shapes[f.name] = (code, dims)
    except struct.error:
        raise ProtocolError(f"{cls.__name__}: header truncated ({len(data)} bytes)") from None
    for name, (code, dims) in shapes.items():
        count = math.prod(dims)
        size = count * (np.dtype(_NUMPY[_DTYPES[code]]).itemsize if code in _DTYPES else 1)
        if offset + size + (_SCALE.size if code == _LOSSY["int8"] else 0) > len(data):
            raise ProtocolError(f"{cls.__name__}.{name}: truncated ({len(data)} bytes)")
        if code not in _DTYPES:
            flat, size = _read_lossy(data, offset, code, count)
            values[name] = flat.reshape(dims)
        else:
            array = np.frombuffer(data, dtype=_NUMPY[_DTYPES[code]], count=count, offset=offset)
            values[name] = torch.from_numpy(array.astype(array.dtype.newbyteorder("=")))
            values[name] = values[name].reshape(dims)
        offset += size
    if offset != len(data):
        raise ProtocolError(f"{cls.__name__}: {len(data) - offset} trailing bytes")
    msg = cls(**values)
    msg.validate()
    return msg


# --- the messages -------------------------------------------------------------------------
F32, I64, I32 = torch.float32, torch.int64, torch.int32


@dataclass(frozen=True)
class StepPlan(Message, type_id=1):
    """Server -> sampled client: take part in ``step`` with these probe seeds."""

    step: int
    seeds: torch.Tensor
    SCHEMA: ClassVar = {"seeds": Tensor("seeds", I32, 1)}


@dataclass(frozen=True)
class SmashedData(Message, type_id=2):
    """Client -> server: cut-layer output z = f_c(x; θ_c) and the labels of the batch."""

    step: int
    z: torch.Tensor
    y: torch.Tensor
    # labels: class indices (int64, one per example) or any float32 targets (regression)
    SCHEMA: ClassVar = {
        "z": Tensor("smashed", F32, lossy=True),
        "y": Tensor("labels", (I64, F32)),
    }


@dataclass(frozen=True)
class CutGradient(Message, type_id=3):
    """Server -> client: λ = ∂ℓ/∂z for the client's own smashed data."""

    step: int
    lam: torch.Tensor
    SCHEMA: ClassVar = {"lam": Tensor("lambda", F32, lossy=True)}


@dataclass(frozen=True)
class ProbeScalars(Message, type_id=4):
    """Client -> server: v_p = λᵀ (f_c(x; θ_c + μ u_p) − z) for p = 1..P."""

    step: int
    values: torch.Tensor
    SCHEMA: ClassVar = {"values": Tensor("scalars", F32, 1)}


@dataclass(frozen=True)
class ProbeReport(ProbeScalars, type_id=14):
    """``ProbeScalars`` with, for ``zo_lr_rule=output``, the size of each probe's change to the
    cut layer: r_p = ‖f_c(x; θ_c + μ u_p) − z‖ / ‖z‖ (≥ 0), from which the server sets the rate."""

    sizes: torch.Tensor
    SCHEMA: ClassVar = {**ProbeScalars.SCHEMA, "sizes": Tensor("scalars", F32, 1)}


@dataclass(frozen=True)
class ScalarBroadcast(Message, type_id=5):
    """Server -> every client: the step's seeds and averaged scalars v̄; all clients update."""

    step: int
    seeds: torch.Tensor
    values: torch.Tensor
    SCHEMA: ClassVar = {"seeds": Tensor("seeds", I32, 1), "values": Tensor("scalars", F32, 1)}


@dataclass(frozen=True)
class ModelWeights(Message, type_id=6):
    """Whole client model as one flat float32 vector (first-order SplitFed sync, both ways)."""

    step: int
    weights: torch.Tensor
    SCHEMA: ClassVar = {"weights": Tensor("weights", F32, 1)}


@dataclass(frozen=True)
class ProbeRequest(Message, type_id=7):
    """Server -> client (HOSL, ZO-SFL): send f_c(x; θ_c + μ u_probe) for this step's batch."""

    step: int
    probe: int
    SCHEMA: ClassVar = {}


@dataclass(frozen=True)
class CatchUp(Message, type_id=8):
    """Server -> a client that missed steps: the (seeds, v̄) of steps ``step``.. in order, one
    row per step, from the server's journal; the client replays them (no weights travel)."""

    step: int
    seeds: torch.Tensor
    values: torch.Tensor
    SCHEMA: ClassVar = {"seeds": Tensor("seeds", I32, 2), "values": Tensor("scalars", F32, 2)}


@dataclass(frozen=True)
class Synced(Message, type_id=9):
    """Client -> server: my replica of θ_c is at ``step`` (the next update it needs) and its
    bytes hash to ``digest``; the server compares it with its own record."""

    step: int
    digest: int
    SCHEMA: ClassVar = {}


@dataclass(frozen=True)
class ReplicaState(Message, type_id=10):
    """Server -> a client whose replica drifted from the server's record: θ_c and the client
    optimizer's state at ``step``, from the record (the only message that carries the weights
    of a seed-synced method; it is sent only on a digest mismatch, and counted)."""

    step: int
    weights: torch.Tensor
    state: torch.Tensor
    SCHEMA: ClassVar = {
        "weights": Tensor("weights", F32, 1),
        "state": Tensor("optimizer", F32, 1),
    }


@dataclass(frozen=True)
class StateQuery(Message, type_id=11):
    """Server -> a client process: where is your replica? (answered with Synced)"""

    step: int
    SCHEMA: ClassVar = {}


@dataclass(frozen=True)
class StatsQuery(Message, type_id=12):
    """Server -> a client process, at the end: your figures (answered with ClientStats)."""

    step: int
    SCHEMA: ClassVar = {}


@dataclass(frozen=True)
class ClientStats(Message, type_id=13):
    """Client process -> server: peak tensor bytes of its metered step, microseconds of
    client work outside it, and the process's peak resident memory (bytes)."""

    step: int
    peak_bytes: int
    micros: int
    rss_bytes: int
    SCHEMA: ClassVar = {}
