"""Semantic segmentation metrics from one confusion matrix: mIoU, pixel accuracy, mean accuracy, Dice, FWIoU.

:class:`SegMetrics` accumulates a ``K x K`` int64 confusion matrix (rows = true class, columns = predicted) on the
device, the cross-entropy sum over valid pixels and the image count. Workers combine them exactly (integer counts
summed as float64, exact below 2**53) with :meth:`SegMetrics.sync`, so a distributed evaluation gives the same
numbers as a single process.

Definitions (Long et al. 2015, section 5; the same as mmsegmentation and torchmetrics' ``JaccardIndex``):
``IoU_c = TP / (TP + FP + FN)``, ``acc_c = TP / (TP + FN)`` (recall), ``Dice_c = 2 TP / (2 TP + FP + FN)``,
pixel accuracy ``sum TP / sum``, FWIoU ``sum_c freq_c IoU_c`` with ``freq_c`` the class's share of the valid pixels.
A class absent from both truth and prediction has no IoU or Dice and is left out of their means (as torchmetrics'
macro average and mmseg's nanmean do); a class with no true pixel has no accuracy and is left out of ``mean_acc``.
Such values are ``None`` in the per-class report. Pixels labelled ``ignore_index`` count nowhere.

Example::

    >>> m = SegMetrics(num_classes=2)
    >>> m.update(torch.tensor([[[[2., 0.], [0., 0.]], [[0., 1.], [1., 1.]]]]), torch.tensor([[[0, 1], [0, 255]]]))
    >>> {k: round(v, 4) for k, v in m.compute().items() if k in ("miou", "pixel_acc")}
    {'miou': 0.5, 'pixel_acc': 0.6667}
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["SegMetrics"]


class SegMetrics:
    """Accumulates a confusion matrix, the CE loss and the image count over an evaluation pass."""

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: Sequence[str] | None = None) -> None:
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for {num_classes} classes")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else None
        self.cm: torch.Tensor | None = None  # int64 [K, K], on the device of the first update
        self.loss_sum: torch.Tensor | float = 0.0  # a float64 tensor on the device (no sync per batch)
        self.n = 0  # images

    @torch.no_grad()
    def update(self, outputs: torch.Tensor | dict[str, torch.Tensor], target: torch.Tensor) -> None:
        """Add a batch: logits ``[B, K, h, w]`` (or a model's ``{"out": ...}``; resized to the target's size when
        it differs) and labels ``[B, H, W]`` (or ``[B, 1, H, W]``). A label outside ``0..K-1`` that is not the
        ignore index is an error (it would count as some class otherwise)."""
        logits = outputs["out"] if isinstance(outputs, dict) else outputs
        if target.ndim == 4:
            target = target[:, 0]
        logits, target = logits.float(), target.long()
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        k = self.num_classes
        if logits.shape[1] != k:
            raise ValueError(f"logits have {logits.shape[1]} classes, the metrics {k}")
        valid = target != self.ignore_index
        bad = valid & ((target < 0) | (target >= k))
        if bad.any():
            raise ValueError(f"labels {sorted(set(target[bad].unique().tolist()))[:5]} are outside 0..{k - 1} "
                             f"and not the ignore index {self.ignore_index}")
        pred = logits.argmax(1)
        cm = torch.bincount(target[valid] * k + pred[valid], minlength=k * k).reshape(k, k)
        self.cm = cm if self.cm is None else self.cm + cm.to(self.cm.device)
        ce = F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="sum").double()
        self.loss_sum = self.loss_sum + ce
        self.n += target.shape[0]

    def _cm(self) -> torch.Tensor:
        return self.cm if self.cm is not None else torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)

    def sync(self, d, lists: bool = False) -> None:
        """Sum the workers' confusion matrices, losses and counts exactly (``d``: a ``Dist``); every worker then
        holds the totals. ``lists`` is accepted for the evaluator interface; there is nothing per-image to gather."""
        from ...engine.distributed import all_sum

        cm = self._cm()
        values = all_sum(d, [*cm.flatten().tolist(), float(self.loss_sum), self.n])
        k2 = self.num_classes ** 2
        self.cm = torch.tensor([round(v) for v in values[:k2]], dtype=torch.long, device=cm.device).reshape(cm.shape)
        self.loss_sum, self.n = values[k2], round(values[k2 + 1])

    def compute(self, full: bool = False) -> dict:
        """``{"loss", "miou", "pixel_acc", "mean_acc", "dice", "fwiou", "n"}`` (``loss``: mean CE per valid pixel,
        ``n``: images); with ``full`` also ``per_class`` (``class``, ``iou``, ``acc``, ``dice``, ``support`` = true
        pixels) and ``confusion_matrix`` (rows = truth)."""
        cm = self._cm().cpu()
        c = cm.double()
        tp, truth, predicted = c.diag(), c.sum(1), c.sum(0)
        total = c.sum()
        union = truth + predicted - tp
        seen, has_truth = union > 0, truth > 0
        iou = tp / union.clamp_min(1)
        acc = tp / truth.clamp_min(1)
        dice = 2 * tp / (truth + predicted).clamp_min(1)

        def mean(x: torch.Tensor, keep: torch.Tensor) -> float:
            return x[keep].mean().item() if keep.any() else 0.0

        out = {"loss": float(self.loss_sum) / max(total.item(), 1), "miou": mean(iou, seen),
               "pixel_acc": (tp.sum() / total).item() if total > 0 else 0.0, "mean_acc": mean(acc, has_truth),
               "dice": mean(dice, seen), "fwiou": ((truth / total) * iou).sum().item() if total > 0 else 0.0,
               "n": self.n}
        if full:
            names = self.class_names or list(range(self.num_classes))
            out["per_class"] = [{"class": name, "iou": iou[i].item() if seen[i] else None,
                                 "acc": acc[i].item() if has_truth[i] else None,
                                 "dice": dice[i].item() if seen[i] else None, "support": int(truth[i].item())}
                                for i, name in enumerate(names)]
            out["confusion_matrix"] = cm.tolist()
        return out
