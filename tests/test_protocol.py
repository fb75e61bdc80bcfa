"""Messages: exact sizes, lossless round trips, and clear rejection of malformed bytes."""

import math
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hosfl.protocol import (
    CutGradient,
    ModelWeights,
    ProbeReport,
    ProbeScalars,
    ProtocolError,
    ScalarBroadcast,
    SmashedData,
    StepPlan,
    decode,
    encode,
    finite,
)


def _examples():
    g = torch.Generator().manual_seed(0)
    return [
        StepPlan(3, torch.tensor([1, 2, 3, 4, 5], dtype=torch.int32)),
        SmashedData(3, torch.randn(4, 8, 7, 7, generator=g), torch.tensor([0, 9, 2, 3])),
        CutGradient(3, torch.randn(4, 8, 7, 7, generator=g)),
        ProbeScalars(3, torch.randn(5, generator=g)),
        ProbeReport(3, torch.randn(5, generator=g), torch.rand(5, generator=g)),
        ScalarBroadcast(3, torch.arange(5, dtype=torch.int32), torch.randn(5, generator=g)),
        ModelWeights(3, torch.randn(100, generator=g)),
    ]


@pytest.mark.parametrize("msg", _examples(), ids=lambda m: type(m).__name__)
def test_round_trip_is_lossless_and_sizes_are_exact(msg):
    data = encode(msg)
    assert len(data) == msg.nbytes() == sum(msg.payload_bytes().values())
    back = decode(data)
    assert type(back) is type(msg) and back.step == msg.step
    for name in msg.SCHEMA:
        assert torch.equal(getattr(back, name), getattr(msg, name))


def test_aggregation_payloads_are_4P_bytes_whatever_the_model():
    P = 7
    up = ProbeScalars(0, torch.zeros(P))
    down = ScalarBroadcast(0, torch.zeros(P, dtype=torch.int32), torch.zeros(P))
    assert up.payload_bytes()["scalars"] == 4 * P
    assert down.payload_bytes()["seeds"] + down.payload_bytes()["scalars"] == 8 * P
    assert up.payload_bytes()["framing"] < 32 and down.payload_bytes()["framing"] < 32


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(0, 5), min_size=1, max_size=4), step=st.integers(0, 2**40))
def test_encoded_length_equals_payload_bytes_for_any_shape(shape, step):
    msg = CutGradient(step, torch.ones(shape))
    assert len(encode(msg)) == msg.nbytes()
    assert msg.payload_bytes()["lambda"] == 4 * math.prod(shape)
    assert decode(encode(msg)).lam.shape == torch.Size(shape)


def _bad(mutate):
    data = bytearray(encode(ProbeScalars(1, torch.ones(3))))
    return bytes(mutate(data))


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "shorter than its prefix"),
        (_bad(lambda d: b"XXXX" + d[4:]), "not a hosfl"),
        (_bad(lambda d: d[:4] + bytes([1, 99]) + d[6:]), "unknown message type"),
        (_bad(lambda d: d[:-1]), "truncated"),
        (_bad(lambda d: d + b"\0"), "trailing"),
        (_bad(lambda d: d[:10]), "header truncated"),
        (_bad(lambda d: d[:-4] + struct.pack("<f", float("nan"))), "NaN or infinite"),
        (_bad(lambda d: d[:-4] + struct.pack("<f", float("inf"))), "NaN or infinite"),
        (_bad(lambda d: d[:14] + bytes([3]) + d[15:]), "dtype"),  # float32 -> int32
        (encode(ProbeScalars(1, torch.ones(1, 3))), "dimensions"),  # rank 2, expected 1
        (encode(SmashedData(1, torch.ones(2, 3), torch.ones(2, dtype=torch.int32))), "dtype"),
        (_bad(lambda d: d[:14] + bytes([9]) + d[15:]), "dtype code"),
    ],
)
def test_malformed_messages_are_rejected_with_a_reason(data, reason):
    with pytest.raises(ProtocolError, match=reason):
        decode(data)


def test_wrong_schema_is_rejected_before_sending():
    with pytest.raises(ProtocolError, match="dtype"):
        SmashedData(0, torch.ones(2, 3), torch.ones(2, dtype=torch.int32)).validate()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [None, math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", [0, 777, 4095])
def test_finite_agrees_with_isfinite_all(dtype, bad, where):
    t = torch.randn(4096, generator=torch.Generator().manual_seed(where)).to(dtype)
    if bad is not None:
        t[where] = bad
    assert finite(t) is bool(torch.isfinite(t).all()) is (bad is None)
    assert finite(t.view(64, 64)) is (bad is None)


def test_finite_of_integer_and_empty_tensors_is_true():
    assert finite(torch.arange(5)) and finite(torch.empty(0)) and finite(torch.empty(0, 3))
