"""The defects the library's contracts let through (issue 24), each with the check that
failed before its fix: probes of parameters used outside their module, a probe that raises,
engines left open, a client that lies, dropout, settings a method ignores, data mistakes."""

import pytest
import torch
import torch.nn.functional as F
from test_library import autompg, r2
from torch import nn

import hosfl
from hosfl import zo


class Functional(nn.Module):
    """A user's layer that reads its weight outside ``lin``'s own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(7, 16)

    def forward(self, x):
        return torch.tanh(F.linear(x, self.lin.weight, self.lin.bias))


def test_a_probe_that_raises_leaves_theta_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    before = [p.detach().clone() for p in model.parameters()]
    model[2].register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"), zo.perturbed(model, 3, 0.1, "rademacher"):
        model(torch.randn(2, 4))
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)


def test_parameters_read_outside_their_module_are_found_by_name():
    model = nn.Sequential(Functional(), nn.Linear(16, 2))
    assert zo.unperturbable(model, torch.randn(3, 7)) == ["0.lin.weight", "0.lin.bias"]
    # what the probe would have seen: no change at all from them
    with torch.no_grad(), zo.perturbed(model[0], 5, 1e-2, "rademacher"):
        moved = model[0](torch.ones(1, 7))
    assert torch.equal(moved, model[0](torch.ones(1, 7)).detach())
    assert zo.unperturbable(nn.Sequential(nn.Linear(7, 16), nn.Linear(16, 2)),
                            torch.randn(3, 7)) == []  # fmt: skip


@pytest.mark.parametrize("method", ["hosfl", "zo-fl"])
def test_a_run_whose_probes_cannot_reach_a_parameter_is_refused_before_its_folder(
    method, tmp_path
):
    task = autompg()
    torch.manual_seed(0)
    task = hosfl.ModelTask(
        client=Functional(), server=nn.Sequential(nn.Linear(16, 1), nn.Flatten(0)),
        train=task.load("train"), test=task.load("test"), loss=F.mse_loss, metric=r2,
        name="functional",
    )  # fmt: skip
    hosfl.register_task(task)
    cfg = hosfl.Config(task="functional", method=method, clients=2, sampled=1, steps=2,
                       batch_size=8, progress=False, out=str(tmp_path / "run"))  # fmt: skip
    with pytest.raises(hosfl.config.ConfigError, match=r"lin\.weight, .*lin\.bias"):
        hosfl.run(cfg, log=lambda *a: None)
    assert not (tmp_path / "run").exists()
