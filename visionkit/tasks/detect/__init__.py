"""Object detection: boxes around every object, each with a class and a score. What the API calls of a task package:

``setup`` (task.py), ``looks_like`` (the data layout), ``summary_metrics`` (what summary.json's ``test`` holds),
``evaluate_checkpoints`` (eval), ``Predictor`` (predict.py) and ``report`` (report.py).

The contract between this package's files: a loader yields ``(x, targets)``, ``x`` float32 ``[B, 3, S, S]`` in
[0, 1] (detectors normalise inside, as torchvision's do) and ``targets`` a list of ``{"boxes" xyxy pixels of the
S x S input, "labels" 0..K-1, "difficult", "orig_size"}``; a detector returns its named losses in train mode and
``[{"boxes", "scores", "labels"}]`` per image in eval mode. Model, data and metric code is imported when a
detection run needs it, not by ``visionkit.tasks``.
"""
from __future__ import annotations


def looks_like(source: str) -> bool:
    """Is ``source`` a detection data set (``det-shapes``, COCO JSON, Pascal VOC XML, YOLO txt, a box CSV)?"""
    from .data import is_detection_source
    return is_detection_source(source)


def setup(*args, **kw):
    from .task import setup as _setup
    return _setup(*args, **kw)


def summary_metrics(res: dict) -> dict:
    """summary.json's ``test``: map, map50, map75, by size, mar100, n and per_class."""
    return dict(res)


def evaluate_checkpoints(*args, **kw) -> dict:
    from .predict import evaluate_checkpoints as _eval
    return _eval(*args, **kw)


def Predictor(*args, **kw):  # the task's predictor class, constructed like one
    from .predict import DetPredictor
    return DetPredictor(*args, **kw)


def report(*args, **kw):
    from .report import build_report
    return build_report(*args, **kw)
