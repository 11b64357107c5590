"""Joint image + box augmentation for object detection: the boxes always move with their image.

torchvision v2 pipelines on ``(tv_tensors.Image uint8, {"boxes": tv_tensors.BoundingBoxes XYXY, "labels",
"difficult"})`` samples: geometric ops move the boxes (and clamp them to the canvas), photometric ops touch the image
only, and ``SanitizeBoundingBoxes`` drops the boxes that became degenerate together with their ``labels`` and
``difficult`` entries. The output image is float32 in [0, 1], **not normalised** (detectors normalise inside).

Policy by ``aug.preset`` (``None`` or preset ``none``: no augmentation, as at evaluation):

* basic: horizontal flip (``aug.hflip``), mild scale jitter 0.8-1.25 with a random shift (RandomAffine, borders grey);
* standard and stronger: light photometric distortion (scaled by ``aug.color_jitter``), RandomZoomOut (p 0.5, up to
  2x, grey fill), RandomIoUCrop (SSD's crops, p 0.5), horizontal flip. The auto-augment policies are not used.

Every pipeline ends with a stretch resize to ``(S, S)``: training and evaluation see whole images.
The randomness comes from the global torch RNG: the loaders seed it per sample inside ``isolated_rng``.

In-memory uint8 tensors (``det-shapes``) take ``DetBatchAugment`` instead: the same policy as a handful of batched
tensor ops per step (v2's IoU crop alone costs ~15 ms an image on a CPU), every random number drawn from the
``torch.Generator`` passed in. Zoom-out and IoU crop become one zoom factor drawn from 0.5-1.6 with a random shift;
boxes move analytically, are clipped to the view and dropped when their centre leaves it or they get thinner than
1 px.

Example::

    tf = build_det_train_transform(AugConfig(preset="standard"), 128)
    img, target = tf(tv_tensors.Image(img_u8), {"boxes": tv_tensors.BoundingBoxes(b, format="XYXY",
                     canvas_size=(h, w)), "labels": labels, "difficult": difficult})  # float32 [3,128,128]
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision import tv_tensors
from torchvision.ops import clip_boxes_to_image, remove_small_boxes
from torchvision.transforms import v2

from visionkit.config import AugConfig

FILL = 124  # grey of the zoom-out / shift borders (uint8, about the ImageNet mean)
BASIC_SCALE = (0.8, 1.25)
ZOOM_OUT = (1.0, 2.0)  # RandomZoomOut's side range
BATCH_ZOOM = (0.5, 1.6)  # DetBatchAugment's zoom range for standard and up (< 1 zooms out, > 1 in)
MIN_BOX = 1.0  # boxes narrower or lower than this (pixels of the output) are dropped after augmentation


@dataclass(frozen=True)
class DetAugParams:
    """What one AugConfig means for detection (see the module docstring)."""

    hflip: float = 0.0
    scale: tuple[float, float] | None = None  # RandomAffine zoom range (basic)
    photometric: float = 0.0  # colour jitter strength; 0: off
    zoom_out: float = 0.0  # probability of RandomZoomOut
    iou_crop: float = 0.0  # probability of RandomIoUCrop

    @property
    def active(self) -> bool:
        return self.hflip > 0 or self.scale is not None or self.photometric > 0 or self.zoom_out > 0 \
            or self.iou_crop > 0


def det_aug_params(aug: AugConfig | None) -> DetAugParams:
    """The detection augmentation policy of ``aug`` (``None`` or preset none: nothing).

    Example::

        det_aug_params(AugConfig(preset="standard")).zoom_out  # 0.5
    """
    if aug is None or aug.preset == "none":
        return DetAugParams()
    hflip = max(0.0, float(aug.hflip))
    if aug.preset == "basic":
        return DetAugParams(hflip=hflip, scale=BASIC_SCALE)
    return DetAugParams(hflip=hflip, photometric=max(0.0, float(aug.color_jitter)), zoom_out=0.5, iou_crop=0.5)


def _size(size: int | Sequence[int]) -> tuple[int, int]:
    """(H, W) from an int, (H, W) or (C, H, W)."""
    if isinstance(size, int):
        return size, size
    s = tuple(int(v) for v in size)
    if len(s) in (2, 3):
        return s[-2], s[-1]
    raise ValueError(f"size must be S, (H, W) or (C, H, W), got {size}")


def _labels_getter(inputs: Any) -> tuple[torch.Tensor, ...]:
    """What SanitizeBoundingBoxes filters with the boxes: ``labels`` and ``difficult`` of the sample's target."""
    target = inputs[1] if isinstance(inputs, (tuple, list)) and len(inputs) > 1 else inputs
    return tuple(target[k] for k in ("labels", "difficult") if k in target)


