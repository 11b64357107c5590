"""Object-detection data: the built-in ``det-shapes``, COCO / Pascal VOC / YOLO / CSV layouts, validation, loaders.

``build_det_data`` mirrors ``build_seg_data``: one call turns a source into a ``DetBundle`` of train/val/test
datasets, with every image and its boxes checked once before training (``bad_images`` fail | skip). Boxes partly
outside their image are clipped to it and boxes of zero or negative area dropped (both counted in a note line);
unknown classes, missing images, malformed annotations and unreadable images make a file bad.
``make_det_loader`` gives a ``visionkit.data.loaders.Loader``: batch ``b`` of epoch ``e`` depends only on
(seed, e, b), so a run resumes mid-epoch exactly and several workers split each global batch.

Layouts understood (class ids are contiguous 0..K-1, no background id; boxes are xyxy in image pixels):

* COCO JSON: ``DIR/annotations/*.json`` (split from the name: ``instances_train2017.json``, ``val.json``...) with
  the images in ``DIR/images/<split>/``, ``DIR/<split>/``, ``DIR/images/`` or ``DIR/``; Roboflow's
  ``DIR/{train,valid,test}/*.json`` next to the images; or one JSON file given directly (images beside it or in
  ``images/``). Category ids map to 0..K-1 in id order (``bundle.category_ids[i]`` is class i's id); ``iscrowd``
  objects are kept as difficult;
* Pascal VOC: ``Annotations/*.xml``, ``JPEGImages/``, ``ImageSets/Main/{train,val,test,trainval}.txt`` (optional:
  without them every XML is train); ``difficult`` kept; boxes ``xmin - 1, ymin - 1, xmax, ymax`` (VOC is 1-based);
  classes from ``classes.txt``, else VOC's 20 names when they cover the XMLs, else the names found, sorted;
* YOLO txt: ``DIR/images/{train,val,test}/`` + ``DIR/labels/{train,val,test}/`` (or flat ``images/`` + ``labels/``),
  or ``DIR/{train,valid,test}/{images,labels}/``; a line is ``class cx cy w h`` normalised to [0, 1] (a polygon
  ``class x1 y1 x2 y2 ...`` gives its extent); an image without a label file is a negative; names from
  ``data.yaml`` (``names:`` a list or ``{id: name}``) or ``classes.txt``;
* a CSV file with the header ``image,label,xmin,ymin,xmax,ymax`` (optional ``split`` column), one row per box,
  paths relative to the CSV's folder; a row with an empty label and box is an image without objects; a label is a
  class name or id (``classes.txt`` beside the CSV names the ids).

Annotations are read in the image's displayed orientation (after its EXIF rotation), as ``load_rgb`` decodes it.

Example::

    b = build_det_data("det-shapes")
    dl = make_det_loader(b.train, batch_size=32, train=True, seed=0, device="cpu", input_size=(3, 128, 128),
                         aug=AugConfig(preset="standard"))
    x, targets = next(iter(dl.epoch(0)))  # float32 [32,3,128,128] in [0, 1], [{"boxes", "labels", ...}] * 32
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.ops import box_convert, clip_boxes_to_image, remove_small_boxes

from visionkit.data.backgrounds import hsv_to_rgb, random_backgrounds
from visionkit.data.builtins import fingerprint_tensors, generate_chunks
from visionkit.data.collate import to_device
from visionkit.data.datasets import load_rgb
from visionkit.data.errors import DataError
from visionkit.data.layout import (
    CSV_IMAGE_COLUMNS,
    SPLIT_DIRS,
    csv_header,
    files_under,
    find_sub,
    is_hidden,
    note,
    read_csv_rows,
    self_or_only_child,
    subdirs,
    train_val_test,
    voc_split_lists,
)
from visionkit.data.loaders import Loader, SeededSamples, WorkerLoader, mix_seed
from visionkit.data.sources import check_build_options, size_stats
from visionkit.data.validate import check_all, check_oriented_image, fail_or_note_bad

from .transforms import DetBatchAugment, build_det_eval_transform, build_det_train_transform

_LAYOUT_HINT = ("expected COCO JSON (DIR/annotations/*.json or a .json file), Pascal VOC (Annotations/*.xml, "
                "JPEGImages/, ImageSets/Main/), YOLO txt (DIR/images + DIR/labels/*.txt, or DIR/train/{images,labels}"
                ") or a CSV file with image,label,xmin,ymin,xmax,ymax columns")
VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
_CSV_LABEL = ("label", "class", "category")
_CSV_BOX = ("xmin", "ymin", "xmax", "ymax")
MIN_AREA_SIDE = 1e-2  # boxes narrower or lower than this many pixels count as zero-area (dropped)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 'es' if word.endswith(('x', 's')) else 's'}"


def _target(boxes: Any, labels: Any, difficult: Any | None = None) -> dict[str, Tensor]:
    """A plain target dict: boxes float32 [N,4], labels int64 [N], difficult bool [N]."""
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
    lab = torch.as_tensor(np.asarray(labels, dtype=np.int64).reshape(-1))
    d = torch.zeros(len(lab), dtype=torch.bool) if difficult is None else \
        torch.as_tensor(np.asarray(difficult, dtype=bool).reshape(-1))
    return {"boxes": b, "labels": lab, "difficult": d}


def _sample(img: Tensor, t: dict[str, Tensor]) -> tuple[tv_tensors.Image, dict[str, Any]]:
    h, w = img.shape[-2:]
    return tv_tensors.Image(img), {"boxes": tv_tensors.BoundingBoxes(t["boxes"], format="XYXY", canvas_size=(h, w)),
                                   "labels": t["labels"], "difficult": t["difficult"]}


def class_palette(k: int) -> list[tuple[int, int, int]]:
    """``k`` distinct display colours (golden-ratio hue steps, bright and saturated).

    Example::

        class_palette(3)  # [(230, 46, 46), ...]
    """
    h = (torch.arange(k, dtype=torch.float64) * 0.618033988749895) % 1.0
    rgb = hsv_to_rgb(h.float(), torch.full((k,), 0.8), torch.full((k,), 0.9))
    return [tuple(int(v) for v in c) for c in rgb.round().to(torch.int64).tolist()]


# ---------------------------------------------------------------- bundle and datasets

@dataclass
class DetBundle:
    """Everything the engine needs to know about the detection data of one run (cf. ``SegBundle``)."""

    name: str  # built-in name or the path given
    classes: list[str]  # class id i = classes[i]
    train: Dataset
    val: Dataset | None
    test: Dataset | None
    native_size: int | None = None  # 128 for det-shapes; None for image files
    fingerprint: str = ""  # short sha256 of the tensors (built-in) or of (relative path, size, boxes) (files)
    bad_files: list[dict] = field(default_factory=list)  # [{"path", "reason"}] skipped under bad_images="skip"
    palette: list[tuple[int, int, int]] | None = None  # a display colour per class (reports, overlays)
    category_ids: list[int] | None = None  # COCO: the category id of class i (classes are ids in sorted order)
    in_chans: int = 3
    image_sizes: list[tuple[int, int]] = field(default_factory=list, repr=False)  # (w, h) of kept files

    def splits(self) -> dict[str, Dataset]:
        return {k: v for k, v in (("train", self.train), ("val", self.val), ("test", self.test)) if v is not None}

    def summary(self) -> dict:
        """Per split: n images, n objects, objects per class, difficult ones, images without objects, box sizes.

        Box sizes are the square root of the box area in pixels (min / median / max) and the COCO size buckets
        (small < 32^2 <= medium < 96^2 <= large), counted in the original images.

        Example::

            build_det_data("det-shapes").summary()["splits"]["train"]["objects"]  # ~5600
        """
        out: dict = {"name": self.name, "task": "detection", "num_classes": len(self.classes),
                     "classes": list(self.classes), "in_chans": self.in_chans, "native_size": self.native_size,
                     "fingerprint": self.fingerprint, "splits": {}, "bad_files": len(self.bad_files)}
        if self.category_ids is not None:
            out["category_ids"] = list(self.category_ids)
        for split, ds in self.splits().items():
            out["splits"][split] = _split_summary(ds.targets, self.classes)
        if self.image_sizes:
            out["image_sizes"] = size_stats(self.image_sizes)
        return out


def _split_summary(targets: Sequence[dict], classes: Sequence[str]) -> dict:
    k = len(classes)
    labels = torch.cat([t["labels"] for t in targets]) if targets else torch.zeros(0, dtype=torch.long)
    boxes = torch.cat([t["boxes"] for t in targets]) if targets else torch.zeros(0, 4)
    per = torch.bincount(labels, minlength=k)[:k].tolist() if len(labels) else [0] * k
    side = ((boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)).sqrt()
    out = {"n": len(targets), "objects": len(labels), "per_class": dict(zip(classes, per)),
           "difficult": int(sum(int(t["difficult"].sum()) for t in targets)),
           "negatives": sum(1 for t in targets if not len(t["labels"]))}
    if len(side):
        out["box_size"] = {"min": round(float(side.min()), 2), "median": round(float(side.median()), 2),
                           "max": round(float(side.max()), 2), "small": int((side < 32).sum()),
                           "medium": int(((side >= 32) & (side < 96)).sum()), "large": int((side >= 96).sum())}
    return out


class DetTensors(Dataset):
    """An in-memory detection set: uint8 images ``[N,3,H,W]`` and one target dict per image (plain tensors:
    ``boxes`` float32 [n,4] xyxy pixels, ``labels`` int64 [n], ``difficult`` bool [n]). Items are
    ``(tv_tensors.Image uint8 [3,H,W], {"boxes": tv_tensors.BoundingBoxes, "labels", "difficult"})``.

    Example::

        ds = DetTensors(torch.zeros(1, 3, 8, 8, dtype=torch.uint8),
                        [{"boxes": torch.tensor([[1., 1., 4., 4.]]), "labels": torch.tensor([0]),
                          "difficult": torch.tensor([False])}], ["thing"])
        img, target = ds[0]
    """

    def __init__(self, images: Tensor, targets: Sequence[dict], classes: Sequence[str]) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"DetTensors expects uint8 [N,3,H,W] images, got {images.dtype} {tuple(images.shape)}")
        if len(targets) != len(images):
            raise ValueError(f"DetTensors: {len(targets)} targets for {len(images)} images")
        self.images, self.classes = images.contiguous(), list(classes)
        self.targets = [_target(t["boxes"], t["labels"], t.get("difficult")) for t in targets]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        return _sample(self.images[i], self.targets[i])

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """(H, W) of every image."""
        return [tuple(self.images.shape[-2:])] * len(self)  # type: ignore[list-item]

    def subset(self, indices: Sequence[int] | Tensor) -> DetTensors:
        """A new DetTensors holding only ``indices`` (copied, so the parent can be freed)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return DetTensors(self.images.index_select(0, idx), [self.targets[int(i)] for i in idx], self.classes)


