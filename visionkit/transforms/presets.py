"""Per-image train/eval pipelines (PIL image -> normalised CHW float tensor) built from torchvision.transforms.v2.

Example::

    from visionkit.config import AugConfig
    tf = build_train_transform(AugConfig(preset="randaugment"), (3, 224, 224), mean=(0.485, 0.456, 0.406),
                               std=(0.229, 0.224, 0.225))
    x = tf(PIL.Image.open("cat.jpg"))  # float32 [3, 224, 224]
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2

from visionkit.config import AugConfig

PRESETS: dict[str, str] = {
    "none": "no augmentation: resize + center crop, as at evaluation",
    "basic": "flip + random crop with padding (<= 64 px) or RandomResizedCrop(scale=(0.35, 1)) (larger)",
    "standard": "RandomResizedCrop(aug.scale) + flip + ColorJitter(aug.color_jitter)",
    "randaugment": "RandomResizedCrop + flip + RandAugment(aug.ra_n ops, magnitude aug.ra_m)",
    "autoaugment": "RandomResizedCrop + flip + AutoAugment (ImageNet policy)",
    "trivialaugment": "RandomResizedCrop + flip + TrivialAugmentWide (no magnitude to tune)",
}

SMALL_MAX = 64  # inputs with both sides <= this many pixels count as "small" (CIFAR/MNIST-like)

ALBUMENTATIONS_MISSING = "albumentations is not installed: pip install 'visionkit[albumentations]'"


def is_small(size: Sequence[int]) -> bool:
    """True for small inputs (both sides <= 64 px): resize instead of crop, pad-and-crop instead of RRC."""
    return max(size) <= SMALL_MAX


def _interp(name: str) -> v2.InterpolationMode:
    if name == "model":  # the model's own mode, filled in by visionkit.api; without a model: bilinear
        name = "bilinear"
    try:
        return v2.InterpolationMode(name)
    except ValueError:
        raise ValueError(f"unknown interpolation {name!r}; use nearest, bilinear or bicubic") from None


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r}; available: {', '.join(PRESETS)}")


def _check_size(input_size: Sequence[int]) -> tuple[int, int, int]:
    if len(input_size) != 3 or input_size[0] not in (1, 3):
        raise ValueError(f"input_size must be (C, H, W) with C 1 or 3, got {tuple(input_size)}")
    c, h, w = (int(v) for v in input_size)
    return c, h, w


def _eval_geometry(h: int, w: int, crop_pct: float, interpolation: v2.InterpolationMode) -> list[Any]:
    """timm's eval geometry: resize to size / crop_pct (shorter side when square), center-crop; small: resize."""
    if is_small((h, w)):
        return [v2.Resize((h, w), interpolation=interpolation, antialias=True)]
    if h == w:
        resize: int | tuple[int, int] = math.floor(h / crop_pct)
    else:
        resize = (math.floor(h / crop_pct), math.floor(w / crop_pct))
    return [v2.Resize(resize, interpolation=interpolation, antialias=True), v2.CenterCrop((h, w))]


