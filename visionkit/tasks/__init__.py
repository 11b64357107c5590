"""Tasks plug into the engine: each supplies forward + loss for a batch and the metrics for evaluation.

The loop knows nothing about labels; it hands a batch ``(x, target)`` to the task. Detection and segmentation will
add their own Task classes with the same three methods.
"""
from .classification import ClassificationTask

__all__ = ["ClassificationTask"]
