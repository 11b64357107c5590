"""Real-photo backgrounds for the built-in generated data sets (``seg-shapes``, ``det-shapes``), offline.

The photos are the samples bundled with scikit-image, read straight from its package folder (never a download).
``random_backgrounds`` crops, flips, recolours and resamples them with every random number drawn from the
``torch.Generator`` passed in, so a data set built on them is a pure function of its seed.

Example::

    g = torch.Generator().manual_seed(0)
    bg = random_backgrounds(8, g, 64)  # float32 [8, 3, 64, 64] in about 0..255
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .errors import DataError

# photos bundled with scikit-image (read straight from its package folder: never a download)
PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "camera.png", "coins.png", "moon.png",
          "page.png", "brick.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
          "motorcycle_left.png")
PHOTO_SIDE = 128  # photos are stored with this shorter side; backgrounds are crops of 40-128 px of them


@functools.lru_cache(maxsize=1)
def photo_bank() -> tuple[Tensor, ...]:
    """The background photos as float32 [3, h, w] tensors (grey ones repeated to RGB), shorter side 128 px.

    Example::

        [tuple(p.shape) for p in photo_bank()][:2]  # [(3, 128, 128), (3, 128, 170)]
    """
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the built-in data sets paste their shapes on scikit-image's sample photos: "
                        "pip install scikit-image")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    out = []
    for name in PHOTOS:
        try:
            with Image.open(folder / name) as im:
                im = im.convert("RGB")
                s = PHOTO_SIDE / min(im.size)
                im = im.resize((round(im.size[0] * s), round(im.size[1] * s)), Image.Resampling.BOX)
                out.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float())
        except OSError:
            raise DataError(f"scikit-image's sample photo {folder / name} is missing or unreadable; reinstall "
                            f"scikit-image") from None
    return tuple(out)


def hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """[n] hue/saturation/value in [0, 1] -> [n, 3] RGB in [0, 255].

    Example::

        hsv_to_rgb(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([1.0]))  # [[255., 0., 0.]]
    """
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=1)
    f = v[:, None] - v[:, None] * s[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return f * 255


def random_backgrounds(n: int, g: torch.Generator, size: int, contrast: float = 1.0) -> Tensor:
    """``n`` random crops (40-128 px of a photo, random flip, channel order shuffled half the time, gain 0.75-1.25)
    of the photos, resampled to ``size`` x ``size``: float32 [n, 3, size, size] in about 0..255. ``contrast`` < 1
    pulls each background towards its mean colour (objects pasted on it stand out more).

    Example::

        bg = random_backgrounds(4, torch.Generator().manual_seed(0), 128, contrast=0.8)
    """
    bank = photo_bank()
    which = torch.randint(len(bank), (n,), generator=g)
    side = 40 + torch.rand(n, generator=g) * (PHOTO_SIDE - 40)
    fx, fy = torch.rand(n, generator=g), torch.rand(n, generator=g)
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    perm_id = torch.randint(6, (n,), generator=g)
    swap = torch.rand(n, generator=g) < 0.5
    gain = 0.75 + 0.5 * torch.rand(n, generator=g)
    base = (torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1  # pixel centres in [-1, 1]
    out = torch.empty(n, 3, size, size)
    for p, photo in enumerate(bank):
        idx = torch.nonzero(which == p).flatten()
        if not len(idx):
            continue
        _, ph, pw = photo.shape
        sx, sy = side[idx] / pw, side[idx] / ph  # crop half-extent in normalised coordinates
        gx = (sx * flip[idx])[:, None] * base + ((2 * fx[idx] - 1) * (1 - sx))[:, None]  # [m, size]
        gy = sy[:, None] * base + ((2 * fy[idx] - 1) * (1 - sy))[:, None]
        grid = torch.stack([gx[:, None, :].expand(-1, size, -1), gy[:, :, None].expand(-1, -1, size)], dim=-1)
        out[idx] = F.grid_sample(photo.expand(len(idx), -1, -1, -1), grid, mode="bilinear", align_corners=False)
    perms = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])
    order = torch.where(swap[:, None], perms[perm_id], perms[0]) + 3 * torch.arange(n)[:, None]
    out = out.view(n * 3, size, size).index_select(0, order.flatten()).view(n, 3, size, size)
    if contrast != 1.0:  # towards each image's mean colour (in place: these tensors are large)
        mean = out.mean(dim=(2, 3), keepdim=True)
        out.sub_(mean).mul_(contrast).add_(mean)
    return out.mul_(gain.view(n, 1, 1, 1))


__all__ = ["PHOTOS", "PHOTO_SIDE", "hsv_to_rgb", "photo_bank", "random_backgrounds"]
