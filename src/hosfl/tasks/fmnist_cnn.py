"""Fashion-MNIST with small CNNs trained from scratch.

``fmnist-cnn`` (the embedded default), one convolution per stage:
    conv1: 1→16 3×3, ReLU, max-pool   (16×14×14)
    conv2: 16→32 3×3, ReLU, max-pool  (32×7×7)   <- default cut: d_c = 4 800
    fc1:   1568→128, ReLU
    head:  128→10

``fmnist-cnn-wide``: conv2 16→72 (72×7×7), d_c = 10 600 at the default cut. The comparison
task: a client part large enough that weights (SplitFed) cost 1000× HO-SFL's seeds and
scalars, and wide activations that a backprop client must keep. (Deeper two-convolution
clients of the same size were tried: the zeroth-order client then trails SplitFed by ~3 points
at 1500 steps.)
"""

from __future__ import annotations

from collections import OrderedDict
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from hosfl.data import fashion_mnist
from hosfl.tasks.base import Task


class MaxPool2d(nn.MaxPool2d):
    """2×2 max-pooling that gives ``nn.MaxPool2d(2)``'s values and gradients faster on a CPU,
    where pooling a contiguous NCHW map took about a third of this CNN's forward for every
    method (`benchmarks/speed.py`). Without autograd (HO-SFL's clients, evaluation) the
    elementwise maximum of the four strided views of each window: 7-10× faster, and exact (a
    maximum rounds nothing). With autograd, in channels-last memory: about 3× faster, and the
    same gradient (all of it to one element of a tied window, as the library's pooling); the
    backward keeps only the winners' indices, as the library's does, not the channels-last copy
    (a backprop client's peak: 7.2 MiB with it, 5.3 without, on the default task)."""

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() != 4 or x.shape[-1] % 2 or x.shape[-2] % 2:
            return super().forward(x)
        if torch.is_grad_enabled() and x.requires_grad:
            return _ChannelsLastPool.apply(x)
        n, c, h, w = x.shape
        y = x.view(n, c, h // 2, 2, w // 2, 2)
        top = torch.maximum(y[:, :, :, 0, :, 0], y[:, :, :, 0, :, 1])
        return torch.maximum(top, torch.maximum(y[:, :, :, 1, :, 0], y[:, :, :, 1, :, 1]))


class _ChannelsLastPool(torch.autograd.Function):
    """2×2 max-pooling of an NCHW map read in channels-last memory; its backward scatters the
    gradient to the saved indices of the maxima (windows do not overlap: one value each)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out, index = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), 2,
                                  return_indices=True)  # fmt: skip
        ctx.save_for_backward(index)
        ctx.shape = x.shape
        return out.contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (index,) = ctx.saved_tensors
        n, c, h, w = ctx.shape
        rows = index.reshape(n, c, -1)
        into = grad.new_zeros(n, c, h * w)
        return into.scatter_(2, rows, grad.reshape(n, c, -1)).view(n, c, h, w)


def _conv(c_in: int, c_out: int) -> list[nn.Module]:
    # In-place ReLU: an edge client keeps one activation map per layer, not two.
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True)]


class FashionMnistCNN(Task):
    name = "fmnist-cnn"
    classes = 10
    cuts = ("conv1", "conv2", "fc1")
    stages = ((1, 16), (16, 32))  # channels through each stage: one conv per step

    def load(self, split: str, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return fashion_mnist.load(split, limit)

    def build(self, seed: int) -> nn.Sequential:
        def stage(channels: tuple[int, ...]) -> nn.Sequential:
            layers = [m for a, b in pairwise(channels) for m in _conv(a, b)]
            return nn.Sequential(*layers, MaxPool2d())

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            width = self.stages[-1][-1]
            return nn.Sequential(
                OrderedDict(
                    conv1=stage(self.stages[0]),
                    conv2=stage(self.stages[1]),
                    fc1=nn.Sequential(
                        nn.Flatten(), nn.Linear(width * 7 * 7, 128), nn.ReLU(inplace=True)
                    ),
                    head=nn.Linear(128, self.classes),
                )
            )


class FashionMnistCNNWide(FashionMnistCNN):
    name = "fmnist-cnn-wide"
    stages = ((1, 16), (16, 72))
