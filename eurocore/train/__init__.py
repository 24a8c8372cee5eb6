"""Training: the run's configuration (a TOML file and the command line generated from
it), AdamW and its schedule, the ``Trainer`` and the command line
(``python -m eurocore.train``).

The names below are imported on first use (PEP 562), so that a light submodule
(``eurocore.train.plot``, ``eurocore.train.metrics``) loads without torch and the trainer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from eurocore.train.config import TrainConfig, load_config, to_toml
    from eurocore.train.optim import adamw, learning_rate
    from eurocore.train.trainer import Trainer, train

# name -> the submodule that defines it
_EXPORTS = {"TrainConfig": "config", "load_config": "config", "to_toml": "config",
            "adamw": "optim", "learning_rate": "optim", "Trainer": "trainer", "train": "trainer"}

__all__ = ["TrainConfig", "Trainer", "adamw", "learning_rate", "load_config", "to_toml",
           "train"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value
