"""Training: the run's configuration (a TOML file and the command line generated from
it), AdamW and its schedule, the ``Trainer`` and the command line
(``python -m eurocore.train``)."""

from eurocore.train.config import TrainConfig, load_config, to_toml
from eurocore.train.optim import adamw, learning_rate
from eurocore.train.trainer import Trainer, train

__all__ = ["TrainConfig", "Trainer", "adamw", "learning_rate", "load_config", "to_toml",
           "train"]
