"""Segmentation losses over ``{"out": logits, "aux": logits}`` and a ``[B, H, W]`` label map with an ignore index.

* ``ce``: pixel-wise cross-entropy (class weights, ignored pixels left out; the mean is weighted like PyTorch's).
* ``dice``: soft multiclass Dice loss (Milletari et al., "V-Net", 3DV 2016): ``1 - 2|P∩G| / (|P| + |G|)`` per class
  over the whole batch on softmax probabilities, averaged over the classes present in the batch's labels (as
  segmentation_models_pytorch does: an absent class has no Dice to learn; CE penalises predicting it).
* ``focal``: multiclass softmax focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017),
  ``-(1 - p_t)^gamma log p_t`` with gamma 2, class weights as alpha. Written here: torchvision's
  ``sigmoid_focal_loss`` is the binary one-vs-all form, not the softmax one over K exclusive classes.
* any sum of these: ``ce+dice``, ``focal+dice``.

The aux output (when present) gets the same loss, weighted by ``aux_weight`` (0.4, as torchvision's reference
training). Everything is computed in float32 with autocast off, whatever the model's precision.

Example::

    >>> import torch
    >>> loss_fn = build_seg_loss("ce+dice", num_classes=3)
    >>> loss, logs = loss_fn({"out": torch.randn(2, 3, 8, 8)}, torch.randint(0, 3, (2, 8, 8)))
    >>> sorted(logs)
    ['ce', 'dice']
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["SegLoss", "build_seg_loss"]

LOSSES = ("ce", "dice", "focal")
_EPS = 1e-12


class SegLoss:
    """A callable ``(outputs, target) -> (loss, logs)``; see the module docstring.

    ``outputs`` is a model's dict (``"out"``, optional ``"aux"``) or a logits tensor ``[B, K, h, w]`` (resized to the
    target's size when it differs); ``target`` a long ``[B, H, W]`` (or ``[B, 1, H, W]``) label map. ``logs`` holds
    each term of the main output and ``aux`` (the aux output's whole loss), detached, as means over the batch.
    """

    def __init__(self, terms: Sequence[str], num_classes: int, ignore_index: int = 255,
                 class_weights: Sequence[float] | torch.Tensor | None = None, aux_weight: float = 0.4,
                 gamma: float = 2.0) -> None:
        self.terms = tuple(terms)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.aux_weight = aux_weight
        self.gamma = gamma
        self.class_weights = None
        if class_weights is not None:
            w = torch.as_tensor(class_weights, dtype=torch.float32).flatten()
            if w.numel() != num_classes or (w < 0).any():
                raise ValueError(f"class_weights needs {num_classes} non-negative numbers (got {w.tolist()})")
            self.class_weights = w

    def __call__(self, outputs: dict[str, torch.Tensor] | torch.Tensor,
                 target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not isinstance(outputs, dict):
            outputs = {"out": outputs}
        if target.ndim == 4:
            target = target[:, 0]
        parts = self.terms_of(outputs["out"], target)
        loss = sum(parts.values())
        logs = {k: v.detach() for k, v in parts.items()}
        if outputs.get("aux") is not None and self.aux_weight:
            aux = sum(self.terms_of(outputs["aux"], target).values())
            loss = loss + self.aux_weight * aux
            logs["aux"] = aux.detach()
        return loss, logs

    def terms_of(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each loss term of one output, in float32."""
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()
            if logits.shape[-2:] != target.shape[-2:]:
                logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
            target = target.long()
            valid = target != self.ignore_index
            safe = torch.where(valid, target, 0)  # ignored pixels: any class, weighted 0 below
            w = None if self.class_weights is None else self.class_weights.to(logits.device)
            pix_w = valid.float() if w is None else w[safe] * valid
            out: dict[str, torch.Tensor] = {}
            for term in self.terms:
                if term == "ce":
                    nll = F.cross_entropy(logits, safe, reduction="none")
                    out["ce"] = (nll * pix_w).sum() / pix_w.sum().clamp_min(_EPS)
                elif term == "focal":
                    logpt = logits.log_softmax(1).gather(1, safe[:, None])[:, 0]
                    focal = -(1 - logpt.exp()).pow(self.gamma) * logpt
                    out["focal"] = (focal * pix_w).sum() / pix_w.sum().clamp_min(_EPS)
                elif term == "dice":
                    out["dice"] = self._dice(logits, safe, valid, w)
            return out

    def _dice(self, logits: torch.Tensor, safe: torch.Tensor, valid: torch.Tensor,
              w: torch.Tensor | None) -> torch.Tensor:
        mask = valid[:, None].float()
        probs = logits.softmax(1) * mask
        truth = F.one_hot(safe, self.num_classes).permute(0, 3, 1, 2).float() * mask
        dims = (0, 2, 3)
        inter = (probs * truth).sum(dims)
        card = probs.sum(dims) + truth.sum(dims)
        score = 2 * inter / card.clamp_min(_EPS)
        present = (truth.sum(dims) > 0).float() * (1.0 if w is None else w)
        return ((1 - score) * present).sum() / present.sum().clamp_min(_EPS)


def build_seg_loss(name: str, num_classes: int, ignore_index: int = 255,
                   class_weights: Sequence[float] | torch.Tensor | None = None, aux_weight: float = 0.4) -> SegLoss:
    """The loss ``name`` (``ce``, ``dice``, ``focal`` or a sum such as ``ce+dice``) as a :class:`SegLoss`.

    Example::

        >>> fn = build_seg_loss("ce", num_classes=2, class_weights=[1.0, 3.0])
        >>> fn(torch.zeros(1, 2, 4, 4), torch.full((1, 4, 4), 255))[0]  # every pixel ignored: 0, not NaN
        tensor(0.)
    """
    terms = [t.strip().lower() for t in name.split("+")]
    bad = [t for t in terms if t not in LOSSES]
    if bad or len(set(terms)) != len(terms):
        raise ValueError(f"unknown segmentation loss {name!r}; use ce, dice, focal or a sum such as ce+dice")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (got {num_classes})")
    return SegLoss(terms, num_classes, ignore_index, class_weights, aux_weight)
