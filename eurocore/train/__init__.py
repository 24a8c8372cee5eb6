"""Training: synthetic data with a known loss floor, AdamW and its schedule, the loop and
the command line (``python -m eurocore.train``)."""

from eurocore.train.data import Batch, MarkovSource
from eurocore.train.optim import adamw, learning_rate
from eurocore.train.trainer import TrainConfig, train

__all__ = ["Batch", "MarkovSource", "TrainConfig", "adamw", "learning_rate", "train"]
