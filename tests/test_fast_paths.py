"""The simulation's fast paths give the bits of the plain ones: the CNN's pooling, and the
directions that in-process clients share within a step."""

import torch
from torch import nn

from hosfl.tasks.fmnist_cnn import MaxPool2d


def test_the_cnns_pooling_gives_the_librarys_values_and_gradients_ties_and_nan_included():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (4, 3, 8, 6), generator=g).float()  # many tied windows
    x[0, 0, 0, 0] = float("nan")
    x[1, 1] = 0.0  # a whole map of ties, as after a ReLU
    ours, theirs = MaxPool2d(), nn.MaxPool2d(2)
    with torch.no_grad():
        for part in (x, x[:, :, :7]):  # odd sizes go the library's way
            torch.testing.assert_close(ours(part), theirs(part), rtol=0, atol=0, equal_nan=True)
    weights = torch.randn(4, 3, 4, 3, generator=g)
    grads = []
    for pool in (ours, theirs):
        leaf = x.nan_to_num().requires_grad_(True)
        (pool(leaf) * weights).sum().backward()
        grads.append(leaf.grad)
    assert torch.equal(*grads)