class DetFiles(Dataset):
    """Images on disk with their (validated) targets; items as ``DetTensors``' (decoded RGB, EXIF-transposed).
    ``targets`` lists every target without decoding an image (summaries, metrics).

    Example::

        ds = DetFiles(["a.jpg"], [{"boxes": torch.tensor([[1., 2., 30., 40.]]), "labels": torch.tensor([0])}],
                      ["cat"])
        img, target = ds[0]
    """

    def __init__(self, paths: Sequence[str], targets: Sequence[dict], classes: Sequence[str],
                 sizes: Sequence[tuple[int, int]] | None = None) -> None:
        if len(paths) != len(targets):
            raise ValueError(f"DetFiles: {len(targets)} targets for {len(paths)} images")
        self.paths = [str(p) for p in paths]
        self.targets = [_target(t["boxes"], t["labels"], t.get("difficult")) for t in targets]
        self.classes = list(classes)
        self._sizes = list(sizes) if sizes is not None else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        img = torch.from_numpy(np.asarray(load_rgb(self.paths[i])).copy()).permute(2, 0, 1)
        return _sample(img, self.targets[i])

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """(H, W) of every image (from validation; read from the file headers when not given)."""
        if self._sizes is None:
            self._sizes = []
            for p in self.paths:
                size, _ = check_oriented_image(p)
                self._sizes.append((size[1], size[0]) if size else (0, 0))
        return list(self._sizes)

    def subset(self, indices: Sequence[int]) -> DetFiles:
        sizes = [self._sizes[int(i)] for i in indices] if self._sizes is not None else None
        return DetFiles([self.paths[int(i)] for i in indices], [self.targets[int(i)] for i in indices],
                        self.classes, sizes)


# ---------------------------------------------------------------- built-in det-shapes

DET_SHAPES_CLASSES = ["circle", "square", "triangle", "ring", "cross"]
DET_SHAPES_SIZE = 128
DET_SHAPES_SPLITS = {"train": (2000, 201), "val": (300, 202), "test": (500, 203)}  # n, generation seed (fixed)
# hue centre of each shape's colour family (red, blue, green, orange, magenta) and its display colour
_DET_HUES = (0.0, 0.62, 0.33, 0.11, 0.83)
DET_SHAPES_PALETTE = [(230, 40, 40), (40, 90, 230), (40, 200, 60), (240, 160, 30), (220, 50, 220)]
_DET_CHUNK = 250  # images per independently seeded chunk (part of the data set's definition)
# the knobs that set how hard det-shapes is (changing one changes the data set and its fingerprint)
_DET_KNOBS = {"objects": 6, "negatives": 0.08, "distractors": 2, "distractor_p": 0.35, "extent": (8.0, 60.0),
              "min_visible": 0.4, "outlier_hue": 0.1, "bg_contrast": 0.8, "sat_min": 0.55, "noise": 16.0}


def _det_shape(c: int, dx: Tensor, dy: Tensor, r: Tensor, rot: Tensor, period: Tensor, phase: Tensor,
               noise: Tensor | None, aspect: Tensor) -> tuple[Tensor, Tensor]:
    """Inside-mask and brightness factor of shape ``c`` (0..4 the classes, -1 a distractor ellipse) for [m, h, w]
    offsets from the centres; ``r`` is the half-extent (the shape fits in a circle of radius r)."""
    cos, sin = torch.cos(rot), torch.sin(rot)
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos  # object-local coordinates (textures turn with the object)
    rho = torch.sqrt(dx * dx + dy * dy)
    if c == 0:  # circle, stripes
        inside = rho < r
        tex = torch.where(torch.floor((v + phase) / period) % 2 == 0, 1.0, 0.45)
    elif c == 1:  # square, checker
        inside = torch.maximum(u.abs(), v.abs()) < r * 0.72
        tex = torch.where((torch.floor((u + phase) / period) + torch.floor((v + phase) / period)) % 2 == 0, 1.0, 0.45)
    elif c == 2:  # triangle, pixel noise
        inside = torch.ones_like(rho, dtype=torch.bool)
        for k in range(3):
            a = rot + math.pi / 2 + k * 2 * math.pi / 3
            inside &= dx * torch.cos(a) + dy * torch.sin(a) < r * 0.5
        tex = 0.65 + 0.35 * noise if noise is not None else torch.ones_like(rho)
    elif c == 3:  # ring, solid
        inside = (rho - r * 0.7).abs() < r * 0.3
        tex = torch.ones_like(rho)
    elif c == 4:  # cross, radial gradient
        inside = ((u.abs() < r * 0.28) & (v.abs() < r * 0.95)) | ((v.abs() < r * 0.28) & (u.abs() < r * 0.95))
        tex = (1.0 - 0.6 * rho / r).clamp(0.3, 1.0)
    else:  # distractor: an elongated ellipse, solid
        inside = (u / r) ** 2 + (v / (r * aspect)) ** 2 < 1
        tex = torch.ones_like(rho)
    return inside, tex


