"""COCO-style detection metrics: mAP@[.5:.95], mAP@.5, mAP@.75, by object size, recall, per class.

:class:`DetMetrics` is the task's one evaluator (the loop, ``eval``, the report and ensembles use it). It keeps each
image's detections and truths on the CPU and scores them with torchmetrics' ``MeanAveragePrecision`` over the
official ``pycocotools`` COCOeval, so the numbers are COCO's own (101-point interpolated AP, IoU thresholds
0.50:0.05:0.95, areas small < 32² <= medium < 96² <= large, up to 100 detections per image). Objects marked
``difficult`` (VOC) or crowd (COCO) are passed as ``iscrowd``: a detection on them is neither a hit nor a false
positive, as both benchmarks score them.

Workers gather their images' records (:meth:`DetMetrics.sync`) and every worker then scores the whole split, so a
distributed evaluation gives a single process's numbers.

Example::

    >>> m = DetMetrics(num_classes=1)
    >>> box = torch.tensor([[10., 10., 50., 50.]])
    >>> m.update([{"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}],
    ...          [{"boxes": box, "labels": torch.tensor([0])}])
    >>> m.compute()["map50"]
    1.0
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["DetMetrics", "image_hits"]

_SCALARS = {"map": "map", "map50": "map_50", "map75": "map_75", "map_small": "map_small",
            "map_medium": "map_medium", "map_large": "map_large", "mar100": "mar_100"}


def _cpu(d: dict, keys: Sequence[str]) -> dict:
    return {k: d[k].detach().float().cpu() if k in ("boxes", "scores") else d[k].detach().cpu()
            for k in keys if k in d}


class DetMetrics:
    """Accumulates per-image detections and truths over an evaluation pass; ``compute`` scores them with COCOeval."""

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None) -> None:
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for {num_classes} classes")
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
        self.preds: list[dict] = []
        self.truths: list[dict] = []

    @torch.no_grad()
    def update(self, outputs: list[dict], targets: list[dict]) -> None:
        """Add a batch: ``outputs`` a list of ``{"boxes" xyxy, "scores", "labels"}`` and ``targets`` a list of
        ``{"boxes" xyxy, "labels"[, "difficult"]}``, in the same pixel frame."""
        if len(outputs) != len(targets):
            raise ValueError(f"{len(outputs)} predictions for {len(targets)} images")
        for p, t in zip(outputs, targets):
            labels = t["labels"]
            if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise ValueError(f"target labels outside 0..{self.num_classes - 1}: {labels.tolist()[:5]}")
            self.preds.append(_cpu(p, ("boxes", "scores", "labels")))
            self.truths.append(_cpu(t, ("boxes", "labels", "difficult")))

    @property
    def n(self) -> int:
        return len(self.truths)

    def sync(self, d, lists: bool = False) -> None:
        """Every worker's images on every worker (``d``: a ``Dist``); mAP is not a sum, so the records travel."""
        from ...engine.distributed import gather

        parts = gather(d, (self.preds, self.truths))
        self.preds = [p for ps, _ in parts for p in ps]
        self.truths = [t for _, ts in parts for t in ts]

    def _score(self, class_metrics: bool, iou_thresholds: list[float] | None = None) -> dict:
        from torchmetrics.detection import MeanAveragePrecision

        m = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=class_metrics,
                                 iou_thresholds=iou_thresholds, backend="pycocotools")
        truths = [{"boxes": t["boxes"], "labels": t["labels"],
                   "iscrowd": t.get("difficult", torch.zeros(len(t["labels"]), dtype=torch.bool)).long()}
                  for t in self.truths]
        m.update(self.preds, truths)
        return m.compute()

    def compute(self, full: bool = False) -> dict:
        """``{"map", "map50", "map75", "map_small", "map_medium", "map_large", "mar100", "n"}`` (``n``: images;
        a size bucket without any object is ``None``); with ``full`` also ``per_class`` (``class``, ``ap``,
        ``ap50``, ``ar100``, ``support`` = objects, ``detections``)."""
        out: dict = {"n": self.n}
        if not self.truths:
            return {**dict.fromkeys(_SCALARS, 0.0), **out}
        res = self._score(class_metrics=full)
        for name, key in _SCALARS.items():
            v = float(res[key])
            out[name] = None if v < 0 and name.startswith("map_") else max(v, 0.0)
        if full:
            names = self.class_names or [str(i) for i in range(self.num_classes)]
            support = torch.zeros(self.num_classes, dtype=torch.long)
            dets = torch.zeros(self.num_classes, dtype=torch.long)
            for t in self.truths:
                support += torch.bincount(t["labels"].long(), minlength=self.num_classes)
            for p in self.preds:
                dets += torch.bincount(p["labels"].long(), minlength=self.num_classes)
            at50 = self._score(class_metrics=True, iou_thresholds=[0.5])
            ap = _per_class(res, "map_per_class", self.num_classes)
            ap50 = _per_class(at50, "map_per_class", self.num_classes)
            ar = _per_class(res, "mar_100_per_class", self.num_classes)
            out["per_class"] = [{"class": names[i], "ap": ap[i], "ap50": ap50[i], "ar100": ar[i],
                                 "support": int(support[i]), "detections": int(dets[i])}
                                for i in range(self.num_classes)]
        return out


def _per_class(res: dict, key: str, k: int) -> list[float | None]:
    """A per-class tensor of torchmetrics' result as a list over all ``k`` classes (``None``: class never seen)."""
    vals: list[float | None] = [None] * k
    ids = res.get("classes")
    v = res.get(key)
    if ids is None or v is None:
        return vals
    ids, v = ids.reshape(-1).tolist(), v.reshape(-1).tolist()
    for i, x in zip(ids, v):
        if 0 <= int(i) < k:
            vals[int(i)] = None if x < 0 else float(x)
    return vals


def image_hits(pred: dict, truth: dict, score_thresh: float = 0.3, iou_thresh: float = 0.5) -> dict:
    """One image at a glance (the report's best / worst gallery): greedy matching of detections above
    ``score_thresh`` to truths of the same class at IoU >= ``iou_thresh``; ``{"tp", "fp", "fn", "f1"}``.

    Example::

        >>> b = torch.tensor([[0., 0., 10., 10.]])
        >>> image_hits({"boxes": b, "scores": torch.tensor([.9]), "labels": torch.tensor([1])},
        ...            {"boxes": b, "labels": torch.tensor([1])})["f1"]
        1.0
    """
    from torchvision.ops import box_iou

    keep = pred["scores"] >= score_thresh
    pb, pl = pred["boxes"][keep], pred["labels"][keep]
    order = pred["scores"][keep].argsort(descending=True)
    pb, pl = pb[order], pl[order]
    tb, tl = truth["boxes"], truth["labels"]
    used = torch.zeros(len(tb), dtype=torch.bool)
    tp = 0
    if len(pb) and len(tb):
        iou = box_iou(pb.float(), tb.float())
        iou[pl[:, None] != tl[None, :]] = 0
        for i in range(len(pb)):
            row = iou[i].masked_fill(used, 0)
            j = int(row.argmax())
            if row[j] >= iou_thresh:
                used[j] = True
                tp += 1
    fp, fn = len(pb) - tp, len(tb) - tp
    f1 = 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
    return {"tp": tp, "fp": fp, "fn": fn, "f1": f1}
