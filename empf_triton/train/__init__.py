"""Online training of EM-PF networks (docs/model.md §6).

- `strategies`: `train_batch` / `train_epoch` for "online", "random_step", "accumulate" and
  "bptt"; `evaluate` (accuracy of the logits summed over T, anytime accuracy per step);
  `iterate_batches` (in-memory batching, DDP sharding).
- `checkpoint`: atomic `save_checkpoint`, safe `load_checkpoint` (`weights_only`, SHA-256
  checked), exact resume (model, optimizer, scheduler, RNG, epoch).
- `loop`: `TrainConfig` and `run_training`, the run behind `empf train`.
- `ddp`: torchrun / DistributedDataParallel helpers.
- `memory`: `SavedTensorMeter`, the bytes autograd keeps for backward.
"""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .loop import TrainConfig, TrainingDivergedError, run_training
from .memory import SavedTensorMeter
from .strategies import (
    STRATEGIES,
    evaluate,
    iterate_batches,
    set_grad_mode,
    set_step_mode,
    train_batch,
    train_epoch,
)

__all__ = [
    "STRATEGIES",
    "CheckpointError",
    "SavedTensorMeter",
    "TrainConfig",
    "TrainingDivergedError",
    "evaluate",
    "iterate_batches",
    "load_checkpoint",
    "run_training",
    "save_checkpoint",
    "set_grad_mode",
    "set_step_mode",
    "train_batch",
    "train_epoch",
]