def make_det_shapes(n: int, seed: int, size: int = DET_SHAPES_SIZE, workers: int | None = None
                    ) -> tuple[Tensor, list[dict]]:
    """``n`` RGB images (uint8 [n,3,S,S]) and their targets (``boxes`` xyxy pixels, ``labels``, ``difficult``) of
    the ``det-shapes`` data set.

    0 objects in 8 % of the images, else 1-6 (circle, square, triangle, ring, cross), each 8-60 px across at 128
    px (log-uniform: about 3 in 4 are COCO-small), rotated, partly outside the frame at times, plus up to 2
    unlabelled ellipses of a random colour; drawn in a random order, so later objects occlude earlier ones. A box is
    its object's full extent in the frame, occluded parts included; an object more than 60 % hidden is not drawn (no
    unlabelled fragments). Each shape has a colour family (hue jittered, a random hue 10 % of the time) and its own
    texture: circle stripes, square checker, triangle pixel noise, ring solid, cross radial gradient. Backgrounds
    are crops of scikit-image's photos. Deterministic from ``seed``; ``_DET_KNOBS`` holds the difficulty settings.
    Chunks of ``_DET_CHUNK`` images are seeded apart and generated in ``workers`` threads (default: up to 4), each
    with one intra-op thread, so the bytes do not depend on the machine.

    Example::

        x, targets = make_det_shapes(8, seed=0)  # [8,3,128,128] uint8, 8 dicts with boxes in 0..128
    """
    if n <= 0:
        return torch.empty(0, 3, size, size, dtype=torch.uint8), []
    workers = min(4, os.cpu_count() or 1) if workers is None else workers

    def one(k: int, c: int) -> tuple[Tensor, list[dict]]:
        return _det_shapes_chunk(k, torch.Generator().manual_seed(mix_seed(seed, c)), size)  # chunk c's own seed

    parts = generate_chunks(n, _DET_CHUNK, one, workers)
    return torch.cat([x for x, _ in parts]), [t for _, ts in parts for t in ts]


def _span(hit: Tensor) -> tuple[Tensor, Tensor]:
    """First index and last index + 1 of the True entries of each row of ``hit`` [m, w]."""
    w = hit.shape[1]
    return hit.float().argmax(dim=1), w - hit.flip(1).float().argmax(dim=1)


def _det_shapes_chunk(n: int, g: torch.Generator, size: int) -> tuple[Tensor, list[dict]]:
    kn = _DET_KNOBS
    n_obj, n_dis = kn["objects"], kn["distractors"]
    slots = n_obj + n_dis
    img = random_backgrounds(n, g, size, contrast=kn["bg_contrast"])
    count = torch.randint(1, n_obj + 1, (n, 1), generator=g)
    count = torch.where(torch.rand(n, 1, generator=g) < kn["negatives"], 0, count)
    active = torch.cat([torch.arange(n_obj)[None, :] < count,
                        torch.rand(n, n_dis, generator=g) < kn["distractor_p"]], dim=1)  # [n, slots]
    cls = torch.cat([torch.randint(0, len(DET_SHAPES_CLASSES), (n, n_obj), generator=g),
                     torch.full((n, n_dis), -1)], dim=1)
    scale = size / 128
    lo, hi = kn["extent"]
    radius = scale * 0.5 * torch.exp(math.log(lo) + math.log(hi / lo) * torch.rand(n, slots, generator=g))
    cx, cy = (radius * 0.5 + torch.rand(n, slots, generator=g) * (size - radius) for _ in range(2))
    rot = torch.rand(n, slots, generator=g) * 2 * math.pi
    fam = torch.tensor(_DET_HUES)[cls.clamp(min=0)] + (torch.rand(n, slots, generator=g) - 0.5) * 0.1
    rand_hue = torch.rand(n, slots, generator=g)
    hue = torch.where((torch.rand(n, slots, generator=g) < kn["outlier_hue"]) | (cls < 0), rand_hue, fam) % 1.0
    sat = kn["sat_min"] + (1 - kn["sat_min"]) * torch.rand(n, slots, generator=g)
    val = 0.55 + 0.45 * torch.rand(n, slots, generator=g)
    colour = hsv_to_rgb(hue.flatten(), sat.flatten(), val.flatten()).view(n, slots, 3)
    period = torch.randint(2, 6, (n, slots), generator=g).float() * max(scale, 0.5)
    phase = torch.rand(n, slots, generator=g) * period
    aspect = 0.3 + 0.3 * torch.rand(n, slots, generator=g)
    z = torch.argsort(torch.rand(n, slots, generator=g), dim=1)  # drawing order: slot z[:, j] is drawn j-th
    params = [torch.gather(t, 1, z) for t in (active, cls, radius, cx, cy, rot, period, phase, aspect)]
    active, cls, radius, cx, cy, rot, period, phase, aspect = params
    colour = torch.gather(colour, 1, z[:, :, None].expand(-1, -1, 3))
    # pass 1: every object's own pixels (in a window around its centre), its extent, and who is on top where
    owner = torch.full((n, size, size), -1, dtype=torch.int8)
    own = torch.zeros(n, slots)
    box = torch.zeros(n, slots, 4)
    painted: list[tuple[int, Tensor, Tensor, Tensor, Tensor]] = []  # (order j, image, row, col, rgb)
    r_max = float(radius.max()) if n else 1.0
    for j in range(slots):
        for c in range(-1, len(DET_SHAPES_CLASSES)):
            for small in (True, False):  # two window sizes: half the objects are small
                reach = min(r_max, 12 * scale) if small else r_max
                sel = active[:, j] & (cls[:, j] == c) & ((radius[:, j] <= 12 * scale) == small)
                i = torch.nonzero(sel).flatten()
                if not len(i):
                    continue
                win = 2 * math.ceil(reach) + 2
                offs = torch.arange(win) - win // 2
                ox, oy, r, a, per, ph, asp = (t[i, j].view(-1, 1, 1) for t in (cx, cy, radius, rot, period, phase,
                                                                                   aspect))
                px = ox.floor().long() + offs.view(1, 1, win)  # [m, 1, win] image columns of the window
                py = oy.floor().long() + offs.view(1, win, 1)  # [m, win, 1] image rows
                noise = torch.rand(len(i), win, win, generator=g) if c == 2 else None
                inside, tex = _det_shape(c, px + 0.5 - ox, py + 0.5 - oy, r, a, per, ph, noise, asp)
                inside &= (px >= 0) & (px < size) & (py >= 0) & (py < size)
                own[i, j] = inside.sum(dim=(1, 2)).float()
                (x1, x2), (y1, y2) = _span(inside.any(dim=1)), _span(inside.any(dim=2))  # window columns, rows
                x0, y0 = px[:, 0, 0], py[:, 0, 0]
                box[i, j] = torch.stack([x0 + x1, y0 + y1, x0 + x2, y0 + y2], dim=1).float()
                m, wy, wx = inside.nonzero(as_tuple=True)
                gi, gy, gx = i[m], py[m, wy, 0], px[m, 0, wx]
                owner[gi, gy, gx] = j
                painted.append((j, gi, gy, gx, colour[gi, j] * tex[m, wy, wx][:, None]))
    code = owner.view(n, -1).long().add_(1).add_((slots + 1) * torch.arange(n)[:, None])  # (image, owner + 1)
    visible = torch.bincount(code.flatten(), minlength=n * (slots + 1)).view(n, slots + 1)[:, 1:].float()
    keep = active & (own > 0) & ((visible >= kn["min_visible"] * own) | (cls < 0))
    # pass 2: paint what is kept, in drawing order (dropping an object only uncovers the ones under it)
    for j, gi, gy, gx, rgb in sorted(painted, key=lambda p: p[0]):
        k = keep[gi, j]
        img[gi[k], :, gy[k], gx[k]] = rgb[k]
    img += torch.rand(n, 1, size, size, generator=g).sub_(0.5).mul_(kn["noise"])  # sensor noise everywhere
    labelled = keep & (cls >= 0)
    targets = []
    for b in range(n):
        sel = labelled[b]
        targets.append(_target(box[b, sel], cls[b, sel]))
    return img.round_().clamp_(0, 255).to(torch.uint8), targets


