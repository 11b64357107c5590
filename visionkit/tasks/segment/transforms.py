"""Joint image + mask augmentation for semantic segmentation: the mask always moves with its image.

Two paths, the same policy (``seg_aug_params`` turns an AugConfig into it):

* image files: torchvision v2 pipelines on ``(tv_tensors.Image, tv_tensors.Mask)`` pairs. v2 applies geometric ops
  to both (masks resampled NEAREST, padding filled with ``ignore_index``) and photometric ops to the image only.
* in-memory uint8 tensors: ``SegBatchAugment``, a handful of batched tensor ops per step, every random number drawn
  from the ``torch.Generator`` passed in (bit-exact resume, global RNGs untouched).

Policy by ``aug.preset`` (``None`` or preset ``none``: no augmentation, as at evaluation):

* basic: horizontal flip (``aug.hflip``), scale jitter 0.75-1.25 with a random shift (zoom-out borders are image 0
  and mask ``ignore_index``), mild brightness/contrast jitter (0.1);
* standard and stronger: scale jitter 0.5-1.5, flip, ColorJitter(``aug.color_jitter``) on brightness, contrast and
  saturation. The auto-augment policies are not used for masks (v2 would move the image but not the mask).

Example::

    tf = build_seg_train_transform(AugConfig(preset="standard"), (128, 128), mean=(0.5,) * 3, std=(0.5,) * 3)
    x, y = tf(tv_tensors.Image(img_u8), tv_tensors.Mask(mask_i64))  # float32 [3,128,128], int64 [128,128]
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from visionkit.config import AugConfig

IGNORE_INDEX = 255
BASIC_SCALE = (0.75, 1.25)
STRONG_SCALE = (0.5, 1.5)
BASIC_JITTER = 0.1


@dataclass(frozen=True)
class SegAugParams:
    """What one AugConfig means for segmentation (see the module docstring)."""

    hflip: float = 0.0
    scale: tuple[float, float] | None = None  # zoom range; None: no geometric jitter
    brightness: float = 0.0  # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.0
    saturation: float = 0.0

    @property
    def active(self) -> bool:
        return self.hflip > 0 or self.scale is not None or self.brightness > 0 or self.contrast > 0 \
            or self.saturation > 0


def seg_aug_params(aug: AugConfig | None) -> SegAugParams:
    """The segmentation augmentation policy of ``aug`` (``None`` or preset none: nothing).

    Example::

        seg_aug_params(AugConfig(preset="basic")).scale  # (0.75, 1.25)
    """
    if aug is None or aug.preset == "none":
        return SegAugParams()
    hflip = max(0.0, float(aug.hflip))
    if aug.preset == "basic":
        return SegAugParams(hflip, BASIC_SCALE, BASIC_JITTER, BASIC_JITTER, 0.0)
    j = max(0.0, float(aug.color_jitter))
    return SegAugParams(hflip, STRONG_SCALE, j, j, j)


def _size(size: int | Sequence[int]) -> tuple[int, int, int]:
    """(C, H, W) from an int, (H, W) or (C, H, W); C defaults to 3."""
    if isinstance(size, int):
        return 3, size, size
    s = tuple(int(v) for v in size)
    if len(s) == 2:
        return (3, *s)
    if len(s) == 3 and s[0] in (1, 3):
        return s  # type: ignore[return-value]
    raise ValueError(f"size must be H, (H, W) or (C, H, W) with C 1 or 3, got {size}")


def _to_float(c: int, mean: Sequence[float], std: Sequence[float]) -> list[Any]:
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean/std need {c} values for {c}-channel input, got {len(mean)}/{len(std)}")
    ops: list[Any] = [v2.Grayscale(1)] if c == 1 else []
    return ops + [v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None},
                             scale=True),
                  v2.Normalize(list(mean), list(std))]


def build_seg_eval_transform(size: int | Sequence[int], mean: Sequence[float],
                             std: Sequence[float]) -> v2.Transform:
    """(Image uint8, Mask) -> (normalised float32 [C,H,W], int64 [H,W]): resize to ``size`` (image bilinear with
    antialiasing, mask nearest), no cropping.

    Example::

        tf = build_seg_eval_transform((64, 64), (0.5,) * 3, (0.5,) * 3)
        x, y = tf(tv_tensors.Image(torch.zeros(3, 80, 100, dtype=torch.uint8)),
                  tv_tensors.Mask(torch.zeros(80, 100, dtype=torch.long)))  # [3,64,64], [64,64]
    """
    c, h, w = _size(size)
    return v2.Compose([v2.Resize((h, w), antialias=True), *_to_float(c, mean, std)])


def build_seg_train_transform(aug: AugConfig | None, size: int | Sequence[int], mean: Sequence[float],
                              std: Sequence[float], ignore_index: int = IGNORE_INDEX) -> v2.Transform:
    """(Image uint8, Mask) -> augmented (normalised float32 [C,H,W], int64 [H,W]) for training.

    Resize to ``size`` (as at evaluation), then scale jitter + random shift in one RandomAffine (borders: image 0,
    mask ``ignore_index``), horizontal flip, colour jitter on the image only. v2 resamples ``tv_tensors.Mask``
    with NEAREST on its own. The randomness comes from the global torch RNG: the file loader seeds it per sample
    inside ``isolated_rng``.

    Example::

        tf = build_seg_train_transform(AugConfig(preset="basic"), (64, 64), (0.5,) * 3, (0.5,) * 3)
        x, y = tf(tv_tensors.Image(img), tv_tensors.Mask(mask))
    """
    p = seg_aug_params(aug)
    c, h, w = _size(size)
    ops: list[Any] = [v2.Resize((h, w), antialias=True)]
    if p.scale is not None:
        lo, hi = p.scale
        shift = (hi - lo) / 4  # fraction of the size: keeps most of a zoomed-in view inside the image
        ops.append(v2.RandomAffine(degrees=0.0, translate=(shift, shift), scale=p.scale,
                                   interpolation=v2.InterpolationMode.BILINEAR,
                                   fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}))
    if p.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(p.hflip))
    if p.brightness > 0 or p.contrast > 0 or p.saturation > 0:
        ops.append(v2.ColorJitter(p.brightness, p.contrast, p.saturation))
    return v2.Compose(ops + _to_float(c, mean, std))


class SegBatchAugment:
    """uint8 images [B,C,H,W] + masks [B,H,W] -> normalised float32 [B,C',oh,ow] + int64 masks [B,oh,ow].

    Train (``train=True`` with an active policy, see ``seg_aug_params``), per-sample random parameters, no per-image
    Python loop: brightness/contrast/saturation jitter, then one ``affine_grid``: zoom by a factor in the policy's
    scale range, a random shift that keeps the view inside the image (zoom in) or the image inside the view (zoom
    out), and the horizontal flip. Images are resampled bilinearly, masks with nearest; mask pixels from outside the
    image become ``ignore_index``. Eval: resize to ``out_size`` (image bilinear + antialias, mask nearest) and
    normalise. ``len(mean)`` sets the output channels (3 -> 1 uses luma).

    Example::

        aug = SegBatchAugment(AugConfig(preset="basic"), (0.5,) * 3, (0.5,) * 3, (64, 64), train=True)
        g = torch.Generator().manual_seed(0)
        x, y = aug(torch.zeros(8, 3, 64, 64, dtype=torch.uint8), torch.zeros(8, 64, 64, dtype=torch.uint8), g)
    """

    def __init__(self, aug: AugConfig | None, mean: Sequence[float], std: Sequence[float],
                 out_size: tuple[int, int], train: bool, ignore_index: int = IGNORE_INDEX) -> None:
        if len(mean) != len(std) or len(mean) not in (1, 3):
            raise ValueError(f"mean and std need 1 or 3 values each, got {len(mean)} and {len(std)}")
        self.params = seg_aug_params(aug) if train else SegAugParams()
        self.out_size = (int(out_size[0]), int(out_size[1]))
        self.channels = len(mean)
        self.ignore_index = int(ignore_index)
        self.mean = torch.tensor([float(m) for m in mean]).view(1, -1, 1, 1)
        self.std = torch.tensor([float(s) for s in std]).view(1, -1, 1, 1)
        self._luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)

    def __repr__(self) -> str:
        return f"SegBatchAugment(out_size={self.out_size}, params={self.params}, ignore_index={self.ignore_index})"

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, mask: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment (train) or only resize + normalise (eval) one batch; training needs ``generator``."""
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"SegBatchAugment expects uint8 [B, 1|3, H, W] images, got {x.dtype} {tuple(x.shape)}")
        if mask.shape != (x.shape[0], *x.shape[2:]):
            raise ValueError(f"masks {tuple(mask.shape)} do not match images {tuple(x.shape)}")
        if x.shape[1] == 3 and self.channels == 1:
            x = TF.rgb_to_grayscale(x)
        b = x.shape[0]
        img = x.float()
        if img.shape[1] != self.channels:
            img = img.expand(-1, self.channels, -1, -1)
        y = mask.long()
        if img.shape[-2:] != self.out_size:  # to the output size first: the affine below then never downsamples
            down = self.out_size[0] < img.shape[-2] or self.out_size[1] < img.shape[-1]
            img = F.interpolate(img, size=self.out_size, mode="bilinear", align_corners=False, antialias=down)
            y = F.interpolate(y[:, None].float(), size=self.out_size, mode="nearest-exact")[:, 0].long()
        p = self.params
        if p.active and b:
            if generator is None:
                raise ValueError("SegBatchAugment(train=True) needs a torch.Generator: all randomness comes from it")
            u = torch.rand(b, 7, generator=generator, device=generator.device).to(img.device)
            img = self._colour(img, u)
            if p.hflip > 0 or p.scale is not None:
                img, y = self._affine(img, y, u)
        scale, shift = 1.0 / (255.0 * self.std.to(img.device)), -self.mean.to(img.device) / self.std.to(img.device)
        return torch.addcmul(shift, img, scale), y

    def _colour(self, img: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Brightness, contrast, saturation factors drawn per image from [1 - j, 1 + j] (0..255 float space)."""
        p = self.params
        if not (p.brightness > 0 or p.contrast > 0 or p.saturation > 0):
            return img
        b = img.shape[0]
        bright = 1.0 + p.brightness * (2 * u[:, 4] - 1)
        contrast = 1.0 + p.contrast * (2 * u[:, 5] - 1)
        # brightness then contrast around the (brightened) mean grey, folded into one multiply-add
        mean = img.mean(dim=(1, 2, 3)) if p.contrast > 0 else torch.zeros_like(bright)
        gain = (bright * contrast).view(b, 1, 1, 1)
        offset = (bright * mean * (1 - contrast)).view(b, 1, 1, 1)
        img = torch.addcmul(offset, img, gain)
        if p.saturation > 0 and img.shape[1] == 3:
            sat = (1.0 + p.saturation * (2 * u[:, 6] - 1)).view(b, 1, 1, 1)
            grey = (img * self._luma.to(img.device)).sum(1, keepdim=True)
            img = torch.addcmul(grey * (1 - sat), img, sat)
        return img.clamp_(0, 255)

    def _affine(self, img: torch.Tensor, y: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Zoom + shift + flip of image (bilinear) and mask (nearest, outside -> ignore) through one sampling grid."""
        p = self.params
        b = img.shape[0]
        if p.scale is not None:
            lo, hi = p.scale
            zoom = torch.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * u[:, 1])
        else:
            zoom = torch.ones(b, device=img.device)
        room = (1 - 1 / zoom).abs()  # shift range in normalised coordinates
        tx, ty = (2 * u[:, 2] - 1) * room, (2 * u[:, 3] - 1) * room
        sign = torch.where(u[:, 0] < p.hflip, -1.0, 1.0)
        # no rotation: the grid is separable (x from the column, y from the row), cheaper than affine_grid
        h, w = self.out_size
        bx = (torch.arange(w, device=img.device, dtype=img.dtype) * 2 + 1) / w - 1  # pixel centres in [-1, 1]
        by = (torch.arange(h, device=img.device, dtype=img.dtype) * 2 + 1) / h - 1
        gx = (sign / zoom)[:, None] * bx + tx[:, None]  # [B, W]
        gy = (1 / zoom)[:, None] * by + ty[:, None]  # [B, H]
        grid = torch.stack([gx[:, None, :].expand(-1, h, -1), gy[:, :, None].expand(-1, -1, w)], dim=-1)
        img = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # mask + 1 so that 0 marks "outside the image" after zero padding
        m = F.grid_sample((y + 1).float()[:, None], grid, mode="nearest", padding_mode="zeros", align_corners=False)
        m = m[:, 0].long()
        return img, torch.where(m == 0, self.ignore_index, m - 1)
