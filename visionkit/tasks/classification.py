"""Image classification: cross-entropy (with label smoothing, class weights and soft MixUp/CutMix targets)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..metrics import ClassificationMetrics


class ClassificationTask:
    """Forward + loss for the training loop, and a metric accumulator for evaluation.

    Example::

        task = ClassificationTask(num_classes=10, label_smoothing=0.1)
        out = task.training_step(model, x, y)   # {"loss", "n", "correct"}
    """

    name = "classification"

    def __init__(self, num_classes: int, label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None):
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.class_weights = class_weights

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        w = self.class_weights.to(logits.device) if self.class_weights is not None else None
        # soft targets (MixUp/CutMix) are already smoothed by the mixing; hard targets get label smoothing here
        ls = self.label_smoothing if target.dtype == torch.long else 0.0
        return F.cross_entropy(logits.float(), target, weight=w, label_smoothing=ls)

    def training_step(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> dict:
        logits = model(x)
        loss = self.loss(logits, target)
        hard = target if target.dtype == torch.long else target.argmax(1)
        correct = (logits.detach().argmax(1) == hard).sum()
        return {"loss": loss, "n": x.shape[0], "correct": correct}

    @torch.no_grad()
    def predict(self, model: nn.Module, x: torch.Tensor, tta: bool = False) -> torch.Tensor:
        """Logits (float32); with ``tta``, the mean of the softmax over the image and its mirror, as log-probs."""
        logits = model(x).float()
        if tta:
            p = (logits.softmax(1) + model(x.flip(3)).float().softmax(1)) / 2
            logits = p.clamp_min(1e-12).log()
        return logits

    def new_metrics(self) -> ClassificationMetrics:
        return ClassificationMetrics(self.num_classes)
