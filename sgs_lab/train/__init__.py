"""Training: the fit loop, per-step records, checkpoints, device and precision handling."""

from .fit import CHECKPOINT, RunResult, TrainConfig, evaluate, fit, resolve_device, task_losses
from .metrics import delta_m
from .recorder import SAMPLE_COLUMNS, STEP_COLUMNS, MemorySink

__all__ = [
    "CHECKPOINT",
    "SAMPLE_COLUMNS",
    "STEP_COLUMNS",
    "MemorySink",
    "RunResult",
    "TrainConfig",
    "delta_m",
    "evaluate",
    "fit",
    "resolve_device",
    "task_losses",
]
