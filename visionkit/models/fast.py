"""FastNet: small CNNs for 28-32 px images that train to high accuracy in minutes on a CPU.

Design (measured on Fashion-MNIST, 2 CPU cores, bf16 autocast; see ``benchmarks/notes/fmnist_recipe.md``):

* Training on small images is compute bound, so FLOPs spent at full resolution are the most expensive ones.
  Only two 3x3 convs run at full resolution: a narrow stem and the widening conv of stage 1; all the rest runs at
  1/2 and 1/4 resolution.
* Stage 1 downsamples as ``conv3x3 -> MaxPool(2) -> BN -> act`` (airbench style): the conv sees the full-resolution
  texture. Measured: +0.9% val accuracy over pooling first at about the same compute on Fashion-MNIST, the biggest
  single win. Later stages pool first (``MaxPool(2) -> conv3x3 -> BN -> act``), 4x cheaper (not ablated there).
* Each stage adds residual basic blocks (conv-BN-act-conv-BN + identity). The last BN of each residual branch
  is zero-initialised so every block starts as the identity, which tolerates a high learning rate.
* Global max pooling before the linear head (as in airbench; not ablated here).
* Plain ReLU: on CPU, GELU costs ~12% more step time (accuracy with GELU not compared at the final budget).

The stages are: stem (full res) -> stage 1 (1/2 res) -> stage 2 (1/4 res) [-> stage 3 (1/8 res) if given].
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from visionkit.models.registry import register_model

__all__ = ["FastNet", "fastnet", "fastnet_wide"]

_FMNIST_CFG = {"input_size": (1, 28, 28), "mean": (0.2860,), "std": (0.3530,)}


def conv_bn_act(in_chs: int, out_chs: int) -> nn.Sequential:
    """3x3 conv (no bias) -> BatchNorm -> ReLU."""
    return nn.Sequential(nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=False), nn.BatchNorm2d(out_chs),
                         nn.ReLU(inplace=True))


class DropPath(nn.Module):
    """Stochastic depth on the residual branch (per sample); identity when ``p == 0`` or in eval mode."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class BasicBlock(nn.Module):
    """Residual block ``relu(x + bn(conv(relu(bn(conv(x))))))`` with the last BN zero-initialised."""

    def __init__(self, chs: int, drop_path: float = 0.0):
        super().__init__()
        self.conv1 = conv_bn_act(chs, chs)
        self.conv2 = nn.Conv2d(chs, chs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(chs)
        nn.init.zeros_(self.bn2.weight)
        self.drop_path = DropPath(drop_path)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.drop_path(self.bn2(self.conv2(self.conv1(x)))))


class FastNet(nn.Module):
    """Stem conv at full resolution, then stages of ``downsample -> BasicBlock * depth``.

    Stage 1 downsamples with ``conv -> MaxPool -> BN -> ReLU`` (conv at full resolution), later stages with
    ``MaxPool -> conv -> BN -> ReLU``.

    Args:
        widths: channels of the stem followed by each stage, e.g. ``(24, 64, 128)``.
        depths: residual blocks per stage (``len(depths) == len(widths) - 1``).
        num_classes: classifier outputs (0 gives a feature extractor with an ``nn.Identity`` head).
        in_chans: input channels (1 for MNIST-like data, 3 for CIFAR).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linearly increasing over the residual blocks.
    """

    def __init__(self, widths: Sequence[int] = (24, 64, 128), depths: Sequence[int] = (1, 1), num_classes: int = 10,
                 in_chans: int = 1, drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        if len(depths) != len(widths) - 1:
            raise ValueError(f"need one depth per stage: widths={widths} depths={depths}")
        self.num_classes = num_classes
        self.num_features = widths[-1]
        self.drop_rate = drop_rate
        self.stem = conv_bn_act(in_chans, widths[0])
        n_blocks = max(1, sum(depths))
        dpr = [drop_path_rate * i / max(1, n_blocks - 1) for i in range(n_blocks)]
        stages, k = [], 0
        for i, (c_in, c_out, depth) in enumerate(zip(widths[:-1], widths[1:], depths)):
            if i == 0:
                blocks = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(c_out),
                          nn.ReLU(inplace=True)]
            else:
                blocks = [nn.MaxPool2d(2), conv_bn_act(c_in, c_out)]
            for _ in range(depth):
                blocks.append(BasicBlock(c_out, dpr[k]))
                k += 1
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.global_pool = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(1))
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, **kwargs) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map at 1/4 (or 1/8) resolution, shape ``(B, widths[-1], H', W')``."""
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model(default_cfg=_FMNIST_CFG, small_input=True,
                description="FastNet (0.26M params, 24M MACs at 28px): 93% on Fashion-MNIST in <5 min on 2 CPU cores")
def fastnet(num_classes: int = 10, in_chans: int = 1, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
            width: int = 48, **kw) -> nn.Module:
    """FastNet, widths ``(width / 3, width, 2 * width)`` = (16, 48, 96), one residual block per stage.

    On a small CPU budget more epochs of a narrow net beat fewer epochs of a wider one.
    """
    widths = kw.pop("widths", (max(8, width // 3), width, 2 * width))
    depths = kw.pop("depths", (1, 1))
    return FastNet(widths, depths, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                   drop_path_rate=drop_path_rate, **kw)


@register_model(default_cfg=_FMNIST_CFG, small_input=True,
                description="Wider FastNet (0.46M params, 44M MACs at 28px) for a ~20 min CPU budget")
def fastnet_wide(num_classes: int = 10, in_chans: int = 1, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 width: int = 64, **kw) -> nn.Module:
    """FastNet, widths ``(3 * width / 8, width, 2 * width)`` = (24, 64, 128), one residual block per stage."""
    widths = kw.pop("widths", (max(8, width * 3 // 8), width, 2 * width))
    depths = kw.pop("depths", (1, 1))
    return FastNet(widths, depths, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                   drop_path_rate=drop_path_rate, **kw)
