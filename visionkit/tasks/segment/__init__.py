"""Semantic segmentation: a class for every pixel. What the API calls of a task package:

``setup`` (task.py), ``looks_like`` (the data layout), ``summary_metrics`` (what summary.json's ``test`` holds),
``evaluate_checkpoints`` (eval), ``Predictor`` (predict.py) and ``report`` (report.py).
Model, data and metric code is imported when a segmentation run needs it, not by ``visionkit.tasks``.
"""
from __future__ import annotations


def looks_like(source: str) -> bool:
    """Is ``source`` a segmentation data set (``seg-shapes``, images + masks folders, VOC, an image,mask CSV)?"""
    from .data import is_segmentation_source
    return is_segmentation_source(source)


def setup(*args, **kw):
    from .task import setup as _setup
    return _setup(*args, **kw)


def summary_metrics(res: dict) -> dict:
    """summary.json's ``test``: the scalars (miou, pixel_acc, mean_acc, dice, fwiou, loss, n) and per_class."""
    return {k: v for k, v in res.items() if k != "confusion_matrix"}


def evaluate_checkpoints(*args, **kw) -> dict:
    from .predict import evaluate_checkpoints as _eval
    return _eval(*args, **kw)


def Predictor(*args, **kw):  # the task's predictor class, constructed like one
    from .predict import SegPredictor
    return SegPredictor(*args, **kw)


def report(*args, **kw):
    from .report import build_report
    return build_report(*args, **kw)
