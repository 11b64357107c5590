"""Semantic-segmentation data: the built-in ``seg-shapes``, folder / Pascal VOC / CSV layouts, validation, loaders.

``build_seg_data`` mirrors ``visionkit.data.build_data``: one call turns a source into a ``SegBundle`` of
train/val/test datasets, with every image/mask pair checked once before training (``bad_images`` fail | skip).
``make_seg_loader`` gives a ``visionkit.data.loaders.Loader``: batch ``b`` of epoch ``e`` depends only on
(seed, e, b), so a run resumes mid-epoch exactly and several workers split each global batch.

Layouts understood (class ids are mask pixel values; 255 = ignore):

* ``DIR/{train,val,test}/{images,masks}/`` (train required) or ``DIR/images`` + ``DIR/masks`` (seeded split);
  images and masks pair by file stem (``a.jpg`` <-> ``a.png`` or ``a_mask.png``); ``DIR/classes.txt`` names the
  classes, one per line (line i = class id i), optionally followed by the class's mask colour ``r g b``;
* Pascal VOC: ``JPEGImages/``, ``SegmentationClass/`` (palette PNGs), ``ImageSets/Segmentation/{train,val}.txt``;
* a CSV file with the header ``image,mask`` (optional ``split`` column), paths relative to the CSV's folder.

Example::

    b = build_seg_data("seg-shapes")
    dl = make_seg_loader(b.train, batch_size=32, train=True, seed=0, device="cpu", input_size=(3, 64, 64),
                         mean=(0.5,) * 3, std=(0.5,) * 3, aug=AugConfig(preset="basic"))
    x, y = next(iter(dl.epoch(0)))  # float32 [32,3,64,64], int64 [32,64,64]
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

from visionkit.data.backgrounds import hsv_to_rgb, random_backgrounds
from visionkit.data.builtins import fingerprint_tensors, generate_chunks
from visionkit.data.datasets import load_rgb
from visionkit.data.errors import DataError
from visionkit.data.layout import (
    CSV_IMAGE_COLUMNS,
    IMAGE_EXTS,
    SPLIT_DIRS,
    csv_header,
    files_under,
    find_sub,
    note,
    read_csv_rows,
    self_or_only_child,
    subdirs,
    train_val_test,
    voc_split_lists,
)
from visionkit.data.loaders import Loader, SeededSamples, WorkerLoader
from visionkit.data.sources import check_build_options, size_stats
from visionkit.data.validate import check_all, check_image, check_oriented_image, fail_or_note_bad

from .transforms import IGNORE_INDEX, SegBatchAugment, build_seg_eval_transform, build_seg_train_transform

Palette = dict[tuple[int, int, int], int]  # mask colour -> class id (or the ignore index)

IMAGE_DIRS = ("images", "imgs")
MASK_DIRS = ("masks", "labels", "annotations")
MASK_SUFFIXES = ("_mask", "-mask", "_label", "-label", "_gt")
_LAYOUT_HINT = ("expected DIR/images + DIR/masks, DIR/train/{images,masks} (+ val/, test/), a Pascal VOC folder "
                "(JPEGImages/, SegmentationClass/, ImageSets/Segmentation/) or a CSV file with image,mask columns")

VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]
VOC_BOUNDARY = (224, 224, 192)  # the "void" outline colour of VOC masks saved as RGB


def voc_colormap(n: int = 256) -> list[tuple[int, int, int]]:
    """Pascal VOC's colour of class id ``i`` (the bit-interleaving map of the devkit).

    Example::

        voc_colormap()[15]  # (192, 128, 128): person
    """
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return out


# ---------------------------------------------------------------- bundle and datasets

@dataclass
class SegBundle:
    """Everything the engine needs to know about the segmentation data of one run (cf. ``DataBundle``)."""

    name: str  # built-in name or the path given
    classes: list[str]  # class id i = classes[i]
    train: Dataset
    val: Dataset | None
    test: Dataset | None
    in_chans: int = 3
    native_size: int | None = None  # 64 for seg-shapes; None for image files
    fingerprint: str = ""  # short sha256 of the tensor bytes (built-in) or of (relative path, size) (files)
    bad_files: list[dict] = field(default_factory=list)  # [{"path", "reason"}] skipped under bad_images="skip"
    ignore_index: int = IGNORE_INDEX
    palette: list[tuple[int, int, int]] | None = None  # a display colour per class (reports, overlays)
    image_sizes: list[tuple[int, int]] = field(default_factory=list, repr=False)  # (w, h) of kept files

    def splits(self) -> dict[str, Dataset]:
        return {k: v for k, v in (("train", self.train), ("val", self.val), ("test", self.test)) if v is not None}

    def summary(self) -> dict:
        """Per split: n images and each class's fraction of the labelled (non-ignore) pixels; image size stats.

        Example::

            build_seg_data("seg-shapes").summary()["splits"]["test"]["pixel_fraction"]["circle"]  # ~0.07
        """
        k = len(self.classes)
        out: dict = {"name": self.name, "task": "segmentation", "num_classes": k, "classes": list(self.classes),
                     "in_chans": self.in_chans, "native_size": self.native_size, "fingerprint": self.fingerprint,
                     "ignore_index": self.ignore_index, "splits": {}, "bad_files": len(self.bad_files)}
        for split, ds in self.splits().items():
            counts = ds.class_pixels(k).double()
            frac = (counts / counts.sum().clamp(min=1)).tolist()
            out["splits"][split] = {"n": len(ds), "pixel_fraction": {c: round(f, 5) for c, f in zip(self.classes, frac)}}
        if self.image_sizes:
            out["image_sizes"] = size_stats(self.image_sizes)
        return out


def _counts(masks: Tensor | np.ndarray, k: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Pixel count of each class id < k (ignore and out-of-range ids are not counted)."""
    m = torch.as_tensor(masks).reshape(-1).long()
    m = m[(m >= 0) & (m < k) & (m != ignore_index)]
    return torch.bincount(m, minlength=k)[:k]


