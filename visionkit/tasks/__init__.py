"""Tasks plug into the engine: one folder per task with the same file names (see ``base.py``).

The engine knows no task vocabulary; ``visionkit.api`` dispatches on ``cfg.task`` through ``get_task``.
"""
from .base import TASKS, Setup, Task, get_task, infer_task, monitor_for, task_name
from .classify.task import ClassificationTask

__all__ = ["TASKS", "ClassificationTask", "Setup", "Task", "get_task", "infer_task", "monitor_for", "task_name"]