@functools.lru_cache(maxsize=1)
def _det_shapes_splits() -> dict[str, tuple[Tensor, list[dict]]]:
    return {s: make_det_shapes(n, seed) for s, (n, seed) in DET_SHAPES_SPLITS.items()}


def _det_shapes_bundle() -> DetBundle:
    parts = _det_shapes_splits()
    classes = list(DET_SHAPES_CLASSES)
    flat = []
    for x, ts in parts.values():
        flat.append(x)
        flat += [torch.cat([t["boxes"], t["labels"][:, None].float()], dim=1) for t in ts]
    ds = {s: DetTensors(x, ts, classes) for s, (x, ts) in parts.items()}
    return DetBundle("det-shapes", classes, ds["train"], ds["val"], ds["test"], native_size=DET_SHAPES_SIZE,
                     fingerprint=fingerprint_tensors(*flat), palette=list(DET_SHAPES_PALETTE))


DET_BUILTINS: dict[str, Callable[[], DetBundle]] = {"det-shapes": _det_shapes_bundle}


# ---------------------------------------------------------------- layouts

def _split_of(name: str) -> str | None:
    """train / val / test from a file or folder name (``instances_val2017`` -> val, ``valid`` -> val)."""
    low = name.lower()
    if low in SPLIT_DIRS:
        return SPLIT_DIRS[low]
    for key in ("train", "val", "test"):
        if key in low:
            return key
    return None


def _looks_coco(path: Path) -> bool:
    """A .json file whose first MiB mentions COCO's "images" or "annotations" keys (decodes nothing else)."""
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            head = f.read(1 << 20)
    except OSError:
        return False
    return head.lstrip().startswith("{") and ('"images"' in head or '"annotations"' in head)


def _coco_jsons(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not is_hidden(p.name) and _looks_coco(p))
    except OSError:
        return []


def _txt_labels(folder: Path, limit: int = 50) -> bool:
    """A YOLO labels folder: its first ``limit`` files are .txt (classes.txt aside) and there is at least one."""
    seen = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        for f in sorted(filenames):
            if is_hidden(f) or f.lower() == "classes.txt":
                continue
            if not f.lower().endswith(".txt"):
                return False
            seen += 1
            if seen >= limit:
                return True
    return seen > 0


def _voc_root(folder: Path) -> Path | None:
    """``folder`` itself when it holds Annotations/*.xml + JPEGImages, or its only child that does (VOCdevkit)."""
    def is_voc(p: Path) -> bool:
        ann = p / "Annotations"
        return ann.is_dir() and (p / "JPEGImages").is_dir() and any(f.suffix.lower() == ".xml" for f in ann.iterdir())

    with contextlib.suppress(OSError):
        return self_or_only_child(folder, is_voc)
    return None


def _yolo_dirs(folder: Path) -> dict[str, tuple[Path, Path]] | None:
    """{split: (images, labels)} of a YOLO layout (labels holding .txt files), None otherwise."""
    images, labels = find_sub(folder, ("images",)), find_sub(folder, ("labels",))
    if images and labels and _txt_labels(labels):
        out: dict[str, tuple[Path, Path]] = {}
        for s in subdirs(images):
            split = SPLIT_DIRS.get(s.lower())
            if split and split not in out:
                out[split] = (images / s, labels / s)
        return out if "train" in out else {"train": (images, labels)}
    out = {}
    for s in subdirs(folder):
        split = SPLIT_DIRS.get(s.lower())
        if split is None or split in out:
            continue
        im, lb = find_sub(folder / s, ("images",)), find_sub(folder / s, ("labels",))
        if im and lb and _txt_labels(lb):
            out[split] = (im, lb)
    return out if "train" in out else None


def _coco_dirs(folder: Path) -> dict[str, Path] | None:
    """{split: json} of ``DIR/annotations/*.json`` or Roboflow's ``DIR/{train,valid,test}/*.json``."""
    ann = find_sub(folder, ("annotations",))
    files = _coco_jsons(ann) if ann else []
    if ann and files and not files_under(ann):  # no images among the annotations (segmentation masks live there)
        inst = [p for p in files if p.name.lower().startswith("instances_")]
        files = inst or files
        out: dict[str, Path] = {}
        for p in files:
            split = _split_of(p.stem) or ("train" if len(files) == 1 else None)
            if split is None:
                continue
            if split in out:
                raise DataError(f"{ann} has more than one {split} annotation file ({out[split].name}, {p.name}); "
                                f"keep one or give the JSON file itself")
            out[split] = p
        return out if "train" in out else None
    out = {}
    for s in subdirs(folder):
        split = SPLIT_DIRS.get(s.lower())
        js = _coco_jsons(folder / s) if split else []
        if split and len(js) == 1 and split not in out:
            out[split] = js[0]
    return out if "train" in out else None


def _layout(path: Path) -> tuple[str, Any] | None:
    """("coco", {split: json}) | ("voc", root) | ("yolo", root) | ("csv", file) for a detection source, else None.
    Reads no image and no annotation beyond a CSV header or the first MiB of a JSON file."""
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".json":
            return ("coco", {"train": path}) if _looks_coco(path) else None
        if suffix == ".csv":
            head = csv_header(path)
            if head and any(h in CSV_IMAGE_COLUMNS for h in head) and any(h in _CSV_LABEL for h in head) \
                    and all(b in head for b in _CSV_BOX):
                return "csv", path
            return None
        if suffix in (".yaml", ".yml") and _yolo_dirs(path.parent):
            return "yolo", path.parent
        return None
    if not path.is_dir():
        return None
    voc = _voc_root(path)
    if voc is not None:
        return "voc", voc
    coco = _coco_dirs(path)
    if coco:
        return "coco", coco
    if _yolo_dirs(path):
        return "yolo", path
    return None


