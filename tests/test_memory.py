"""The client memory meter sees real allocations, and tells a client that keeps its
activations for backprop (SplitFed) from one that does not (HO-SFL)."""

import torch
from torch import nn

from hosfl.metrics.memory import LiveTensorMeter, tensor_bytes
from hosfl.protocol import StepPlan
from hosfl.runner import build


def test_meter_sees_a_known_allocation_and_its_release():
    with LiveTensorMeter() as meter:
        a = torch.empty(1000, 1000)  # 4 000 000 bytes
        assert meter.current == 4_000_000
        b = a.view(-1)[:10]  # a view: no new memory
        assert meter.current == 4_000_000
        del a, b
        assert meter.current == 0
        c = torch.ones(10)
    assert meter.peak == 4_000_000 and meter.current == 40
    del c


def test_views_of_parameters_are_not_counted():
    layer = nn.Linear(100, 100)
    with LiveTensorMeter() as meter:
        w = layer.weight.t()
    assert meter.peak == 0
    assert tensor_bytes(layer) == 4 * (100 * 100 + 100)
    del w


def _live_after_forward(small_cfg, method):
    fed, _, _ = build(small_cfg(method=method, batch_size=32))
    with LiveTensorMeter() as meter:
        reply = fed.clients[0].handle(StepPlan(0, torch.arange(3, dtype=torch.int32)))
    del reply  # the smashed data is the server's now; what stays is the client's
    return meter.current


def test_a_backprop_client_keeps_its_activations_and_a_hosfl_client_does_not(small_cfg):
    kept_by_sfl = _live_after_forward(small_cfg, "sfl-v1")
    kept_by_hosfl = _live_after_forward(small_cfg, "hosfl")
    batch_and_z = 32 * 1 * 28 * 28 * 4 + 32 * 32 * 7 * 7 * 4  # HO-SFL keeps x and z to probe
    assert kept_by_hosfl == batch_and_z
    assert kept_by_sfl > 10 * batch_and_z  # every layer's activations, saved for backward
