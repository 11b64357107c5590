"""The two dataset classes: ``TensorImages`` (built-ins, one uint8 tensor) and ``ImageFiles`` (paths on disk).

Both expose ``.targets`` (ints) and ``.classes`` so splits, class counts and samplers never need to decode an image.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

_WHITE = (255, 255, 255)


class TensorImages(Dataset):
    """A whole image set held as one uint8 tensor ``[N, C, H, W]``; items are ``(uint8 CHW tensor, int)``.

    Example::

        ds = TensorImages(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]), ["a", "b"])
        x, y = ds[1]
    """

    def __init__(self, images: Tensor, targets: Tensor | Sequence[int], classes: Sequence[str]) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"TensorImages expects a uint8 [N,C,H,W] tensor, got {images.dtype} {tuple(images.shape)}")
        targets = torch.as_tensor(targets, dtype=torch.long)
        if len(targets) != len(images):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images = images.contiguous()
        self.targets = targets
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.targets[i])

    def subset(self, indices: Sequence[int] | Tensor) -> TensorImages:
        """A new TensorImages holding only ``indices`` (copied, so the parent can be freed)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return TensorImages(self.images[idx], self.targets[idx], self.classes)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB correctly.

    16-bit and 32-bit integer greys are scaled down (not clipped), transparency is composited on white, palette
    images keep their transparency, CMYK/YCbCr/LAB go through Pillow's converters.

    Example::

        to_rgb(Image.new("I;16", (2, 2), 65535)).getpixel((0, 0))  # (255, 255, 255)
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img).astype(np.float64)
        a = np.clip(a, 0, 65535) / 257.0  # 16-bit range -> 8-bit range (65535 / 257 = 255)
        return Image.fromarray(np.round(a).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        a = np.asarray(img).astype(np.float64)
        if np.nanmax(a) <= 1.0:  # float images in [0, 1]
            a = a * 255.0
        a = np.nan_to_num(np.clip(a, 0, 255))
        return Image.fromarray(np.round(a).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        if img.mode == "RGB":
            return img
        mode = "RGBA"
    if mode in ("LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        bg = Image.new("RGB", img.size, _WHITE)
        bg.paste(img, mask=img.getchannel("A"))
        return bg
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_rgb(path: str) -> Image.Image:
    """Open an image file, apply its EXIF orientation and return it as 8-bit RGB."""
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        return to_rgb(im)


class ImageFiles(Dataset):
    """Images on disk given as ``(path, target)`` pairs; items are ``(PIL RGB image, int)``.

    Example::

        ds = ImageFiles([("a.jpg", 0), ("b.png", 1)], ["cat", "dog"])
        img, y = ds[0]
    """

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str]) -> None:
        self.samples = [(str(p), int(t)) for p, t in samples]
        self.targets = [t for _, t in self.samples]
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        path, target = self.samples[i]
        return load_rgb(path), target

    def subset(self, indices: Sequence[int]) -> ImageFiles:
        return ImageFiles([self.samples[int(i)] for i in indices], self.classes)
