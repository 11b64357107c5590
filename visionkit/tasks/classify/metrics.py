"""Classification metrics, the one implementation behind the training loop's validation, ``eval``, the report and
ensembles (``tasks.classify.evaluate.score`` feeds its probabilities through it). Top-k and loss are accumulated per
batch; the confusion matrix and per-class report come from torchmetrics over the collected predictions."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_confusion_matrix


class ClassificationMetrics:
    """Accumulates logits' top-k hits, loss and predictions over an evaluation pass."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.loss_sum = 0.0
        self.hits = {1: 0, 5: 0}
        self.n = 0
        self.preds: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.probs: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        logits, target = logits.float(), target.long()
        self.loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
        k = min(5, logits.shape[1])
        # top-1 by argmax (the first class on exact ties, as eval and the report decide); topk's order on ties is
        # not specified
        pred = logits.argmax(1)
        hit1 = pred == target
        self.hits[1] += hit1.sum().item()
        # a top-1 hit is a top-5 hit even when ties put other classes first in topk's order
        self.hits[5] += ((logits.topk(k, dim=1).indices == target[:, None]).any(1) | hit1).sum().item()
        self.n += target.numel()
        self.preds.append(pred.cpu())
        self.targets.append(target.cpu())
        self.probs.append(logits.softmax(1).max(1).values.cpu())

    def sync(self, d, lists: bool = False) -> None:
        """Combine the workers' passes (``d``: a ``Dist``): counts summed exactly, every worker then holds the totals;
        with ``lists`` also every worker's predictions (for the confusion matrix)."""
        from ...engine.distributed import all_sum, gather
        loss, h1, h5, n = all_sum(d, [self.loss_sum, self.hits[1], self.hits[5], self.n])
        self.loss_sum, self.hits, self.n = loss, {1: round(h1), 5: round(h5)}, round(n)
        if lists:
            for name, dtype in (("preds", torch.long), ("targets", torch.long), ("probs", torch.float)):
                mine = getattr(self, name)
                setattr(self, name, gather(d, torch.cat(mine) if mine else torch.empty(0, dtype=dtype)))

    def compute(self, full: bool = False) -> dict:
        """{"loss", "acc1", "acc5", "n"}; with ``full`` also the confusion matrix and per-class P/R/F1."""
        n = max(self.n, 1)
        out = {"loss": self.loss_sum / n, "acc1": self.hits[1] / n, "acc5": self.hits[5] / n, "n": self.n}
        if full:
            out.update(per_class_report(torch.cat(self.preds), torch.cat(self.targets), self.num_classes))
        return out


def per_class_report(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict:
    """Confusion matrix (rows = true class) and per-class precision / recall / F1 / support."""
    cm = multiclass_confusion_matrix(preds, targets, num_classes=num_classes).long()
    tp = cm.diag().double()
    support = cm.sum(1).double()
    predicted = cm.sum(0).double()
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp_min(1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12),
                     torch.zeros_like(tp))
    return {
        "confusion_matrix": cm.tolist(),
        "per_class": [{"precision": p, "recall": r, "f1": f, "support": int(s)}
                      for p, r, f, s in zip(precision.tolist(), recall.tolist(), f1.tolist(), support.tolist())],
        "macro_f1": f1[support > 0].mean().item() if (support > 0).any() else 0.0,
    }
