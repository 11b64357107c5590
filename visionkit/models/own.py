"""Own small models: LeNet-5, Network in Network, MobileNet v1 and small-input (CIFAR-style) ResNets.

Every model here follows timm's interface: ``forward_features`` (unpooled feature map), ``forward_head``
(pool → dropout → classifier), ``get_classifier()`` and ``reset_classifier(num_classes)``. Factories take
``num_classes``, ``in_chans``, ``drop_rate`` (dropout right before the classifier) and ``drop_path_rate``
(stochastic depth; only models with residual blocks accept a non-zero value).

Example::

    >>> import torch
    >>> from visionkit.models.own import lenet
    >>> lenet(num_classes=10, in_chans=1)(torch.randn(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.ops import Conv2dNormActivation, StochasticDepth

from .registry import ModelError, note_no_drop_path, register_model

FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class _TimmStyle(nn.Module):
    """Shared ``forward`` / ``get_classifier`` / ``reset_classifier`` for models with a ``Linear`` head ``self.fc``."""

    fc: nn.Module
    num_features: int
    num_classes: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(torch.flatten(self.global_pool(x), 1))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a fresh one (``num_classes=0`` → identity, giving pooled features)."""
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


# --------------------------------------------------------------------------------------------------------- LeNet-5
class LeNet(_TimmStyle):
    """LeNet-5 (LeCun et al. 1998) as in d2l: two 5x5 conv + pool stages, then a 120-84 MLP and the classifier.

    ``bn=True`` adds BatchNorm after every conv and hidden linear layer (d2l's "LeNet with batch norm").
    An adaptive pool to 5x5 lets it run at 28 px (padded first conv) and at 32 px alike.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, drop_rate: float = 0.0, bn: bool = False,
                 act: str = "relu") -> None:
        super().__init__()
        acts = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}
        if act not in acts:
            raise ModelError(f"lenet act must be one of {sorted(acts)}, got {act!r}")
        a = acts[act]

        def norm(c: int, d: int = 2) -> nn.Module:
            return (nn.BatchNorm2d(c) if d == 2 else nn.BatchNorm1d(c)) if bn else nn.Identity()

        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 6, 5, padding=2, bias=not bn), norm(6), a(), nn.AvgPool2d(2),
            nn.Conv2d(6, 16, 5, bias=not bn), norm(16), a(), nn.AvgPool2d(2),
            nn.AdaptiveAvgPool2d(5),
        )
        self.mlp = nn.Sequential(nn.Linear(16 * 25, 120, bias=not bn), norm(120, 1), a(),
                                 nn.Linear(120, 84, bias=not bn), norm(84, 1), a())
        self.drop = nn.Dropout(drop_rate)
        self.num_features, self.num_classes = 84, num_classes
        self.fc = nn.Linear(84, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.mlp(torch.flatten(x, 1)))
        return x if pre_logits else self.fc(x)


@register_model(default_cfg={"input_size": (1, 28, 28), "mean": FASHION_MNIST_MEAN, "std": FASHION_MNIST_STD,
                             "crop_pct": 1.0}, small_input=True)
def lenet(num_classes: int = 10, in_chans: int = 1, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
          bn: bool = False, act: str = "relu", **kwargs: Any) -> LeNet:
    """LeNet-5 for 28-32 px images (``bn=True`` for batch norm, ``act="sigmoid"`` for the 1998 original)."""
    note_no_drop_path("lenet", drop_path_rate)
    return LeNet(num_classes, in_chans, drop_rate, bn=bn, act=act, **kwargs)


# ------------------------------------------------------------------------------------------- Network in Network
def _mlpconv(cin: int, widths: tuple[int, int, int], k: int) -> nn.Sequential:
    """One NiN block: a k x k conv followed by two 1x1 convs (the "micro network"), each with BN + ReLU."""
    c1, c2, c3 = widths
    return nn.Sequential(Conv2dNormActivation(cin, c1, k), Conv2dNormActivation(c1, c2, 1),
                         Conv2dNormActivation(c2, c3, 1))


class NiN(_TimmStyle):
    """Network in Network (Lin et al. 2013), the CIFAR-10 model of the paper, with BatchNorm added.

    Three mlpconv blocks; the classifier is a 1x1 conv to ``num_classes`` maps followed by global average
    pooling (no fully connected layer), exactly the paper's idea. ``block_drop`` is the paper's dropout between blocks.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0,
                 block_drop: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _mlpconv(in_chans, (192, 160, 96), 5), nn.MaxPool2d(3, 2, 1), nn.Dropout(block_drop),
            _mlpconv(96, (192, 192, 192), 5), nn.AvgPool2d(3, 2, 1), nn.Dropout(block_drop),
            Conv2dNormActivation(192, 192, 3), Conv2dNormActivation(192, 192, 1),
        )
        self.num_features, self.num_classes = 192, num_classes
        self.drop = nn.Dropout(drop_rate)
        self.fc: nn.Module = nn.Conv2d(192, num_classes, 1) if num_classes > 0 else nn.Identity()
        self.global_pool = nn.AdaptiveAvgPool2d(1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(x)
        if pre_logits:
            return torch.flatten(self.global_pool(x), 1)
        return torch.flatten(self.global_pool(self.fc(x)), 1)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the 1x1-conv head (``num_classes=0`` → identity, giving pooled features)."""
        self.num_classes = num_classes
        self.fc = nn.Conv2d(self.num_features, num_classes, 1) if num_classes > 0 else nn.Identity()


@register_model(default_cfg={"input_size": (3, 32, 32), "mean": CIFAR10_MEAN, "std": CIFAR10_STD, "crop_pct": 1.0},
                small_input=True)
def nin(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
        block_drop: float = 0.5, **kwargs: Any) -> NiN:
    """Network in Network (CIFAR-10 variant of the paper, with BatchNorm) for 28-32 px images."""
    note_no_drop_path("nin", drop_path_rate)
    return NiN(num_classes, in_chans, drop_rate, block_drop=block_drop, **kwargs)


# ------------------------------------------------------------------------------------------------- MobileNet v1
def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v  # never round down by more than 10 %


class MobileNetV1(_TimmStyle):
    """MobileNet v1 (Howard et al. 2017): a 3x3 stem then 13 depthwise-separable blocks; ``width_mult`` is alpha."""

    # (out_channels, stride) of the 13 depthwise-separable blocks, from Table 1 of the paper
    CFG = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
                 width_mult: float = 1.0) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ModelError(f"mobilenet_v1 width_mult must be > 0, got {width_mult}")
        c = _make_divisible(32 * width_mult)
        layers: list[nn.Module] = [Conv2dNormActivation(in_chans, c, 3, stride=2)]
        for out, stride in self.CFG:
            out = _make_divisible(out * width_mult)
            layers += [Conv2dNormActivation(c, c, 3, stride=stride, groups=c), Conv2dNormActivation(c, out, 1)]
            c = out
        self.features = nn.Sequential(*layers)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.num_features, self.num_classes = c, num_classes
        self.fc = nn.Linear(c, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


@register_model(default_cfg={"input_size": (3, 224, 224), "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                             "crop_pct": 0.875})
def mobilenet_v1(num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 width_mult: float = 1.0, **kwargs: Any) -> MobileNetV1:
    """MobileNet v1 with width multiplier ``width_mult`` (alpha), for 224 px images."""
    note_no_drop_path("mobilenet_v1", drop_path_rate)
    return MobileNetV1(num_classes, in_chans, drop_rate, width_mult=width_mult, **kwargs)


# ------------------------------------------------------------------------------------------ small-input ResNets
class _DropPathBlock(BasicBlock):
    """torchvision's ``BasicBlock`` with stochastic depth on the residual branch (identity when p = 0)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.drop_path: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.drop_path(self.bn2(self.conv2(out)))  # drop the whole residual branch per sample
        return self.relu(out + identity)


class SmallResNet(_TimmStyle, ResNet):
    """torchvision ``ResNet`` with the CIFAR stem: one 3x3 stride-1 conv and no max-pool (He et al. 2016, sec. 4.2).

    Keeps torchvision's parameter names (``conv1``, ``layer1``..``layer4``, ``fc``), so its state dicts read alike.
    """

    def __init__(self, layers: list[int], num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, zero_init_residual: bool = False) -> None:
        super().__init__(_DropPathBlock, layers, num_classes=max(num_classes, 1),
                         zero_init_residual=zero_init_residual)
        self.conv1 = nn.Conv2d(in_chans, 64, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.maxpool = nn.Identity()
        self.global_pool = self.avgpool  # the name _TimmStyle.forward_head uses
        self.drop = nn.Dropout(drop_rate)
        self.num_features, self.num_classes = 512, num_classes
        if num_classes <= 0:
            self.fc = nn.Identity()
        blocks = [m for m in self.modules() if isinstance(m, _DropPathBlock)]
        for i, block in enumerate(blocks):  # linearly increasing drop probability with depth, as timm does
            p = drop_path_rate * i / max(len(blocks) - 1, 1)
            if p > 0:
                block.drop_path = StochasticDepth(p, mode="row")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


_CIFAR_CFG = {"input_size": (3, 32, 32), "mean": CIFAR10_MEAN, "std": CIFAR10_STD, "crop_pct": 1.0}


@register_model(default_cfg=_CIFAR_CFG, small_input=True)
def resnet18_small(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                   **kwargs: Any) -> SmallResNet:
    """ResNet-18 with a 3x3 stride-1 stem and no max-pool, for 28-32 px images (d2l / CIFAR recipe)."""
    return SmallResNet([2, 2, 2, 2], num_classes, in_chans, drop_rate, drop_path_rate, **kwargs)


@register_model(default_cfg=_CIFAR_CFG, small_input=True)
def resnet34_small(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                   **kwargs: Any) -> SmallResNet:
    """ResNet-34 with a 3x3 stride-1 stem and no max-pool, for 28-32 px images (CIFAR recipe)."""
    return SmallResNet([3, 4, 6, 3], num_classes, in_chans, drop_rate, drop_path_rate, **kwargs)
