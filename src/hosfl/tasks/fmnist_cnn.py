"""Fashion-MNIST with a small CNN trained from scratch: the embedded default task.

conv1: 1→16 3×3, ReLU, max-pool  (16×14×14)
conv2: 16→32 3×3, ReLU, max-pool (32×7×7)   <- default cut: the client holds the conv block
fc1:   1568→128, ReLU
head:  128→10
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from hosfl.data import fashion_mnist
from hosfl.tasks.base import Task


class FashionMnistCNN(Task):
    name = "fmnist-cnn"
    classes = 10
    cuts = ("conv1", "conv2", "fc1")

    def load(self, split: str, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return fashion_mnist.load(split, limit)

    def build(self, seed: int) -> nn.Sequential:
        def conv(c_in: int, c_out: int) -> list[nn.Module]:
            # In-place ReLU: an edge client keeps one activation map per layer, not two.
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True)]

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return nn.Sequential(
                OrderedDict(
                    conv1=nn.Sequential(*conv(1, 16), nn.MaxPool2d(2)),
                    conv2=nn.Sequential(*conv(16, 32), nn.MaxPool2d(2)),
                    fc1=nn.Sequential(
                        nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(inplace=True)
                    ),
                    head=nn.Linear(128, self.classes),
                )
            )