def _to_float() -> v2.Transform:
    return v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)


def build_det_eval_transform(size: int | Sequence[int]) -> v2.Transform:
    """(Image uint8, target) -> (float32 [3,H,W] in [0, 1], target with boxes in output pixels): a stretch resize.

    Example::

        tf = build_det_eval_transform(128)
        x, t = tf(tv_tensors.Image(torch.zeros(3, 60, 80, dtype=torch.uint8)),
                  {"boxes": tv_tensors.BoundingBoxes([[0, 0, 40, 30]], format="XYXY", canvas_size=(60, 80)),
                   "labels": torch.tensor([0]), "difficult": torch.tensor([False])})  # boxes [[0, 0, 64, 64]]
    """
    h, w = _size(size)
    return v2.Compose([v2.Resize((h, w), antialias=True), _to_float()])


def build_det_train_transform(aug: AugConfig | None, size: int | Sequence[int]) -> v2.Transform:
    """(Image uint8, target) -> augmented (float32 [3,H,W] in [0, 1], target) for training (module docstring).

    Example::

        tf = build_det_train_transform(AugConfig(preset="basic"), (128, 128))
        with isolated_rng(0):
            x, t = tf(img, target)
    """
    p = det_aug_params(aug)
    h, w = _size(size)
    if not p.active:
        return build_det_eval_transform((h, w))
    ops: list[Any] = []
    if p.photometric > 0:
        j = p.photometric
        ops.append(v2.RandomPhotometricDistort(brightness=(1 - j / 4, 1 + j / 4), contrast=(1 - j / 2, 1 + j / 2),
                                               saturation=(1 - j / 2, 1 + j / 2), hue=(-j / 8, j / 8), p=0.5))
    if p.zoom_out > 0:
        ops.append(v2.RandomZoomOut(fill={tv_tensors.Image: FILL, "others": 0}, side_range=ZOOM_OUT, p=p.zoom_out))
    if p.iou_crop > 0:
        ops.append(v2.RandomApply([v2.RandomIoUCrop()], p=p.iou_crop))
    ops.append(v2.Resize((h, w), antialias=True))
    if p.scale is not None:
        lo, hi = p.scale
        shift = (hi - lo) / 4
        ops.append(v2.RandomAffine(degrees=0.0, translate=(shift, shift), scale=p.scale,
                                   fill={tv_tensors.Image: FILL, "others": 0}))
    if p.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(p.hflip))
    ops += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=MIN_BOX, labels_getter=_labels_getter),
            _to_float()]
    return v2.Compose(ops)