class SegTensors(Dataset):
    """An in-memory segmentation set: uint8 images ``[N,3,H,W]`` and uint8 class-id masks ``[N,H,W]`` (255 =
    ignore). Items are ``(tv_tensors.Image uint8 [3,H,W], tv_tensors.Mask int64 [H,W])``.

    Example::

        ds = SegTensors(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, 8, 8, dtype=torch.uint8), ["bg"])
        img, mask = ds[0]
    """

    def __init__(self, images: Tensor, masks: Tensor, classes: Sequence[str]) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"SegTensors expects uint8 [N,C,H,W] images, got {images.dtype} {tuple(images.shape)}")
        if masks.dtype != torch.uint8 or masks.shape != (images.shape[0], *images.shape[2:]):
            raise ValueError(f"SegTensors expects uint8 masks [N,H,W] matching the images {tuple(images.shape)}, "
                             f"got {masks.dtype} {tuple(masks.shape)}")
        self.images, self.masks, self.classes = images.contiguous(), masks.contiguous(), list(classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        return tv_tensors.Image(self.images[i]), tv_tensors.Mask(self.masks[i].long())

    def subset(self, indices: Sequence[int] | Tensor) -> SegTensors:
        """A new SegTensors holding only ``indices`` (copied, so the parent can be freed)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return SegTensors(self.images[idx], self.masks[idx], self.classes)

    def class_pixels(self, k: int | None = None) -> Tensor:
        """Pixel count per class id (LongTensor [k])."""
        return _counts(self.masks, len(self.classes) if k is None else k)


class SegFiles(Dataset):
    """Image/mask file pairs; items are ``(tv_tensors.Image uint8 [3,H,W], tv_tensors.Mask int64 [H,W])``.

    Masks in mode P / L / I / 1 hold class ids; RGB masks are mapped through ``palette`` (colour -> id, or a list
    whose entry i is the colour of class i). ``pixel_counts`` (per sample, from validation) spares ``summary`` a
    second decoding.

    Example::

        ds = SegFiles([("a.jpg", "a.png")], ["background", "cat"])
        img, mask = ds[0]
    """

    def __init__(self, samples: Sequence[tuple[str, str]], classes: Sequence[str],
                 palette: Palette | Sequence[tuple[int, int, int]] | None = None,
                 pixel_counts: Sequence[np.ndarray] | None = None) -> None:
        self.samples = [(str(i), str(m)) for i, m in samples]
        self.classes = list(classes)
        self.palette = _as_palette(palette)
        self.pixel_counts = list(pixel_counts) if pixel_counts is not None else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        img_path, mask_path = self.samples[i]
        img = np.asarray(load_rgb(img_path))
        mask = read_mask(mask_path, self.palette)
        if mask.shape != img.shape[:2]:
            raise DataError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {img_path} is "
                            f"{img.shape[1]}x{img.shape[0]}; give masks of the image's size")
        return (tv_tensors.Image(torch.from_numpy(img.copy()).permute(2, 0, 1)),
                tv_tensors.Mask(torch.from_numpy(mask.astype(np.int64))))

    def subset(self, indices: Sequence[int]) -> SegFiles:
        counts = [self.pixel_counts[int(i)] for i in indices] if self.pixel_counts is not None else None
        return SegFiles([self.samples[int(i)] for i in indices], self.classes, self.palette, counts)

    def class_pixels(self, k: int | None = None) -> Tensor:
        """Pixel count per class id (LongTensor [k]); decodes every mask when validation did not count them."""
        k = len(self.classes) if k is None else k
        total = torch.zeros(k, dtype=torch.long)
        if self.pixel_counts is None:
            self.pixel_counts = [_bincount(read_mask(m, self.palette)) for _, m in self.samples]
        for c in self.pixel_counts:
            n = min(k, len(c))
            total[:n] += torch.from_numpy(np.asarray(c[:n], dtype=np.int64))
        return total


# ---------------------------------------------------------------- masks

class _BadMask(Exception):
    """A mask that cannot be turned into class ids; the message is the reason."""


def _as_palette(palette: Palette | Sequence[tuple[int, int, int]] | None) -> Palette | None:
    if palette is None:
        return None
    if isinstance(palette, dict):
        return {tuple(int(v) for v in k): int(c) for k, c in palette.items()}  # type: ignore[misc]
    return {tuple(int(v) for v in col): i for i, col in enumerate(palette)}  # type: ignore[misc]


def _decode_mask(path: str, palette: Palette | None) -> np.ndarray:
    """Class-id array [H, W] (int64) of one mask file; raises ``_BadMask`` with the reason."""
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
    mode = im.mode
    if mode in ("P", "L", "I", "1") or mode.startswith("I;16"):
        return np.asarray(im).astype(np.int64)
    if mode in ("LA", "PA"):
        return np.asarray(im)[..., 0].astype(np.int64)
    if mode not in ("RGB", "RGBA"):
        raise _BadMask(f"mask mode {mode} is not supported; save masks as palette (P), grey (L) or RGB PNGs")
    rgb = np.asarray(im)[..., :3].astype(np.int64)
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    uniq, inv = np.unique(code, return_inverse=True)
    if palette is None:
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
            return rgb[..., 0].copy()  # a grey mask saved as RGB
        raise _BadMask("RGB mask but no palette; save masks as palette/grey PNGs of class ids, or give each class's "
                       "colour in classes.txt (name r g b)")
    lut = np.empty(len(uniq), dtype=np.int64)
    for j, c in enumerate(uniq.tolist()):
        col = (c >> 16, (c >> 8) & 255, c & 255)
        if col not in palette:
            raise _BadMask(f"RGB mask colour {col} matches no palette entry")
        lut[j] = palette[col]
    return lut[inv].reshape(code.shape)


def read_mask(path: str, palette: Palette | Sequence[tuple[int, int, int]] | None = None) -> np.ndarray:
    """Class ids [H, W] (int64) of a mask file: P / L / I values as they are, RGB colours through ``palette``.

    Example::

        read_mask("masks/a.png")  # array([[0, 0, 1, ...], ...])
    """
    try:
        return _decode_mask(path, _as_palette(palette))
    except _BadMask as e:
        raise DataError(f"{path}: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DataError(f"cannot read mask {path} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                        f"fix or remove it") from None


def _bincount(ids: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    v = ids.reshape(-1)
    v = v[(v >= 0) & (v != ignore_index)]
    return np.bincount(v) if v.size else np.zeros(0, dtype=np.int64)


@dataclass
class _Checked:
    """Validation result of one image/mask pair."""

    size: tuple[int, int] | None = None  # (w, h) of the image
    counts: np.ndarray | None = None  # pixel count per class id
    bad: dict | None = None  # {"path", "reason"}


def _check_pair(img: str, mask: str, palette: Palette | None, num_classes: int | None,
                ignore_index: int) -> _Checked:
    size, reason = check_oriented_image(img)
    if reason:
        return _Checked(bad={"path": img, "reason": reason})
    _, reason = check_image(mask)
    if reason:
        return _Checked(bad={"path": mask, "reason": f"mask {reason}"})
    try:
        ids = _decode_mask(mask, palette)
    except _BadMask as e:
        return _Checked(bad={"path": mask, "reason": str(e)})
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        return _Checked(bad={"path": mask, "reason": f"mask unreadable ({str(e).splitlines()[0] if str(e) else e})"})
    h, w = ids.shape
    if (w, h) != size:
        return _Checked(bad={"path": mask, "reason": f"mask size {w}x{h} differs from image size {size[0]}x{size[1]}"})
    valid = ids[ids != ignore_index]
    if valid.size and valid.min() < 0:
        return _Checked(bad={"path": mask, "reason": f"negative class id {int(valid.min())}"})
    top = int(valid.max()) if valid.size else -1
    if num_classes is not None and top >= num_classes:
        return _Checked(bad={"path": mask, "reason": f"class id {top} >= {num_classes} classes (ids 0..{num_classes - 1}"
                                                     f", {ignore_index} = ignore)"})
    return _Checked(size=size, counts=_bincount(ids, ignore_index))


def validate_pairs(pairs: Sequence[tuple[str, str]], palette: Palette | None = None, num_classes: int | None = None,
                   ignore_index: int = IGNORE_INDEX, workers: int | None = None) -> list[_Checked]:
    """Decode-check every image and mask once (a thread pool for many pairs): size, mask size, class ids, palette.

    Example::

        [c.bad for c in validate_pairs([("a.jpg", "a.png")], num_classes=3)]  # [None] when all is well
    """
    def one(pair: tuple[str, str]) -> _Checked:
        return _check_pair(pair[0], pair[1], palette, num_classes, ignore_index)

    return check_all(one, pairs, workers)


# ---------------------------------------------------------------- built-in seg-shapes

SEG_SHAPES_CLASSES = ["background", "circle", "square", "triangle", "ring", "star"]
SEG_SHAPES_SIZE = 64
SEG_SHAPES_SPLITS = {"train": (2000, 101), "val": (300, 102), "test": (500, 103)}  # n, generation seed (fixed)
# hue centre of each shape's colour family (red, blue, green, orange, magenta) and its display colour
_SHAPE_HUES = (0.0, 0.62, 0.33, 0.11, 0.83)
SEG_SHAPES_PALETTE = [(0, 0, 0), (230, 40, 40), (40, 90, 230), (40, 200, 60), (240, 160, 30), (220, 50, 220)]
# the knobs that set how hard seg-shapes is (changing one changes the data set and its fingerprint)
_KNOBS = {"objects": (2, 3), "radius": (9.0, 22.0), "outlier_hue": 0.08, "bg_contrast": 0.7, "sat_min": 0.65,
          "triangle": 0.6, "star_valley": 0.5, "noise_texture": 0.3}


def _shape_and_texture(c: int, dx: Tensor, dy: Tensor, r: Tensor, rot: Tensor, period: Tensor, phase: Tensor,
                       noise: Tensor | None) -> tuple[Tensor, Tensor]:
    """Inside-mask and brightness factor of shape class ``c`` (1..5) for [m, h, w] offsets from the centres."""
    cos, sin = torch.cos(rot), torch.sin(rot)
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos  # object-local coordinates (textures turn with the object)
    rho = torch.sqrt(dx * dx + dy * dy)
    if c == 1:  # circle, stripes
        inside = rho < r
        tex = torch.where(torch.floor((v + phase) / period) % 2 == 0, 1.0, 0.45)
    elif c == 2:  # square, checker
        inside = torch.maximum(u.abs(), v.abs()) < r * 0.8
        tex = torch.where((torch.floor((u + phase) / period) + torch.floor((v + phase) / period)) % 2 == 0, 1.0, 0.45)
    elif c == 3:  # triangle, strong pixel noise
        inside = torch.ones_like(rho, dtype=torch.bool)
        for k in range(3):
            a = rot + math.pi / 2 + k * 2 * math.pi / 3
            inside &= dx * torch.cos(a) + dy * torch.sin(a) < r * _KNOBS["triangle"]
        amp = _KNOBS["noise_texture"]
        tex = 1 - amp + amp * noise if noise is not None else torch.ones_like(rho)
    elif c == 4:  # ring, solid
        inside = (rho - r * 0.7).abs() < r * 0.3
        tex = torch.ones_like(rho)
    else:  # five-pointed star, radial gradient
        t = ((torch.atan2(dy, dx) - rot) * (5 / (2 * math.pi))) % 1.0
        valley = _KNOBS["star_valley"]
        inside = rho < r * (valley + (1 - valley) * (2 * (t - 0.5)).abs())
        tex = (1.0 - 0.6 * rho / r).clamp(0.3, 1.0)
    return inside, tex


def make_seg_shapes(n: int, seed: int, size: int = SEG_SHAPES_SIZE, chunk: int = 500) -> tuple[Tensor, Tensor]:
    """``n`` RGB images (uint8 [n,3,S,S]) and masks (uint8 [n,S,S]) of the ``seg-shapes`` data set.

    2-3 objects per image (circle, square, triangle, ring, star; radius 9-22 px at 64 px, rotated, painted largest
    first so smaller ones often occlude larger ones, partly outside the frame at times) on crops of real photos
    (contrast lowered to 70 %, channels shuffled half the time). Each shape has a colour family (hue jittered, a
    random hue 8 % of the time) and its own texture: circle stripes, square checker, triangle pixel noise, ring
    solid, star radial gradient. Deterministic from ``seed``; ``_KNOBS`` holds the difficulty settings.

    Example::

        x, y = make_seg_shapes(8, seed=0)  # [8,3,64,64] uint8, [8,64,64] uint8 with ids 0..5
    """
    g = torch.Generator().manual_seed(seed)  # one generator through all chunks, in order
    parts = generate_chunks(n, chunk, lambda k, _: _seg_shapes_chunk(k, g, size))
    if not parts:
        return torch.empty(0, 3, size, size, dtype=torch.uint8), torch.empty(0, size, size, dtype=torch.uint8)
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def _seg_shapes_chunk(n: int, g: torch.Generator, size: int) -> tuple[Tensor, Tensor]:
    lo_n, slots = _KNOBS["objects"]
    r_lo, r_hi = _KNOBS["radius"]
    img = random_backgrounds(n, g, size, contrast=_KNOBS["bg_contrast"])
    label = torch.zeros(n, size, size, dtype=torch.uint8)
    count = torch.randint(lo_n, slots + 1, (n, 1), generator=g)
    active = torch.arange(slots)[None, :] < count
    scale = size / 64
    r_max = r_hi * scale
    radius = scale * torch.exp(math.log(r_lo) + math.log(r_hi / r_lo) * torch.rand(n, slots, generator=g))
    radius, _ = torch.sort(radius, dim=1, descending=True)  # largest first: small ones on top
    cls = torch.randint(1, 6, (n, slots), generator=g)
    cx, cy = (2 + torch.rand(n, slots, generator=g) * (size - 4) for _ in range(2))
    rot = torch.rand(n, slots, generator=g) * 2 * math.pi
    hue = torch.tensor(_SHAPE_HUES)[cls - 1] + (torch.rand(n, slots, generator=g) - 0.5) * 0.1
    hue = torch.where(torch.rand(n, slots, generator=g) < _KNOBS["outlier_hue"], torch.rand(n, slots, generator=g), hue) % 1.0
    sat = _KNOBS["sat_min"] + (1 - _KNOBS["sat_min"]) * torch.rand(n, slots, generator=g)
    val = 0.6 + 0.4 * torch.rand(n, slots, generator=g)
    colour = hsv_to_rgb(hue.flatten(), sat.flatten(), val.flatten()).view(n, slots, 3)
    period = torch.randint(3, 6, (n, slots), generator=g).float() * scale
    phase = torch.rand(n, slots, generator=g) * period
    # each object is drawn in a window around its centre (the largest radius fits), then its pixels pasted
    win = 2 * math.ceil(r_max) + 2
    offs = torch.arange(win) - win // 2
    for k in range(slots):
        for c in range(1, 6):
            i = torch.nonzero(active[:, k] & (cls[:, k] == c)).flatten()
            if not len(i):
                continue
            ox, oy, r, a, per, ph = (t[i, k].view(-1, 1, 1) for t in (cx, cy, radius, rot, period, phase))
            px = ox.floor().long() + offs.view(1, 1, win)  # [m, 1, win] image columns of the window
            py = oy.floor().long() + offs.view(1, win, 1)  # [m, win, 1] image rows
            noise = torch.rand(len(i), win, win, generator=g) if c == 3 else None
            inside, tex = _shape_and_texture(c, px + 0.5 - ox, py + 0.5 - oy, r, a, per, ph, noise)
            inside &= (px >= 0) & (px < size) & (py >= 0) & (py < size)
            j, wy, wx = inside.nonzero(as_tuple=True)
            gi, gy, gx = i[j], py[j, wy, 0], px[j, 0, wx]
            img[gi, :, gy, gx] = colour[gi, k] * tex[j, wy, wx][:, None]
            label[gi, gy, gx] = c
    img = img + (torch.rand(n, 1, size, size, generator=g) - 0.5) * 16  # sensor noise everywhere
    return img.round().clamp(0, 255).to(torch.uint8), label


@functools.lru_cache(maxsize=1)
def _seg_shapes_splits() -> dict[str, tuple[Tensor, Tensor]]:
    return {s: make_seg_shapes(n, seed) for s, (n, seed) in SEG_SHAPES_SPLITS.items()}


def _seg_shapes_bundle() -> SegBundle:
    parts = _seg_shapes_splits()
    classes = list(SEG_SHAPES_CLASSES)
    fp = fingerprint_tensors(*(t for pair in parts.values() for t in pair))
    ds = {s: SegTensors(x, y, classes) for s, (x, y) in parts.items()}
    return SegBundle("seg-shapes", classes, ds["train"], ds["val"], ds["test"], 3, SEG_SHAPES_SIZE, fp,
                     palette=list(SEG_SHAPES_PALETTE))


SEG_BUILTINS: dict[str, Callable[[], SegBundle]] = {"seg-shapes": _seg_shapes_bundle}


# ---------------------------------------------------------------- layouts

def _voc_root(folder: Path) -> Path | None:
    """``folder`` itself when it holds JPEGImages + SegmentationClass, or its only child that does (VOCdevkit)."""
    def is_voc(p: Path) -> bool:
        return (p / "JPEGImages").is_dir() and (p / "SegmentationClass").is_dir()

    return self_or_only_child(folder, is_voc)


def _split_dirs(folder: Path) -> dict[str, Path] | None:
    """{split: folder} for DIR/{train,val,test}/{images,masks}; None when DIR/train has no images + masks."""
    out: dict[str, Path] = {}
    for s in subdirs(folder):
        split = SPLIT_DIRS.get(s.lower())
        if split and find_sub(folder / s, IMAGE_DIRS) and find_sub(folder / s, MASK_DIRS):
            if split in out:
                raise DataError(f"{folder} has more than one {split} folder; keep one")
            out[split] = folder / s
    return out if "train" in out else None


def _layout(path: Path) -> tuple[str, Path] | None:
    """("voc" | "splits" | "flat" | "csv", root) for a segmentation source, None otherwise. Reads no image."""
    if path.is_file():
        if path.suffix.lower() != ".csv":
            return None
        head = csv_header(path)
        if head and "mask" in head and any(h in CSV_IMAGE_COLUMNS for h in head):
            return "csv", path
        return None
    if not path.is_dir():
        return None
    voc = _voc_root(path)
    if voc is not None:
        return "voc", voc
    if find_sub(path, IMAGE_DIRS) and find_sub(path, MASK_DIRS):
        return "flat", path
    if _split_dirs(path):
        return "splits", path
    return None


def is_segmentation_source(source: str | os.PathLike) -> bool:
    """True for a segmentation built-in or a path in one of the layouts of ``build_seg_data`` (decodes nothing).

    Example::

        is_segmentation_source("seg-shapes"), is_segmentation_source("photos/")  # (True, False) for class folders
    """
    src = str(source)
    if src.lower() in SEG_BUILTINS and not any(ch in src for ch in "/\\"):
        return True
    try:
        return _layout(Path(src).expanduser()) is not None
    except (OSError, DataError):
        return False


_COLOUR = re.compile(r"^(.*?)[\s,;:]+(\d{1,3})[\s,]+(\d{1,3})[\s,]+(\d{1,3})$")
_HEX = re.compile(r"^(.*?)[\s,;:]+#([0-9a-fA-F]{6})$")


def read_classes_file(path: Path) -> tuple[list[str], Palette | None]:
    """Class names (line i = class id i) and, when every line ends with a colour (``r g b`` or ``#rrggbb``), the
    palette of RGB masks.

    Example::

        read_classes_file(Path("classes.txt"))  # (["background", "road"], {(0, 0, 0): 0, (128, 64, 128): 1})
    """
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}; give a UTF-8 text file with one class name per line") from None
    while lines and not lines[-1].strip():
        lines.pop()
    names, colours = [], []
    for i, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line:
            raise DataError(f"{path} line {i} is empty; line i names class id i-1, so remove the blank line")
        m, h = _COLOUR.match(line), _HEX.match(line)
        if m and m.group(1).strip():
            col = tuple(int(v) for v in m.groups()[1:])
            if max(col) > 255:
                raise DataError(f"{path} line {i}: colour {col} out of 0..255")
            names.append(m.group(1).strip())
            colours.append(col)
        elif h and h.group(1).strip():
            names.append(h.group(1).strip())
            colours.append(tuple(int(h.group(2)[j:j + 2], 16) for j in (0, 2, 4)))
        else:
            names.append(line)
            colours.append(None)
    if len(names) < 2:
        raise DataError(f"{path} names {len(names)} class{'es' if len(names) != 1 else ''}; segmentation needs at "
                        f"least 2 (e.g. background and one object class)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"{path} repeats class name{'s' if len(dup) > 1 else ''} {', '.join(dup)}; give each once")
    given = [c is not None for c in colours]
    if any(given) and not all(given):
        raise DataError(f"{path}: some lines give a colour and some do not; give every class a colour (r g b) "
                        f"or none")
    return names, ({c: i for i, c in enumerate(colours)} if all(given) else None)  # type: ignore[misc]


def _key(p: Path, base: Path, strip_suffix: bool) -> str:
    rel = p.relative_to(base).with_suffix("").as_posix()
    if strip_suffix:
        for s in MASK_SUFFIXES:
            if rel.lower().endswith(s):
                return rel[: -len(s)]
    return rel


def _pair_folder(images: Path, masks: Path) -> tuple[list[tuple[str, str]], list[dict]]:
    """Pairs of ``images`` and ``masks`` by relative stem; images without mask / masks without image are bad."""
    bad: list[dict] = []
    imgs: dict[str, Path] = {}
    for p in files_under(images):
        k = _key(p, images, False)
        if k in imgs:
            bad.append({"path": str(p), "reason": f"another image has the same name stem ({imgs[k].name})"})
        else:
            imgs[k] = p
    msks: dict[str, Path] = {}
    for p in files_under(masks):
        k = _key(p, masks, False)
        if k not in imgs:
            k = _key(p, masks, True)
        if k in msks:
            bad.append({"path": str(p), "reason": f"another mask has the same name stem ({msks[k].name})"})
        else:
            msks[k] = p
    pairs = []
    for k, p in imgs.items():
        if k in msks:
            pairs.append((str(p), str(msks[k])))
        else:
            bad.append({"path": str(p), "reason": f"missing mask (no {k}.* in {masks})"})
    bad += [{"path": str(p), "reason": "mask without an image"} for k, p in msks.items() if k not in imgs]
    if not imgs:
        raise DataError(f"no images in {images} (looked for {', '.join(IMAGE_EXTS)}); add the images there")
    return pairs, bad


def _scan_voc(root: Path) -> tuple[dict[str, list[tuple[str, str]]], list[dict]]:
    sets = root / "ImageSets" / "Segmentation"
    jpeg, segm = root / "JPEGImages", root / "SegmentationClass"
    images = {p.stem: p for p in files_under(jpeg)}
    masks = {p.stem: p for p in files_under(segm)}
    lists = voc_split_lists(sets)
    if not lists["train"].is_file():
        raise DataError(f"{root} looks like Pascal VOC but has no {lists['train']}; add the list of training ids")
    splits: dict[str, list[tuple[str, str]]] = {}
    bad: list[dict] = []
    for split, f in lists.items():
        if not f.is_file():
            continue
        ids = [ln.split()[0] for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if split == "test" and not any(i in masks for i in ids):
            note(f"{f} lists no image with a mask in {segm}; no test split")
            continue
        pairs = []
        for i in ids:
            if i not in images:
                bad.append({"path": str(jpeg / f"{i}.jpg"), "reason": f"listed in {f} but not found"})
            elif i not in masks:
                bad.append({"path": str(images[i]), "reason": f"missing mask (no {i}.png in {segm})"})
            else:
                pairs.append((str(images[i]), str(masks[i])))
        splits[split] = pairs
    return splits, bad


def _scan_csv(path: Path) -> tuple[dict[str, list[tuple[str, str]]], list[dict]]:
    rows = read_csv_rows(path, "image,mask")
    head = [c.lower() for c in rows[0]] if rows else []
    ii = next((i for i, h in enumerate(head) if h in CSV_IMAGE_COLUMNS), None)
    mi = head.index("mask") if "mask" in head else None
    if ii is None or mi is None:
        raise DataError(f"CSV {path} needs a header with image and mask columns (image,mask); got "
                        f"{','.join(rows[0]) if rows else 'an empty file'}")
    si = head.index("split") if "split" in head else None
    base = path.parent
    splits: dict[str, list[tuple[str, str]]] = {}
    bad: list[dict] = []
    for line, r in enumerate(rows[1:], 2):
        if len(r) <= max(ii, mi, si or 0) or not r[ii] or not r[mi]:
            raise DataError(f"CSV {path} line {line}: expected image,mask, got {','.join(r)!r}; give both columns")
        split = SPLIT_DIRS.get(r[si].lower()) if si is not None else "train"
        if split is None:
            raise DataError(f"CSV {path} line {line}: split {r[si]!r} is not train, val or test")
        img, mask = (str(p if os.path.isabs(p) else base / p) for p in (r[ii], r[mi]))
        if not os.path.isfile(img):
            bad.append({"path": img, "reason": f"listed in {path.name} but not found"})
        elif not os.path.isfile(mask):
            bad.append({"path": img, "reason": f"missing mask ({mask} not found)"})
        else:
            splits.setdefault(split, []).append((img, mask))
    if not rows[1:]:
        raise DataError(f"CSV {path} has a header but no rows; give one image,mask row per image")
    splits.setdefault("train", [])
    return splits, bad


def _fingerprint_pairs(pairs: Sequence[tuple[str, str]], base: Path) -> str:
    h = hashlib.sha256()
    rows = sorted((os.path.relpath(i, base), os.path.relpath(m, base), os.path.getsize(i), os.path.getsize(m))
                  for i, m in pairs)
    for i, m, si, sm in rows:
        h.update(f"{i}\t{si}\t{m}\t{sm}\n".encode())
    return h.hexdigest()[:16]


def _from_files(source: str, path: Path, val_split: float, seed: int, bad_images: str) -> SegBundle:
    found = _layout(path)
    if found is None:
        raise DataError(f"{source} is not a segmentation data set: {_LAYOUT_HINT}")
    kind, root = found
    base = root.parent if kind == "csv" else root
    classes_file = base / "classes.txt"
    bad: list[dict] = []
    if kind == "voc":
        splits, bad = _scan_voc(root)
        voc_palette: Palette = {c: i for i, c in enumerate(voc_colormap(len(VOC_CLASSES)))}
        voc_palette[VOC_BOUNDARY] = IGNORE_INDEX
        classes, palette = list(VOC_CLASSES), voc_palette
    elif kind == "csv":
        splits, bad = _scan_csv(root)
        classes, palette = None, None
    else:
        dirs = _split_dirs(root) if kind == "splits" else {"train": root}
        splits = {}
        for split, d in dirs.items():  # type: ignore[union-attr]
            pairs, b = _pair_folder(find_sub(d, IMAGE_DIRS), find_sub(d, MASK_DIRS))  # type: ignore[arg-type]
            splits[split], bad = pairs, bad + b
        classes, palette = None, None
    if classes_file.is_file():
        classes, own = read_classes_file(classes_file)
        palette = own if own is not None else palette
    # Validate every pair once (all splits together so the thread pool stays busy).
    flat = [(s, p) for s, pairs in splits.items() for p in pairs]
    checked = validate_pairs([p for _, p in flat], palette, len(classes) if classes else None)
    bad += [c.bad for c in checked if c.bad is not None]
    fail_or_note_bad(bad, str(source), bad_images)
    kept = [(s, p, c) for (s, p), c in zip(flat, checked) if c.bad is None]
    if classes is None:
        top = max((len(c.counts) - 1 for _, _, c in kept), default=-1)
        if top < 1:
            raise DataError(f"the masks in {source} hold no class id other than 0 (and 255 = ignore); if 255 marks "
                            f"the objects, save them as 1 -- segmentation needs at least 2 classes")
        classes = [f"class_{i}" for i in range(top + 1)]
        note(f"no classes.txt in {base}; the masks hold class ids 0..{top}, named class_0..class_{top} (add "
              f"{classes_file} with one name per line to name them)")
    per_split = {s: SegFiles([p for s2, p, _ in kept if s2 == s], classes, palette,
                             [c.counts for s2, _, c in kept if s2 == s]) for s in splits}
    if not len(per_split.get("train", [])):
        raise DataError(f"no usable training image/mask pairs in {source}; fix the files listed with "
                        f"--bad-images fail")
    train, val, test = train_val_test(per_split, val_split, seed)
    fp = _fingerprint_pairs([p for _, p, _ in kept], base)
    display = [voc_colormap(len(classes))[i] for i in range(len(classes))]
    if palette is not None:
        for col, i in palette.items():
            if 0 <= i < len(classes):
                display[i] = col
    return SegBundle(str(source), list(classes), train, val, test, 3, None, fp, bad, IGNORE_INDEX, display,
                     [c.size for _, _, c in kept])


def build_seg_data(source: str | os.PathLike, *, val_split: float = 0.2, seed: int = 0,
                   bad_images: str = "fail") -> SegBundle:
    """Build segmentation train/val/test datasets from ``seg-shapes``, a folder layout, Pascal VOC or a CSV file.

    ``val_split`` and ``seed`` apply only to a source without its own val split (seg-shapes' splits are fixed).
    ``bad_images="skip"`` drops bad pairs (listed in ``bad_files``) instead of failing with one line naming them.

    Example::

        b = build_seg_data("seg-shapes")                          # train 2000 / val 300 / test 500, 64x64
        b = build_seg_data("VOCdevkit/VOC2012", bad_images="skip")
    """
    check_build_options(bad_images, val_split)
    src = str(source)
    if src.lower() in SEG_BUILTINS and not any(ch in src for ch in "/\\"):
        return SEG_BUILTINS[src.lower()]()
    path = Path(src).expanduser()
    if not path.exists():
        raise DataError(f"segmentation data not found: {src!r} is neither an existing path nor a built-in "
                        f"({', '.join(SEG_BUILTINS)})")
    try:
        return _from_files(src, path, val_split, seed, bad_images)
    except PermissionError as e:
        raise DataError(f"cannot read {e.filename}: permission denied; fix its permissions") from None


# ---------------------------------------------------------------- loaders

class SegTensorLoader(Loader):
    """Fast path: the whole uint8 set on ``device``; a batch is an index gather plus ``SegBatchAugment``."""

    def __init__(self, ds: SegTensors, *, input_size: tuple[int, int, int], mean: Sequence[float],
                 std: Sequence[float], aug, ignore_index: int = IGNORE_INDEX, **kw) -> None:
        super().__init__(len(ds), **kw)
        self.images = ds.images.to(self.device)
        self.masks = ds.masks.to(self.device)
        self.augment = SegBatchAugment(aug, mean, std, (input_size[1], input_size[2]), train=self.train,
                                       ignore_index=ignore_index)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        order = self.order(epoch).to(self.device)
        for b in range(start, len(self)):
            idx = order[self.part(b)]
            if not len(idx):  # evaluation on several workers: the last batch can be shorter than the world
                continue
            g = torch.Generator(device=self.device).manual_seed(self.batch_seed(epoch, b))
            x, y = self.augment(self.images.index_select(0, idx), self.masks.index_select(0, idx), g)
            yield self._finish(x, y)


class _JointTransform:
    """``(img, mask) -> (x, y)`` as plain tensors: one pair through the joint (tv_tensors) transform."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, sample: tuple) -> tuple[Tensor, Tensor]:
        x, y = self.transform(*sample)
        return x.as_subclass(Tensor), y.as_subclass(Tensor)


class SegFileLoader(WorkerLoader):
    """Image/mask files: each pair decoded and jointly transformed in the worker pool, seeded per position."""

    def __init__(self, ds: SegFiles, *, input_size: tuple[int, int, int], mean: Sequence[float],
                 std: Sequence[float], aug, workers: int | None, ignore_index: int = IGNORE_INDEX, **kw) -> None:
        super().__init__(len(ds), **kw)
        augment = self.train and aug is not None
        if augment:
            tf = build_seg_train_transform(aug, input_size, mean, std, ignore_index)
        else:
            tf = build_seg_eval_transform(input_size, mean, std)
        self.start_workers(SeededSamples(ds, _JointTransform(tf), self.seed, augment), workers)


def make_seg_loader(ds: Dataset, *, batch_size: int, train: bool, seed: int, device: torch.device | str,
                    input_size: tuple[int, int, int], mean: Sequence[float], std: Sequence[float], aug=None,
                    workers: int | None = None, channels_last: bool = False, rank: int = 0, world: int = 1,
                    drop_last: bool | None = None, ignore_index: int = IGNORE_INDEX) -> Loader:
    """A Loader of ``(x float32 [B,C,H,W] normalised, y int64 [B,H,W])`` batches for SegTensors or SegFiles.

    ``aug`` (an AugConfig; see ``visionkit.tasks.segment.transforms``) applies only when ``train``; eval loaders
    never shuffle, augment or drop batches and resize to ``input_size`` (masks nearest). Batch ``b`` of epoch ``e``
    depends only on (seed, e, b): ``list(dl.epoch(e, start=k)) == list(dl.epoch(e))[k:]``. ``rank``/``world``:
    this worker's part of every global batch (see ``visionkit.data.loaders.Loader``).

    Example::

        b = build_seg_data("seg-shapes")
        dl = make_seg_loader(b.val, batch_size=64, train=False, seed=0, device="cpu", input_size=(3, 64, 64),
                             mean=(0.5,) * 3, std=(0.5,) * 3)
    """
    kw = {"batch_size": batch_size, "train": train, "seed": seed, "device": torch.device(device),
          "channels_last": channels_last, "drop_last": drop_last, "sampler_weights": None, "rank": rank,
          "world": world}
    size = tuple(int(v) for v in input_size)
    if isinstance(ds, SegTensors):
        return SegTensorLoader(ds, input_size=size, mean=mean, std=std, aug=aug, ignore_index=ignore_index, **kw)
    if isinstance(ds, SegFiles):
        return SegFileLoader(ds, input_size=size, mean=mean, std=std, aug=aug, workers=workers,
                             ignore_index=ignore_index, **kw)
    raise TypeError(f"make_seg_loader expects SegTensors or SegFiles, got {type(ds).__name__}")


__all__ = ["SEG_BUILTINS", "SEG_SHAPES_CLASSES", "VOC_CLASSES", "SegBundle", "SegFiles", "SegTensors",
           "build_seg_data", "is_segmentation_source", "make_seg_loader", "make_seg_shapes", "read_classes_file",
           "read_mask", "validate_pairs", "voc_colormap"]
