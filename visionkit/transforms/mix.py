"""Batch-level MixUp / CutMix over torchvision.transforms.v2.

Example::

    mix = build_batch_mix(AugConfig(mixup=0.2, cutmix=1.0), num_classes=10)
    x, y_soft = mix(x, y)  # y: int64 [B] -> y_soft: float [B, 10], rows sum to 1
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from visionkit.config import AugConfig


class BatchMix:
    """Mix a batch with probability ``prob`` (MixUp, CutMix or a random choice); always return soft targets.

    Randomness (whether to mix, which of the two, lambda, the CutMix box) comes from the global torch RNG, as in
    torchvision's v2 MixUp/CutMix; the engine saves and restores the global RNG state in checkpoints, so resumed runs
    still reproduce it.
    """

    def __init__(self, mix: Callable, num_classes: int, prob: float) -> None:
        self.mix, self.num_classes, self.prob = mix, num_classes, prob

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: float [B, C, H, W]; y: int64 [B] -> (mixed x, float targets [B, num_classes])."""
        if self.prob < 1.0 and float(torch.rand(())) >= self.prob:
            return x, F.one_hot(y, self.num_classes).to(x.dtype if x.is_floating_point() else torch.float32)
        return self.mix(x, y)

    def __repr__(self) -> str:
        return f"BatchMix({self.mix!r}, num_classes={self.num_classes}, prob={self.prob})"


def build_batch_mix(aug: AugConfig, num_classes: int) -> Callable[[torch.Tensor, torch.Tensor],
                                                                   tuple[torch.Tensor, torch.Tensor]] | None:
    """MixUp (``aug.mixup`` alpha) and/or CutMix (``aug.cutmix`` alpha) as one callable; None when both are 0.

    With both on, CutMix is picked with probability ``aug.switch_prob``; a batch is mixed at all with probability
    ``aug.mix_prob``. Uses the global torch RNG (see ``BatchMix``).

    Example::

        mix = build_batch_mix(AugConfig(cutmix=1.0), num_classes=5)
        x, y = mix(torch.rand(8, 3, 32, 32), torch.randint(0, 5, (8,)))  # y: [8, 5]
    """
    if aug.mixup < 0 or aug.cutmix < 0:
        raise ValueError(f"aug.mixup and aug.cutmix must be >= 0, got {aug.mixup} and {aug.cutmix}")
    if aug.mixup == 0 and aug.cutmix == 0:
        return None
    if not 0 <= aug.mix_prob <= 1 or not 0 <= aug.switch_prob <= 1:
        raise ValueError("aug.mix_prob and aug.switch_prob must be in [0, 1]")
    mixup = v2.MixUp(alpha=aug.mixup, num_classes=num_classes) if aug.mixup > 0 else None
    cutmix = v2.CutMix(alpha=aug.cutmix, num_classes=num_classes) if aug.cutmix > 0 else None
    if mixup is not None and cutmix is not None:
        mix: Callable = v2.RandomChoice([cutmix, mixup], p=[aug.switch_prob, 1.0 - aug.switch_prob])
    else:
        mix = mixup if mixup is not None else cutmix
    return BatchMix(mix, num_classes, aug.mix_prob)