def _to_tensor(c: int, mean: Sequence[float], std: Sequence[float]) -> list[Any]:
    """Grayscale when C == 1, then uint8 image -> float32 in [0, 1] -> normalised."""
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean/std need {c} values for {c}-channel input, got {len(mean)}/{len(std)}")
    ops: list[Any] = [v2.Grayscale(1)] if c == 1 else []
    return ops + [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def build_eval_transform(input_size: Sequence[int], mean: Sequence[float], std: Sequence[float],
                         crop_pct: float = 0.875, interpolation: str = "bilinear") -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> normalised float32 [C, H, W]: resize to size / crop_pct, center-crop (timm's convention).

    Small inputs (both sides <= 64 px) are resized straight to the size, without cropping.

    Example::

        tf = build_eval_transform((3, 224, 224), mean=(0.5,) * 3, std=(0.5,) * 3)
        tf(Image.new("RGB", (300, 200))).shape  # torch.Size([3, 224, 224])
    """
    c, h, w = _check_size(input_size)
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return v2.Compose([v2.RGB(), *_eval_geometry(h, w, crop_pct, _interp(interpolation)), *_to_tensor(c, mean, std)])


def build_train_transform(aug: AugConfig, input_size: Sequence[int], mean: Sequence[float],
                          std: Sequence[float]) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> augmented, normalised float32 [C, H, W] for training, following ``aug.preset``.

    See ``PRESETS`` for what each preset does. ``aug.backend == "albumentations"`` builds the same pipeline with
    albumentations (presets none, basic and standard; the auto-augment policies exist only in torchvision).

    Example::

        tf = build_train_transform(AugConfig(preset="standard", erasing=0.25), (3, 224, 224), (0.5,) * 3, (0.5,) * 3)
        tf(Image.new("RGB", (300, 200))).shape  # torch.Size([3, 224, 224])
    """
    _check_preset(aug.preset)
    c, h, w = _check_size(input_size)
    if aug.backend == "albumentations":
        return _build_albumentations(aug, (c, h, w), mean, std)
    if aug.backend != "torchvision":
        raise ValueError(f"unknown aug.backend {aug.backend!r}; use torchvision or albumentations")
    interp = _interp(aug.interpolation)
    flip = [v2.RandomHorizontalFlip(aug.hflip)] if aug.hflip > 0 else []
    ops: list[Any] = [v2.RGB()]
    if aug.preset == "none":
        ops += _eval_geometry(h, w, 0.875, interp)
    elif aug.preset == "basic":
        if is_small((h, w)):
            ops += [v2.Resize((h, w), interpolation=interp, antialias=True)]
            if aug.crop_pad > 0:
                ops += [v2.RandomCrop((h, w), padding=aug.crop_pad)]
        else:
            ops += [v2.RandomResizedCrop((h, w), scale=(0.35, 1.0), interpolation=interp, antialias=True)]
        ops += flip
    else:
        ops += [v2.RandomResizedCrop((h, w), scale=tuple(aug.scale), interpolation=interp, antialias=True), *flip]
        if aug.preset == "standard":
            if aug.color_jitter > 0:
                ops += [v2.ColorJitter(aug.color_jitter, aug.color_jitter, aug.color_jitter)]
        else:
            ops += [auto_augment(aug, interp)]
    ops += _to_tensor(c, mean, std)
    if aug.erasing > 0:
        ops += [v2.RandomErasing(p=aug.erasing, value=0)]
    return v2.Compose(ops)


def auto_augment(aug: AugConfig, interpolation: v2.InterpolationMode) -> v2.Transform:
    """The v2 policy transform for presets randaugment / autoaugment / trivialaugment."""
    if aug.preset == "randaugment":
        return v2.RandAugment(num_ops=aug.ra_n, magnitude=aug.ra_m, interpolation=interpolation)
    if aug.preset == "autoaugment":
        return v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=interpolation)
    if aug.preset == "trivialaugment":
        return v2.TrivialAugmentWide(interpolation=interpolation)
    raise ValueError(f"preset {aug.preset!r} is not an auto-augment policy")


class _AlbumentationsTransform:
    """Adapter: PIL image -> numpy -> albumentations pipeline -> tensor (+ v2 RandomErasing)."""

    def __init__(self, pipeline: Any, gray: bool, erasing: float) -> None:
        self.pipeline, self.gray = pipeline, gray
        self.erasing = v2.RandomErasing(p=erasing, value=0) if erasing > 0 else None

    def __call__(self, img: Image.Image) -> torch.Tensor:
        import numpy as np

        arr = np.asarray(img.convert("RGB"))
        x = self.pipeline(image=arr)["image"]  # float32 [3, H, W] from ToTensorV2
        if self.gray:  # ToGray left three equal channels
            x = x[:1]
        x = torch.as_tensor(x, dtype=torch.float32)
        return self.erasing(x) if self.erasing is not None else x

    def __repr__(self) -> str:
        return f"AlbumentationsTransform({self.pipeline!r}, gray={self.gray}, erasing={self.erasing!r})"


def _build_albumentations(aug: AugConfig, input_size: tuple[int, int, int], mean: Sequence[float],
                          std: Sequence[float]) -> Callable[[Image.Image], torch.Tensor]:
    try:
        import albumentations as A
        from albumentations.pytorch import ToTensorV2
    except ImportError:
        raise ValueError(ALBUMENTATIONS_MISSING) from None
    if aug.preset not in ("none", "basic", "standard"):
        raise ValueError(f"preset {aug.preset!r} has no albumentations equivalent; "
                         "use --set aug.backend=torchvision or preset none/basic/standard")
    import cv2

    c, h, w = input_size
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean/std need {c} values for {c}-channel input, got {len(mean)}/{len(std)}")
    interp = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC,
              "model": cv2.INTER_LINEAR}[aug.interpolation]
    flip = [A.HorizontalFlip(p=aug.hflip)] if aug.hflip > 0 else []

    def rrc(scale: Sequence[float]) -> Any:
        try:
            return A.RandomResizedCrop(size=(h, w), scale=tuple(scale), interpolation=interp)
        except (TypeError, ValueError):  # albumentations < 1.4.x: height, width
            return A.RandomResizedCrop(h, w, scale=tuple(scale), interpolation=interp)

    ops: list[Any] = []
    if aug.preset == "none" or (aug.preset == "basic" and is_small((h, w))):
        if is_small((h, w)):
            ops += [A.Resize(h, w, interpolation=interp)]
        else:  # timm eval geometry: shorter side to size / 0.875, center crop
            ops += [A.SmallestMaxSize(max_size=math.floor(min(h, w) / 0.875), interpolation=interp),
                    A.CenterCrop(h, w)]
        if aug.preset == "basic":
            if aug.crop_pad > 0:
                ops += [A.PadIfNeeded(h + 2 * aug.crop_pad, w + 2 * aug.crop_pad, border_mode=cv2.BORDER_CONSTANT),
                        A.RandomCrop(h, w)]
            ops += flip
    elif aug.preset == "basic":
        ops += [rrc((0.35, 1.0)), *flip]
    else:
        ops += [rrc(aug.scale), *flip]
        if aug.color_jitter > 0:
            j = aug.color_jitter
            ops += [A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=0.0, p=1.0)]
    if c == 1:
        ops += [A.ToGray(p=1.0)]
        mean, std = list(mean) * 3, list(std) * 3
    ops += [A.Normalize(mean=list(mean), std=list(std), max_pixel_value=255.0), ToTensorV2()]
    return _AlbumentationsTransform(A.Compose(ops), gray=c == 1, erasing=aug.erasing)