def is_detection_source(source: str | os.PathLike) -> bool:
    """True for a detection built-in or a path in one of the layouts of ``build_det_data`` (decodes no image).

    Class folders (classification) and images + masks folders (segmentation) are not detection sources: a YOLO
    ``labels/`` folder must hold .txt files and a COCO ``annotations/`` folder JSON files without images.

    Example::

        is_detection_source("det-shapes"), is_detection_source("coco/")  # (True, True)
    """
    src = str(source)
    if src.lower() in DET_BUILTINS and not any(ch in src for ch in "/\\"):
        return True
    try:
        return _layout(Path(src).expanduser()) is not None
    except (OSError, DataError):
        return False


# ---------------------------------------------------------------- readers

@dataclass
class DetRecord:
    """One image and its annotation as a reader found it (before validation against the image)."""

    path: str
    boxes: np.ndarray  # float32 [n, 4] xyxy in pixels (normalised to [0, 1] when ``normalized``)
    labels: np.ndarray  # int64 [n]
    difficult: np.ndarray  # bool [n]
    normalized: bool = False  # YOLO: scaled by the image size during validation
    source: str = ""  # the annotation file (for messages)


def _record(path: str | Path, boxes: Sequence, labels: Sequence, difficult: Sequence | None = None,
            normalized: bool = False, source: str | Path = "") -> DetRecord:
    n = len(labels)
    return DetRecord(str(path), np.asarray(boxes, dtype=np.float32).reshape(n, 4),
                     np.asarray(labels, dtype=np.int64).reshape(n),
                     np.zeros(n, dtype=bool) if difficult is None else np.asarray(difficult, dtype=bool).reshape(n),
                     normalized, str(source))


Splits = dict[str, list[DetRecord]]


def read_classes_txt(path: Path) -> list[str]:
    """Class names, one per line (line i names class id i).

    Example::

        read_classes_txt(Path("classes.txt"))  # ["cat", "dog"]
    """
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}; give a UTF-8 text file with one class name per line") from None
    while lines and not lines[-1].strip():
        lines.pop()
    names = [ln.strip() for ln in lines]
    if not names or any(not n for n in names):
        raise DataError(f"{path} has an empty line or no names; line i names class id i-1, one name per line")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"{path} repeats class name{'s' if len(dup) > 1 else ''} {', '.join(dup)}; give each once")
    return names


def _coco_image_roots(json_path: Path, root: Path | None, split: str) -> list[Path]:
    """Where a COCO file's ``file_name`` may live, most specific first."""
    if root is None:  # a JSON file given directly (or Roboflow's split folders)
        base = json_path.parent
        return [base, base / "images", base.parent / "images", base.parent]
    split = _split_of(json_path.stem) or split  # a file given directly is "train" but may be named val
    out = []
    for d in (root / "images", root):
        out += [d / s for s in subdirs(d) if _split_of(s) == split and s.lower() not in ("annotations", "labels")]
    return out + [root / "images", root, json_path.parent]


def _read_coco(files: dict[str, Path], root: Path | None) -> tuple[Splits, list[dict], list[str], list[int]]:
    splits: Splits = {}
    bad: list[dict] = []
    cats: dict[int, str] | None = None
    raw: dict[str, tuple[Path, dict]] = {}
    for split, jp in files.items():
        try:
            with open(jp, encoding="utf-8-sig") as f:
                data = json.load(f)
            if not isinstance(data, dict) or not isinstance(data.get("images"), list):
                raise TypeError('no "images" list at the top level')
            these = {int(c["id"]): str(c["name"]) for c in data.get("categories") or []}
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            bad.append({"path": str(jp), "reason": f"malformed COCO JSON ({str(e).splitlines()[0]})"})
            continue
        if "annotations" not in data:
            note(f"{jp} has no annotations (an image list for a test server?); not used")
            continue
        if cats is None:
            cats = these
        elif these and these != cats:
            raise DataError(f"{jp} has other categories than {files['train'].name}; give every split the same "
                            f"categories list")
        raw[split] = (jp, data)
    if cats is None:
        return {"train": []}, bad, [], []
    ids = sorted(cats)
    if not ids:
        raise DataError(f"{files.get('train')} has no categories; a COCO file lists its classes under "
                        f'"categories": [{{"id": 1, "name": "cat"}}, ...]')
    to_class = {cid: i for i, cid in enumerate(ids)}
    for split, (jp, data) in raw.items():
        roots = _coco_image_roots(jp, root, split)
        images: dict[int, dict] = {}
        for im in data["images"]:
            try:
                images[int(im["id"])] = {"file": str(im["file_name"]), "boxes": [], "labels": [], "difficult": [],
                                         "bad": None}
            except (KeyError, TypeError, ValueError):
                bad.append({"path": str(jp), "reason": f"malformed image entry {str(im)[:60]} (needs id, file_name)"})
        for n, a in enumerate(data.get("annotations") or []):
            try:
                iid = int(a["image_id"])
            except (KeyError, TypeError, ValueError):
                bad.append({"path": str(jp), "reason": f"annotation #{n} has no image_id"})
                continue
            if iid not in images:
                bad.append({"path": str(jp), "reason": f"annotation #{n} names image id {iid}, not in images"})
                continue
            rec = images[iid]
            try:
                x, y, w, h = (float(v) for v in a["bbox"])
                cid = int(a["category_id"])
            except (KeyError, TypeError, ValueError):
                rec["bad"] = rec["bad"] or f"malformed annotation #{n} in {jp.name} (needs bbox x,y,w,h, category_id)"
                continue
            if cid not in to_class:
                rec["bad"] = rec["bad"] or f"category id {cid} (annotation #{n} in {jp.name}) is not in categories"
                continue
            rec["boxes"].append((x, y, x + w, y + h))
            rec["labels"].append(to_class[cid])
            rec["difficult"].append(bool(a.get("iscrowd", 0)))
        recs = []
        for rec in images.values():
            path = next((r / rec["file"] for r in roots if (r / rec["file"]).is_file()), None)
            if path is None:
                bad.append({"path": str(roots[0] / rec["file"]), "reason": f"missing image (listed in {jp.name}, "
                                                                          f"not found)"})
            elif rec["bad"]:
                bad.append({"path": str(path), "reason": rec["bad"]})
            else:
                recs.append(_record(path, rec["boxes"], rec["labels"], rec["difficult"], source=jp))
        splits[split] = recs
    splits.setdefault("train", [])
    return splits, bad, [cats[i] for i in ids], ids


def _parse_voc_xml(path: Path) -> list[tuple[str, tuple[float, float, float, float], bool]]:
    """[(name, (xmin - 1, ymin - 1, xmax, ymax), difficult)] of one VOC annotation; ValueError when malformed."""
    try:
        tree = ET.parse(path)
    except ET.ParseError as e:
        raise ValueError(f"malformed XML ({e})") from None
    out = []
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        if not name or bb is None:
            raise ValueError("malformed XML (an object without name or bndbox)")
        try:
            x1, y1, x2, y2 = (float(bb.findtext(k) or "nan") for k in _CSV_BOX)
            diff = int(float(obj.findtext("difficult") or 0)) != 0
        except ValueError:
            raise ValueError("malformed XML (a bndbox coordinate is not a number)") from None
        if any(math.isnan(v) for v in (x1, y1, x2, y2)):
            raise ValueError("malformed XML (a bndbox lacks xmin, ymin, xmax or ymax)")
        out.append((name, (x1 - 1, y1 - 1, x2, y2), diff))
    return out


