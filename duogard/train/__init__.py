"""Training loop, metrics, checkpoints, and the models of the experiments."""

from duogard.train._loop import FitResult, NonFiniteError, Trainer, fit, rss_bytes
from duogard.train._compare import DEFAULT_METHODS, MethodSpec, compare, parse_method
from duogard.train._models import MODELS, build_model
from duogard.train.checkpoint import (
    Checkpoint, CheckpointMismatchError, is_checkpoint, load_checkpoint, save_checkpoint,
)

__all__ = ["compare", "parse_method", "MethodSpec", "DEFAULT_METHODS", "fit", "Trainer", "FitResult", "NonFiniteError", "rss_bytes", "build_model", "MODELS",
           "Checkpoint", "CheckpointMismatchError", "save_checkpoint", "load_checkpoint", "is_checkpoint"]
