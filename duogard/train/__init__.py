"""Training: the Trainer, ``fit`` and its callbacks, checkpoints (the step itself and its update
strategies come from :mod:`duogard.step`).

The experiments' models (``build_model``) live here too.
"""

from duogard.step import UPDATE_STRATEGIES, choose_update
from duogard.train._callbacks import (
    Callback,
    Checkpointer,
    Diagnostics,
    Evaluate,
    FitRun,
    LambdaCallback,
    LogFile,
    OnNonFinite,
    Progress,
    TimeToTarget,
)
from duogard.train._distributed import DataParallel, DistributedError
from duogard.train._fit import fit
from duogard.train._memory import measure_step_memory
from duogard.train._models import MODELS, build_model
from duogard.train._result import FitResult, NonFiniteError, rss_bytes
from duogard.train._trainer import Trainer
from duogard.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointLockedError,
    CheckpointMismatchError,
    CheckpointWriteError,
    is_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

__all__ = [
    "fit",
    "Trainer",
    "FitResult",
    "NonFiniteError",
    "rss_bytes",
    "measure_step_memory",
    "UPDATE_STRATEGIES",
    "choose_update",
    "Callback",
    "FitRun",
    "Evaluate",
    "Diagnostics",
    "TimeToTarget",
    "LogFile",
    "Progress",
    "Checkpointer",
    "OnNonFinite",
    "LambdaCallback",
    "DataParallel",
    "DistributedError",
    "build_model",
    "MODELS",
    "Checkpoint",
    "CheckpointError",
    "CheckpointLockedError",
    "CheckpointMismatchError",
    "CheckpointWriteError",
    "save_checkpoint",
    "load_checkpoint",
    "is_checkpoint",
]
