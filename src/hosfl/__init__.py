"""hosfl: Hybrid-Order Split Federated Learning (Chen et al., arXiv 2603.14773).

    >>> import hosfl
    >>> result = hosfl.run(hosfl.Config(steps=300, out="runs/a"))   # doctest: +SKIP
    >>> result.metric, result.metric_name, result.out                 # doctest: +SKIP

The few names a user needs; everything else lives in the submodules.
"""

from hosfl.callbacks import Callback, RunInfo, StopAt
from hosfl.compare import compare
from hosfl.config import Config, ConfigError
from hosfl.data.text import next_token_accuracy, next_token_loss, text_data
from hosfl.export import export, load
from hosfl.methods import Method
from hosfl.methods import register as register_method
from hosfl.runner import RunResult, resume, run
from hosfl.tasks import ModelTask, Task, register_task

__all__ = [
    "Callback",
    "Config",
    "ConfigError",
    "Method",
    "ModelTask",
    "RunInfo",
    "RunResult",
    "StopAt",
    "Task",
    "compare",
    "export",
    "load",
    "next_token_accuracy",
    "next_token_loss",
    "register_method",
    "register_task",
    "resume",
    "run",
    "text_data",
]
