"""The engine: a task-agnostic training loop, its events, checkpoints, optimizers and schedules."""
from .checkpoint import CheckpointError, atomic_save, load_checkpoint
from .events import Callback
from .loop import State, Trainer, evaluate
from .optim import build_optimizer, build_scheduler

__all__ = ["Callback", "CheckpointError", "State", "Trainer", "atomic_save", "build_optimizer", "build_scheduler",
           "evaluate", "load_checkpoint"]
