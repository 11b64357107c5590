"""Image classification: one label per image. What the API calls of a task package:

``setup`` (task.py), ``looks_like`` (the data layout), ``summary_metrics`` (what summary.json's ``test`` holds),
``evaluate_checkpoints`` (eval, ensembles, TTA), ``Predictor`` (predict.py) and ``report`` (the HTML report).
"""
from __future__ import annotations

from ... import report as _report
from .evaluate import evaluate_checkpoints
from .predict import Predictor
from .task import ClassificationTask, setup

__all__ = ["ClassificationTask", "Predictor", "evaluate_checkpoints", "looks_like", "report", "setup",
           "summary_metrics"]


def looks_like(source: str) -> bool:
    """Anything that is not another task's layout is classification data (its builder says what is wrong)."""
    return True


def report(*args, **kw):
    """The classification report (``visionkit.report.build_report``, looked up at call time)."""
    return _report.build_report(*args, **kw)


def summary_metrics(res: dict) -> dict:
    """summary.json's ``test``: top-1, top-5, loss and count."""
    return {k: res[k] for k in ("acc1", "acc5", "loss", "n")}
