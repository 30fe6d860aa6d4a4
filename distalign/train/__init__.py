"""One engine for every method: ``load_config`` then ``train``."""

from distalign.train.config import OptimConfig, RunConfig, TrainConfig, load_config
from distalign.train.engine import Callback, Trainer, train

__all__ = ["Callback", "OptimConfig", "RunConfig", "TrainConfig", "Trainer", "load_config", "train"]