def _read_voc(root: Path) -> tuple[Splits, list[dict], list[str]]:
    ann, jpeg, sets = root / "Annotations", root / "JPEGImages", root / "ImageSets" / "Main"
    xmls = {p.stem: p for p in files_under(ann, (".xml",))}
    images = {p.stem: p for p in files_under(jpeg)}
    lists = voc_split_lists(sets)
    bad: list[dict] = []
    ids: dict[str, list[str]] = {}
    if lists["train"].is_file():
        for split, f in lists.items():
            if f.is_file():
                ids[split] = [ln.split()[0] for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if "test" in ids and not any(i in xmls for i in ids["test"]):
            note(f"{lists['test']} lists no id with an annotation in {ann}; no test split")
            del ids["test"]
    else:
        ids["train"] = sorted(xmls)
    parsed: dict[str, list] = {}
    for split, lst in ids.items():
        for i in lst:
            if i in parsed:
                continue
            if i not in xmls:
                bad.append({"path": str(ann / f"{i}.xml"), "reason": f"listed in {lists[split].name} but not found"})
                continue
            try:
                parsed[i] = _parse_voc_xml(xmls[i])
            except (ValueError, OSError) as e:
                bad.append({"path": str(xmls[i]), "reason": str(e)})
    names = sorted({o[0] for objs in parsed.values() for o in objs})
    classes_file = root / "classes.txt"
    if classes_file.is_file():
        classes = read_classes_txt(classes_file)
    elif set(names) <= set(VOC_CLASSES):
        classes = list(VOC_CLASSES)
    else:
        classes = names
        note(f"no classes.txt in {root}; the XMLs name {len(names)} classes, numbered in sorted order (add "
              f"{classes_file} with one name per line to fix the order)")
    index = {c: k for k, c in enumerate(classes)}
    splits: Splits = {}
    for split, lst in ids.items():
        recs = []
        for i in lst:
            if i not in parsed:
                continue
            objs = parsed[i]
            unknown = next((o[0] for o in objs if o[0] not in index), None)
            if i not in images:
                bad.append({"path": str(xmls[i]), "reason": f"missing image (no {i}.* in {jpeg})"})
            elif unknown is not None:
                bad.append({"path": str(xmls[i]), "reason": f"class {unknown!r} is not in {classes_file.name}"})
            else:
                recs.append(_record(images[i], [o[1] for o in objs], [index[o[0]] for o in objs],
                                    [o[2] for o in objs], source=xmls[i]))
        splits[split] = recs
    return splits, bad, classes


def _yolo_names(root: Path) -> list[str] | None:
    for name in ("data.yaml", "dataset.yaml", "data.yml"):
        f = root / name
        if not f.is_file():
            continue
        import yaml
        try:
            data = yaml.safe_load(f.read_text(encoding="utf-8-sig")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise DataError(f"cannot read {f}: {str(e).splitlines()[0]}; give a YAML file with names: [...]") from None
        names = data.get("names") if isinstance(data, dict) else None
        if isinstance(names, dict):
            try:
                keyed = {int(k): str(v) for k, v in names.items()}
            except ValueError:
                raise DataError(f"{f}: names must map class ids to names ({{0: cat, 1: dog}})") from None
            if sorted(keyed) != list(range(len(keyed))):
                raise DataError(f"{f}: the class ids of names must be 0..{len(keyed) - 1}, got {sorted(keyed)}")
            return [keyed[i] for i in range(len(keyed))]
        if isinstance(names, list) and names:
            return [str(n) for n in names]
        raise DataError(f"{f} has no names list; add names: [cat, dog, ...] (class id i = names[i])")
    f = root / "classes.txt"
    return read_classes_txt(f) if f.is_file() else None


def _parse_yolo_txt(path: Path, k: int | None) -> tuple[list, list]:
    """(boxes xyxy normalised, class ids) of a YOLO label file; ValueError naming the first bad line."""
    boxes, labels = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        v = line.split()
        if not v:
            continue
        try:
            c, nums = float(v[0]), [float(x) for x in v[1:]]
        except ValueError:
            raise ValueError(f"line {n}: {line.strip()[:40]!r} is not numbers (class cx cy w h)") from None
        if c != int(c) or not all(math.isfinite(x) for x in nums) or not (len(nums) == 4 or
                                                                             (len(nums) >= 6 and len(nums) % 2 == 0)):
            raise ValueError(f"line {n}: expected class cx cy w h (or class x1 y1 x2 y2 ... for a polygon), got "
                             f"{line.strip()[:40]!r}")
        c = int(c)
        if c < 0 or (k is not None and c >= k):
            raise IndexError(f"line {n}: class id {c} outside 0..{(k or 1) - 1}")
        if len(nums) == 4:
            boxes.append(box_convert(torch.tensor([nums]), "cxcywh", "xyxy")[0].tolist())
        else:
            xs, ys = nums[0::2], nums[1::2]
            boxes.append([min(xs), min(ys), max(xs), max(ys)])
        labels.append(c)
    return boxes, labels


def _read_yolo(root: Path) -> tuple[Splits, list[dict], list[str]]:
    dirs = _yolo_dirs(root) or {}
    names = _yolo_names(root)
    k = len(names) if names is not None else None
    splits: Splits = {}
    bad: list[dict] = []
    top = -1
    for split, (images, labels) in dirs.items():
        if not labels.is_dir():  # (every image would pass for a negative)
            note(f"{images} has no labels folder {labels}; its {split} images are not used")
            continue
        imgs = {p.relative_to(images).with_suffix("").as_posix(): p for p in files_under(images)}
        txts = {p.relative_to(labels).with_suffix("").as_posix(): p for p in files_under(labels, (".txt",))
                if p.name.lower() != "classes.txt"}
        recs = []
        for key, p in imgs.items():
            lab = txts.get(key)
            if lab is None:
                recs.append(_record(p, [], [], normalized=True))  # YOLO: no label file = no objects
                continue
            try:
                boxes, ids = _parse_yolo_txt(lab, k)
            except IndexError as e:
                bad.append({"path": str(lab), "reason": f"{e} ({k} classes)"})
                continue
            except (ValueError, OSError, UnicodeDecodeError) as e:
                bad.append({"path": str(lab), "reason": f"malformed label file ({e})"})
                continue
            top = max([top, *ids])
            recs.append(_record(p, boxes, ids, normalized=True, source=lab))
        bad += [{"path": str(p), "reason": f"label file names a missing image (no {key}.* in {images})"}
                for key, p in txts.items() if key not in imgs]
        splits[split] = recs
    if names is None:
        names = [f"class_{i}" for i in range(top + 1)]
        note(f"no data.yaml or classes.txt in {root}; the labels hold class ids 0..{top}, named class_0.."
              f"class_{top} (add {root / 'data.yaml'} with names: [...] to name them)")
    return splits, bad, names


def _read_csv(path: Path) -> tuple[Splits, list[dict], list[str]]:
    rows = read_csv_rows(path, "image,label,xmin,ymin,xmax,ymax")
    head = [c.lower() for c in rows[0]] if rows else []
    ii = next((i for i, h in enumerate(head) if h in CSV_IMAGE_COLUMNS), None)
    li = next((i for i, h in enumerate(head) if h in _CSV_LABEL), None)
    if ii is None or li is None or not all(b in head for b in _CSV_BOX):
        raise DataError(f"CSV {path} needs the header image,label,xmin,ymin,xmax,ymax; got "
                        f"{','.join(rows[0]) if rows else 'an empty file'}")
    if not rows[1:]:
        raise DataError(f"CSV {path} has a header but no rows; give one image,label,xmin,ymin,xmax,ymax row per box")
    bi = [head.index(b) for b in _CSV_BOX]
    si = head.index("split") if "split" in head else None
    classes_file = path.parent / "classes.txt"
    classes = read_classes_txt(classes_file) if classes_file.is_file() else None
    width = max(ii, li, si or 0, *bi) + 1
    per: dict[str, dict] = {}  # image path -> {"split", "objs": [(label text, box)], "bad"}
    for line, r in enumerate(rows[1:], 2):
        r = r + [""] * (width - len(r))
        img = r[ii]
        if not img:
            raise DataError(f"CSV {path} line {line}: no image path; every row names its image")
        img = img if os.path.isabs(img) else str(path.parent / img)
        split = SPLIT_DIRS.get(r[si].lower() or "train") if si is not None else "train"
        if split is None:
            raise DataError(f"CSV {path} line {line}: split {r[si]!r} is not train, val or test")
        entry = per.setdefault(img, {"split": split, "objs": [], "bad": None})
        label, coords = r[li], [r[i] for i in bi]
        if not label and not any(coords):
            continue  # an image without objects
        try:
            box = tuple(float(c) for c in coords)
            if not label or not all(math.isfinite(v) for v in box):
                raise ValueError
        except ValueError:
            entry["bad"] = entry["bad"] or f"malformed CSV line {line} (expected label,xmin,ymin,xmax,ymax numbers, " \
                                           f"got {','.join([label, *coords])!r})"
            continue
        entry["objs"].append((label, box, line))
    labels = [o[0] for e in per.values() for o in e["objs"]]
    if classes is None:
        if labels and all(s.lstrip("-").isdigit() for s in labels):
            top = max(int(s) for s in labels)
            classes = [f"class_{i}" for i in range(top + 1)]
            note(f"no classes.txt beside {path}; its labels are class ids 0..{top}, named class_0..class_{top}")
        else:
            classes = sorted(set(labels))
    index = {c: k for k, c in enumerate(classes)}
    splits: Splits = {"train": []}
    bad: list[dict] = []
    for img, e in per.items():
        ids = []
        for label, _, line in e["objs"]:
            c = index.get(label)
            if c is None and label.lstrip("-").isdigit():
                c = int(label) if 0 <= int(label) < len(classes) else None
            if c is None:
                e["bad"] = e["bad"] or f"class {label!r} (CSV line {line}) is not one of the {len(classes)} classes"
                break
            ids.append(c)
        if not os.path.isfile(img):
            bad.append({"path": img, "reason": f"missing image (listed in {path.name}, not found)"})
        elif e["bad"]:
            bad.append({"path": img, "reason": e["bad"]})
        else:
            splits.setdefault(e["split"], []).append(_record(img, [o[1] for o in e["objs"]], ids, source=path))
    return splits, bad, classes


# ---------------------------------------------------------------- validation

@dataclass
class _Checked:
    """Validation result of one record."""

    size: tuple[int, int] | None = None  # (w, h) of the image as displayed
    target: dict | None = None
    bad: dict | None = None  # {"path", "reason"}
    clipped: int = 0
    dropped: int = 0


def _check_record(rec: DetRecord, k: int) -> _Checked:
    size, reason = check_oriented_image(rec.path)
    if reason:
        return _Checked(bad={"path": rec.path, "reason": reason})
    w, h = size  # type: ignore[misc]
    where = f" in {Path(rec.source).name}" if rec.source else ""
    if len(rec.labels) and (rec.labels.min() < 0 or rec.labels.max() >= k):
        bad = int(rec.labels[(rec.labels < 0) | (rec.labels >= k)][0])
        return _Checked(bad={"path": rec.path, "reason": f"class id {bad}{where} outside 0..{k - 1}"})
    boxes = torch.from_numpy(rec.boxes.copy())
    if not torch.isfinite(boxes).all():
        return _Checked(bad={"path": rec.path, "reason": f"a box{where} has a non-finite coordinate"})
    if rec.normalized:
        boxes = boxes * torch.tensor([w, h, w, h], dtype=torch.float32)
    clipped = clip_boxes_to_image(boxes, (h, w))
    keep = remove_small_boxes(clipped, MIN_AREA_SIDE)
    changed = (clipped != boxes).any(dim=1)
    t = _target(clipped[keep], rec.labels[keep.numpy()], rec.difficult[keep.numpy()])
    return _Checked(size=size, target=t, clipped=int(changed[keep].sum()), dropped=len(boxes) - len(keep))


def validate_records(records: Sequence[DetRecord], num_classes: int, workers: int | None = None) -> list[_Checked]:
    """Decode-check every image once (a thread pool for many) and its boxes against it: class ids in range, boxes
    clipped to the image, zero-area boxes dropped (both counted).

    Example::

        [c.bad for c in validate_records([_record("a.jpg", [[0, 0, 5, 5]], [0])], 1)]  # [None] when all is well
    """
    def one(rec: DetRecord) -> _Checked:
        return _check_record(rec, num_classes)

    return check_all(one, records, workers)


def _fingerprint_files(kept: Sequence[tuple[str, _Checked]], base: Path) -> str:
    h = hashlib.sha256()
    rows = []
    for path, c in kept:
        t = c.target
        ann = hashlib.sha256(t["boxes"].numpy().tobytes() + t["labels"].numpy().tobytes()
                             + t["difficult"].numpy().tobytes()).hexdigest()[:16]
        rows.append((os.path.relpath(path, base), os.path.getsize(path), ann))
    for rel, size, ann in sorted(rows):
        h.update(f"{rel}\t{size}\t{ann}\n".encode())
    return h.hexdigest()[:16]


def _from_files(source: str, path: Path, val_split: float, seed: int, bad_images: str) -> DetBundle:
    found = _layout(path)
    if found is None:
        raise DataError(f"{source} is not a detection data set: {_LAYOUT_HINT}")
    kind, where = found
    category_ids = None
    if kind == "coco":
        if path.is_dir():
            root = path if find_sub(path, ("annotations",)) else None
        else:  # DIR/annotations/x.json given directly: DIR holds the images
            root = path.parent.parent if path.parent.name.lower() == "annotations" else None
        splits, bad, classes, category_ids = _read_coco(where, root)
        base = root or (path if path.is_dir() else path.parent)
    elif kind == "voc":
        (splits, bad, classes), base = _read_voc(where), where
    elif kind == "yolo":
        (splits, bad, classes), base = _read_yolo(where), where
    else:
        (splits, bad, classes), base = _read_csv(where), where.parent
    if not classes and not bad:
        raise DataError(f"{source} names no classes and holds no boxes; give at least one annotated object")
    flat = [(s, r) for s, recs in splits.items() for r in recs]
    checked = validate_records([r for _, r in flat], max(len(classes), 1))
    bad += [c.bad for c in checked if c.bad is not None]
    fail_or_note_bad(bad, str(source), bad_images)
    kept = [(s, r, c) for (s, r), c in zip(flat, checked) if c.bad is None]
    for what, said in (("clipped", "partly outside the image: clipped to it"),
                       ("dropped", "of zero or negative area: dropped")):
        hit = [(r, getattr(c, what)) for _, r, c in kept if getattr(c, what)]
        if hit:
            note(f"{_plural(sum(n for _, n in hit), 'box')} {said} (first: {hit[0][0].path})")
    if not classes:
        raise DataError(f"no usable annotations in {source}; fix the files listed with --bad-images fail")
    per_split = {s: DetFiles([r.path for s2, r, _ in kept if s2 == s], [c.target for s2, _, c in kept if s2 == s],
                             classes, [(c.size[1], c.size[0]) for s2, _, c in kept if s2 == s]) for s in splits}
    if not len(per_split.get("train", [])):
        raise DataError(f"no usable training images in {source}; fix the files listed with --bad-images fail")
    train, val, test = train_val_test(per_split, val_split, seed)
    fp = _fingerprint_files([(r.path, c) for _, r, c in kept], base)
    return DetBundle(str(source), list(classes), train, val, test, native_size=None, fingerprint=fp, bad_files=bad,
                     palette=class_palette(len(classes)), category_ids=category_ids,
                     image_sizes=[c.size for _, _, c in kept])


def build_det_data(source: str | os.PathLike, *, val_split: float = 0.2, seed: int = 0,
                   bad_images: str = "fail") -> DetBundle:
    """Build detection train/val/test datasets from ``det-shapes``, COCO JSON, Pascal VOC, YOLO txt or a CSV file.

    ``val_split`` and ``seed`` apply only to a source without its own val split (det-shapes' splits are fixed).
    ``bad_images="skip"`` drops bad files (listed in ``bad_files``) instead of failing with one line naming them.

    Example::

        b = build_det_data("det-shapes")                     # train 2000 / val 300 / test 500, 128x128
        b = build_det_data("coco/", bad_images="skip")       # coco/annotations/instances_{train,val}2017.json
    """
    check_build_options(bad_images, val_split)
    src = str(source)
    if src.lower() in DET_BUILTINS and not any(ch in src for ch in "/\\"):
        return DET_BUILTINS[src.lower()]()
    path = Path(src).expanduser()
    if not path.exists():
        raise DataError(f"detection data not found: {src!r} is neither an existing path nor a built-in "
                        f"({', '.join(DET_BUILTINS)})")
    try:
        return _from_files(src, path, val_split, seed, bad_images)
    except PermissionError as e:
        raise DataError(f"cannot read {e.filename}: permission denied; fix its permissions") from None


# ---------------------------------------------------------------- loaders

def collate_detection(batch: Sequence[tuple[Tensor, dict]]) -> tuple[Tensor, list[dict]]:
    """Samples of equal image size -> ``(images stacked [B,3,S,S], targets as a list)`` (picklable, for workers).

    Example::

        x, targets = collate_detection([(torch.zeros(3, 8, 8), {"boxes": torch.zeros(0, 4)})] * 2)
    """
    return torch.stack([x for x, _ in batch]), [t for _, t in batch]


def _input_hw(input_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(input_size, int):
        return input_size, input_size
    s = tuple(int(v) for v in input_size)
    if len(s) == 3 and s[0] != 3:
        raise ValueError(f"detection input must have 3 channels, got input_size {s}")
    return s[-2], s[-1]


class DetTensorLoader(Loader):
    """Fast path: the whole uint8 set on ``device``; a batch is an index gather plus ``DetBatchAugment`` (a
    batched resize at evaluation)."""

    def __init__(self, ds: DetTensors, *, input_size: tuple[int, int], aug, **kw) -> None:
        super().__init__(len(ds), **kw)
        self.images = ds.images.to(self.device)
        h, w = ds.images.shape[-2:]
        self.targets = [dict(t, orig_size=torch.tensor([h, w])) for t in ds.targets]
        self.augment = DetBatchAugment(aug, input_size, train=self.train)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, list[dict]]]:
        order = self.order(epoch)
        for b in range(start, len(self)):
            idx = order[self.part(b)]
            if not len(idx):  # evaluation on several workers: the last batch can be shorter than the world
                continue
            g = torch.Generator(device=self.device).manual_seed(self.batch_seed(epoch, b))
            targets = to_device([self.targets[int(i)] for i in idx], self.device)
            x, y = self.augment(self.images.index_select(0, idx.to(self.device)), targets, g)
            yield self._finish(x, y)  # type: ignore[arg-type]


class _DetJointTransform:
    """``(img, target) -> (x, target)`` with plain tensors: one sample through the joint (tv_tensors) transform,
    plus ``orig_size`` = (H, W) of the image before it."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, sample: tuple) -> tuple[Tensor, dict]:
        img, target = sample
        h, w = img.shape[-2:]
        x, t = self.transform(img, target)
        return x.as_subclass(Tensor), {"boxes": t["boxes"].as_subclass(Tensor).float(), "labels": t["labels"],
                                       "difficult": t["difficult"], "orig_size": torch.tensor([h, w])}


class DetFileLoader(WorkerLoader):
    """Image files: each sample decoded and jointly transformed in the worker pool, seeded per position; images are
    stacked and targets kept as a list (``collate_detection``)."""

    def __init__(self, ds: DetFiles, *, input_size: tuple[int, int], aug, workers: int | None, **kw) -> None:
        super().__init__(len(ds), **kw)
        augment = self.train and aug is not None
        tf = build_det_train_transform(aug, input_size) if augment else build_det_eval_transform(input_size)
        self.start_workers(SeededSamples(ds, _DetJointTransform(tf), self.seed, augment), workers, collate_detection)


def make_det_loader(ds: Dataset, *, batch_size: int, train: bool, seed: int, device: torch.device | str,
                    input_size: int | Sequence[int], aug=None, workers: int | None = None, channels_last: bool = False,
                    rank: int = 0, world: int = 1, drop_last: bool | None = None) -> Loader:
    """A Loader of ``(x float32 [B,3,S,S] in [0, 1], targets)`` batches for DetTensors or DetFiles.

    ``targets`` is a list of B dicts: ``boxes`` float32 [N,4] xyxy in pixels of the S x S input, ``labels`` int64
    [N], ``difficult`` bool [N], ``orig_size`` int64 [2] = (H, W) of the original image; all on ``device``.
    ``aug`` (an AugConfig; see ``visionkit.tasks.detect.transforms``) applies only when ``train``; eval loaders
    never shuffle, augment or drop batches and stretch-resize to ``input_size``. Batch ``b`` of epoch ``e``
    depends only on (seed, e, b): ``list(dl.epoch(e, start=k)) == list(dl.epoch(e))[k:]``. ``rank``/``world``:
    this worker's part of every global batch (see ``visionkit.data.loaders.Loader``).

    Example::

        b = build_det_data("det-shapes")
        dl = make_det_loader(b.val, batch_size=64, train=False, seed=0, device="cpu", input_size=(3, 128, 128))
    """
    kw = {"batch_size": batch_size, "train": train, "seed": seed, "device": torch.device(device),
          "channels_last": channels_last, "drop_last": drop_last, "sampler_weights": None, "rank": rank,
          "world": world}
    size = _input_hw(input_size)
    if isinstance(ds, DetTensors):
        return DetTensorLoader(ds, input_size=size, aug=aug, **kw)
    if isinstance(ds, DetFiles):
        return DetFileLoader(ds, input_size=size, aug=aug, workers=workers, **kw)
    raise TypeError(f"make_det_loader expects DetTensors or DetFiles, got {type(ds).__name__}")


__all__ = ["DET_BUILTINS", "DET_SHAPES_CLASSES", "DET_SHAPES_PALETTE", "VOC_CLASSES", "DetBundle", "DetFiles",
           "DetRecord", "DetTensors", "build_det_data", "class_palette", "collate_detection", "is_detection_source",
           "make_det_loader", "make_det_shapes", "read_classes_txt", "validate_records"]