class DetBatchAugment:
    """uint8 images [B,3,H,W] + their targets -> float32 [B,3,oh,ow] in [0, 1] + targets in output pixels.

    ``targets`` is a list of B dicts with plain tensors ``boxes`` float32 [N,4] xyxy in input pixels, ``labels``
    and ``difficult`` (other keys are kept as they are). Eval (or no active policy): a batched stretch resize.
    Train: per-image brightness/contrast/saturation (half the images, as RandomPhotometricDistort), then one
    separable sampling grid per image: zoom (``BASIC_SCALE`` for basic, ``BATCH_ZOOM`` for standard and up), a
    random shift that keeps the view inside the image (zoom in) or the image inside the view (zoom out, grey
    borders) and the horizontal flip. Boxes follow the same map; those whose centre leaves the view, or that end up
    thinner than ``MIN_BOX`` px, are dropped with their labels and difficult flags.

    Example::

        aug = DetBatchAugment(AugConfig(preset="standard"), (96, 96), train=True)
        x, t = aug(images_u8, targets, torch.Generator().manual_seed(0))
    """

    def __init__(self, aug: AugConfig | None, out_size: int | Sequence[int], train: bool) -> None:
        self.params = det_aug_params(aug) if train else DetAugParams()
        self.out_size = _size(out_size)
        p = self.params
        self.zoom = p.scale if p.scale is not None else (BATCH_ZOOM if p.zoom_out > 0 or p.iou_crop > 0 else None)
        self._luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)

    def __repr__(self) -> str:
        return f"DetBatchAugment(out_size={self.out_size}, params={self.params}, zoom={self.zoom})"

    @torch.no_grad()
    def __call__(self, x: Tensor, targets: list[dict], generator: torch.Generator | None = None
                 ) -> tuple[Tensor, list[dict]]:
        """Augment (train) or only resize (eval) one batch; training needs ``generator``."""
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"DetBatchAugment expects uint8 [B, 3, H, W] images, got {x.dtype} {tuple(x.shape)}")
        if len(targets) != len(x):
            raise ValueError(f"{len(targets)} targets for {len(x)} images")
        b, (h0, w0), (h, w) = x.shape[0], x.shape[-2:], self.out_size
        img = x.float()
        sx, sy = w / w0, h / h0
        if (h, w) != (h0, w0):
            img = F.interpolate(img, size=(h, w), mode="bilinear", align_corners=False, antialias=h < h0 or w < w0)
        boxes = [t["boxes"].float() * torch.tensor([sx, sy, sx, sy], device=t["boxes"].device) for t in targets]
        p = self.params
        keep: list[Tensor | None] = [None] * b
        if p.active and b:
            if generator is None:
                raise ValueError("DetBatchAugment(train=True) needs a torch.Generator: all randomness comes from it")
            u = torch.rand(b, 8, generator=generator, device=generator.device).to(img.device)
            if p.photometric > 0:
                img = self._colour(img, u)
            if self.zoom is not None or p.hflip > 0:
                img, boxes, keep = self._affine(img, boxes, u)
        out = []
        for t, bx, k in zip(targets, boxes, keep):
            d = dict(t)
            if k is None:
                d["boxes"] = bx
            else:
                d.update(boxes=bx[k], labels=t["labels"][k], difficult=t["difficult"][k])
            out.append(d)
        return img.div_(255.0).clamp_(0.0, 1.0), out

    def _colour(self, img: Tensor, u: Tensor) -> Tensor:
        """Brightness (+-j/4), contrast and saturation (+-j/2) factors for the half of the images drawn."""
        j, b = self.params.photometric, img.shape[0]
        on = (u[:, 7] < 0.5).float()
        bright = 1.0 + on * (j / 4) * (2 * u[:, 4] - 1)
        contrast = 1.0 + on * (j / 2) * (2 * u[:, 5] - 1)
        sat = (1.0 + on * (j / 2) * (2 * u[:, 6] - 1)).view(b, 1, 1, 1)
        mean = img.mean(dim=(1, 2, 3))
        img = torch.addcmul((bright * mean * (1 - contrast)).view(b, 1, 1, 1), img, (bright * contrast).view(b, 1, 1, 1))
        grey = (img * self._luma.to(img.device)).sum(1, keepdim=True)
        return torch.addcmul(grey * (1 - sat), img, sat).clamp_(0, 255)

    def _affine(self, img: Tensor, boxes: list[Tensor], u: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        p, (b, _, h, w) = self.params, img.shape
        if self.zoom is not None:
            lo, hi = self.zoom
            zoom = torch.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * u[:, 1])
        else:
            zoom = torch.ones(b, device=img.device)
        room = (1 - 1 / zoom).abs()  # shift range in normalised coordinates
        tx, ty = (2 * u[:, 2] - 1) * room, (2 * u[:, 3] - 1) * room
        sign = torch.where(u[:, 0] < p.hflip, -1.0, 1.0)
        bx = (torch.arange(w, device=img.device, dtype=img.dtype) * 2 + 1) / w - 1  # pixel centres in [-1, 1]
        by = (torch.arange(h, device=img.device, dtype=img.dtype) * 2 + 1) / h - 1
        gx = (sign / zoom)[:, None] * bx + tx[:, None]  # output column -> input x (normalised)
        gy = (1 / zoom)[:, None] * by + ty[:, None]
        grid = torch.stack([gx[:, None, :].expand(-1, h, -1), gy[:, :, None].expand(-1, -1, w)], dim=-1)
        img = F.grid_sample(img - FILL, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + FILL
        out, keep = [], []
        for i, bxs in enumerate(boxes):  # input x_n -> output sign * zoom * (x_n - tx), in normalised units
            z, s = float(zoom[i]), float(sign[i])
            xs = (s * z * (bxs[:, [0, 2]] * (2 / w) - 1 - float(tx[i])) + 1) * (w / 2)
            ys = (z * (bxs[:, [1, 3]] * (2 / h) - 1 - float(ty[i])) + 1) * (h / 2)
            xs = xs.sort(dim=1).values  # a flip swaps x1 and x2
            nb = torch.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], dim=1)
            cx, cy = (nb[:, 0] + nb[:, 2]) / 2, (nb[:, 1] + nb[:, 3]) / 2
            inside = (cx > 0) & (cx < w) & (cy > 0) & (cy < h)
            nb = clip_boxes_to_image(nb, (h, w))
            big = torch.zeros_like(inside)
            big[remove_small_boxes(nb, MIN_BOX)] = True
            out.append(nb)
            keep.append(inside & big)
        return img, out, keep


__all__ = ["DetAugParams", "DetBatchAugment", "build_det_eval_transform", "build_det_train_transform",
           "det_aug_params"]
