"""Segmentation data: seg-shapes, loaders (determinism, resume, rank split), joint transforms, file layouts and
the bad-file policy. Everything runs on a handful of tiny images."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from visionkit.config import AugConfig
from visionkit.data.errors import DataError
from visionkit.tasks.segment import data as seg_data
from visionkit.tasks.segment.data import (
    SEG_BUILTINS,
    SEG_SHAPES_CLASSES,
    VOC_CLASSES,
    SegFiles,
    SegTensors,
    build_seg_data,
    is_segmentation_source,
    make_seg_loader,
    make_seg_shapes,
    read_mask,
    voc_colormap,
)
from visionkit.tasks.segment.transforms import SegBatchAugment, build_seg_eval_transform, build_seg_train_transform

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


# ---------------------------------------------------------------- helpers

def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode).save(path)


def _pair(root, stem, h=12, w=16, cls=1, split=None, mask_array=None):
    """A random image and a mask with a ``cls`` rectangle, under root/[split/]{images,masks}/."""
    base = root / split if split else root
    rng = np.random.default_rng(list(stem.encode()))
    _png(base / "images" / f"{stem}.png", rng.integers(0, 256, (h, w, 3)))
    m = np.zeros((h, w), np.uint8)
    m[2:6, 3:9] = cls
    _png(base / "masks" / f"{stem}.png", m if mask_array is None else mask_array)


def _flat(root, n=5, classes=("background", "cat", "dog")):
    for i in range(n):
        _pair(root, f"im{i}", cls=1 + i % 2)
    if classes:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def _voc(root, ids_train=("a", "b", "c"), ids_val=("d",), extra_listed=()):
    for i in (*ids_train, *ids_val):
        rng = np.random.default_rng(ord(i[0]))
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
        m = np.zeros((10, 14), np.uint8)
        m[2:7, 2:9] = 15  # person
        m[1, :] = 255  # boundary
        im = Image.fromarray(m, "P")
        im.putpalette([v for c in voc_colormap() for v in c])
        (root / "SegmentationClass").mkdir(exist_ok=True)
        im.save(root / "SegmentationClass" / f"{i}.png")
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "train.txt").write_text("\n".join((*ids_train, *extra_listed)) + "\n")
    (sets / "val.txt").write_text("\n".join(ids_val) + "\n")
    return root


def _batches_equal(a, b):
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


# ---------------------------------------------------------------- built-in

def test_seg_shapes_deterministic_and_valid():
    x, y = make_seg_shapes(6, seed=3)
    x2, y2 = make_seg_shapes(6, seed=3)
    assert x.shape == (6, 3, 64, 64) and y.shape == (6, 64, 64) and x.dtype == y.dtype == torch.uint8
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(make_seg_shapes(6, seed=4)[0], x)
    assert int(y.max()) < len(SEG_SHAPES_CLASSES) and all(bool((m > 0).any()) for m in y)
    assert "seg-shapes" in SEG_BUILTINS and is_segmentation_source("seg-shapes")


def test_seg_shapes_bundle(monkeypatch):
    assert {k: n for k, (n, _) in seg_data.SEG_SHAPES_SPLITS.items()} == {"train": 2000, "val": 300, "test": 500}
    # the real sizes take a few seconds to generate: the same code path on a few images
    monkeypatch.setattr(seg_data, "SEG_SHAPES_SPLITS", {"train": (24, 101), "val": (6, 102), "test": (8, 103)})
    seg_data._seg_shapes_splits.cache_clear()
    try:
        b = build_seg_data("seg-shapes", seed=7)  # splits are fixed: the run seed does not change the data
        assert (len(b.train), len(b.val), len(b.test)) == (24, 6, 8) and isinstance(b.train, SegTensors)
        assert b.classes == SEG_SHAPES_CLASSES and b.native_size == 64 and b.in_chans == 3 and b.ignore_index == 255
        seg_data._seg_shapes_splits.cache_clear()
        assert build_seg_data("seg-shapes", seed=0).fingerprint == b.fingerprint
        s = b.summary()
        frac = s["splits"]["test"]["pixel_fraction"]
        assert s["splits"]["val"]["n"] == 6 and abs(sum(frac.values()) - 1) < 1e-3
        assert all(f > 0 for f in s["splits"]["train"]["pixel_fraction"].values())
    finally:
        seg_data._seg_shapes_splits.cache_clear()


# ---------------------------------------------------------------- loaders

def _tensor_loader(ds, **kw):
    args = {"batch_size": 4, "train": True, "seed": 1, "device": "cpu", "input_size": (3, 64, 64), "mean": MEAN,
            "std": STD, "aug": AugConfig(preset="standard")}
    return make_seg_loader(ds, **{**args, **kw})


def test_tensor_loader_deterministic_resume_and_rank_split():
    ds = SegTensors(*make_seg_shapes(10, seed=0), SEG_SHAPES_CLASSES)
    dl = _tensor_loader(ds)
    rng_before = torch.random.get_rng_state()
    full = list(dl.epoch(2))
    assert torch.equal(rng_before, torch.random.get_rng_state())  # the global RNG is never used
    assert len(full) == 2 and full[0][0].shape == (4, 3, 64, 64) and full[0][1].dtype == torch.int64
    assert _batches_equal(list(dl.epoch(2, start=1)), full[1:])
    assert _batches_equal(list(_tensor_loader(ds).epoch(2)), full)
    assert not torch.equal(next(iter(dl.epoch(3)))[0], full[0][0])
    # two workers: the union of their parts of batch b is the single-process batch b (no augmentation to compare)
    one = list(_tensor_loader(ds, aug=None).epoch(0))
    parts = [list(_tensor_loader(ds, aug=None, rank=r, world=2).epoch(0)) for r in (0, 1)]
    for b, (x, y) in enumerate(one):
        assert torch.equal(torch.cat([parts[0][b][0], parts[1][b][0]]), x)
        assert torch.equal(torch.cat([parts[0][b][1], parts[1][b][1]]), y)
    ev = list(_tensor_loader(ds, train=False, input_size=(3, 32, 32)).epoch(0))
    assert sum(len(x) for x, _ in ev) == 10 and ev[0][0].shape[-2:] == (32, 32) and int(ev[0][1].max()) < 6


def _asymmetric(n=4, h=32, w=32):
    """Images whose red channel encodes the mask (class 1 = 200, class 0 = 40); class 1 on the left third."""
    m = torch.zeros(n, h, w, dtype=torch.uint8)
    m[:, 4:28, 2:11] = 1
    x = torch.full((n, 3, h, w), 90, dtype=torch.uint8)
    x[:, 0] = torch.where(m == 1, 200, 40).to(torch.uint8)
    return x, m


def test_batch_augment_moves_mask_with_image():
    x, m = _asymmetric()
    aug = SegBatchAugment(AugConfig(preset="basic", hflip=1.0), (0.0,) * 3, (1 / 255,) * 3, (32, 32), train=True)
    out, y = aug(x, m, torch.Generator().manual_seed(0))
    cols = torch.arange(32).float()
    for i in range(len(x)):
        _ys, xs = torch.nonzero(y[i] == 1, as_tuple=True)
        assert cols[xs].mean() > 16  # the object was on the left: flipped to the right
        # interior pixels (3x3 neighbourhood of one class) carry that class's image value
        pad = torch.nn.functional.pad(y[i][None, None].float(), (1, 1, 1, 1), value=-1)
        same = (torch.nn.functional.max_pool2d(pad, 3, 1) == torch.nn.functional.max_pool2d(-pad, 3, 1).neg())[0, 0]
        red = out[i, 0]  # (brightness/contrast jitter moves the values a little, never across)
        assert red[same & (y[i] == 1)].min() > 150 and red[same & (y[i] == 0)].max() < 70
    eval_aug = SegBatchAugment(None, (0.0,) * 3, (1 / 255,) * 3, (32, 32), train=False)
    out, y = eval_aug(x, m)
    assert torch.equal(y, m.long()) and torch.allclose(out, x.float())


def test_file_transforms_move_mask_with_image():
    x, m = _asymmetric(1, 40, 48)
    tf = build_seg_train_transform(AugConfig(preset="basic", hflip=1.0), (32, 32), (0.0,) * 3, (1 / 255,) * 3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        out, y = tf(tv_tensors.Image(x[0]), tv_tensors.Mask(m[0].long()))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and y.shape == (32, 32) and y.dtype == torch.int64
    assert set(torch.unique(y).tolist()) <= {0, 1, 255}
    _ys, xs = torch.nonzero(y == 1, as_tuple=True)
    assert xs.float().mean() > 16
    assert (out[0][y == 1] > 120).float().mean() > 0.9 and (out[0][y == 0] < 120).float().mean() > 0.9
    x2, y2 = build_seg_eval_transform((20, 24), MEAN, STD)(tv_tensors.Image(x[0]), tv_tensors.Mask(m[0].long()))
    assert x2.shape == (3, 20, 24) and y2.shape == (20, 24) and set(torch.unique(y2).tolist()) == {0, 1}


# ---------------------------------------------------------------- layouts

def test_split_folder_layout_and_file_loader(tmp_path):
    for i in range(6):
        _pair(tmp_path, f"t{i}", split="train", cls=1 + i % 2)
    for i in range(2):
        _pair(tmp_path, f"v{i}", split="val")
    (tmp_path / "classes.txt").write_text("background\ncat\ndog\n")
    assert is_segmentation_source(str(tmp_path))
    b = build_seg_data(tmp_path)
    assert b.classes == ["background", "cat", "dog"] and (len(b.train), len(b.val)) == (6, 2) and b.test is None
    assert b.summary()["image_sizes"]["width"]["max"] == 16 and b.bad_files == []
    img, mask = b.train[0]
    assert isinstance(img, tv_tensors.Image) and isinstance(mask, tv_tensors.Mask) and mask.dtype == torch.int64
    assert img.shape == (3, 12, 16) and set(torch.unique(mask).tolist()) <= {0, 1, 2}
    dl = make_seg_loader(b.train, batch_size=4, train=True, seed=0, device="cpu", input_size=(3, 16, 16),
                         mean=MEAN, std=STD, aug=AugConfig(preset="basic"), workers=0)
    full = list(dl.epoch(1))
    assert len(full) == 1 and full[0][0].shape == (4, 3, 16, 16) and full[0][1].shape == (4, 16, 16)
    assert _batches_equal(list(dl.epoch(1)), full) and _batches_equal(list(dl.epoch(1, start=1)), full[1:])
    ev = make_seg_loader(b.val, batch_size=4, train=False, seed=0, device="cpu", input_size=(3, 16, 16),
                         mean=MEAN, std=STD, workers=0)
    (x, y), = list(ev.epoch(0))
    assert x.shape == (2, 3, 16, 16) and y.dtype == torch.int64


def test_flat_layout_infers_classes_and_splits(tmp_path, capsys):
    _flat(tmp_path, n=5, classes=None)
    b = build_seg_data(str(tmp_path), val_split=0.4, seed=0)
    assert b.classes == ["class_0", "class_1", "class_2"] and "class_0..class_2" in capsys.readouterr().err
    assert (len(b.train), len(b.val)) == (3, 2)
    assert build_seg_data(str(tmp_path), val_split=0.4, seed=0).val.samples == b.val.samples
    assert isinstance(b.train, SegFiles)


def test_voc_layout(tmp_path):
    root = _voc(tmp_path / "VOC2012")
    assert is_segmentation_source(str(tmp_path)) and is_segmentation_source(str(root))  # VOCdevkit/ or VOC2012/
    b = build_seg_data(tmp_path)
    assert b.classes == VOC_CLASSES and (len(b.train), len(b.val)) == (3, 1)
    _, mask = b.val[0]
    assert set(torch.unique(mask).tolist()) == {0, 15, 255}


def test_csv_layout_with_rgb_palette(tmp_path):
    colours = {0: (0, 0, 0), 1: (250, 10, 10), 2: (10, 10, 250)}
    rows = ["image,mask"]
    for i in range(4):
        ids = np.zeros((8, 10), np.uint8)
        ids[1:4, 1:5], ids[5:7, 5:9] = 1, 2
        _png(tmp_path / "data" / f"i{i}.png", np.full((8, 10, 3), 30 * i))
        _png(tmp_path / "data" / f"m{i}.png", np.array([colours[v] for v in ids.flat]).reshape(8, 10, 3))
        rows.append(f"data/i{i}.png,data/m{i}.png")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "classes.txt").write_text("bg 0 0 0\nred 250 10 10\nblue #0a0afa\n")
    assert is_segmentation_source(str(tmp_path / "list.csv"))
    b = build_seg_data(tmp_path / "list.csv", val_split=0.25)
    assert b.classes == ["bg", "red", "blue"] and (len(b.train), len(b.val)) == (3, 1)
    _, mask = b.train[0]
    assert mask[2, 2] == 1 and mask[6, 6] == 2 and mask[0, 0] == 0


def test_read_mask_modes(tmp_path):
    a = np.array([[0, 1], [2, 255]], np.uint8)
    _png(tmp_path / "l.png", a)
    Image.fromarray(a.astype(np.uint16)).save(tmp_path / "i.png")  # 16-bit grey
    _png(tmp_path / "grey_rgb.png", np.repeat(a[..., None], 3, axis=2))
    for name in ("l.png", "i.png", "grey_rgb.png"):
        assert read_mask(str(tmp_path / name)).tolist() == a.tolist()


def test_classification_folder_is_not_segmentation(tmp_path):
    for c in ("cat", "dog"):
        for i in range(2):
            _png(tmp_path / c / f"{i}.png", np.zeros((4, 4, 3)))
    (tmp_path / "labels.csv").write_text("path,label\ncat/0.png,cat\n")
    assert not is_segmentation_source(str(tmp_path))
    assert not is_segmentation_source(str(tmp_path / "labels.csv"))
    assert not is_segmentation_source(str(tmp_path / "nowhere"))
    with pytest.raises(DataError) as e:
        build_seg_data(tmp_path)
    assert "not a segmentation data set" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- bad files

def _bad_missing_mask(root):
    _flat(root)
    _png(root / "images" / "lonely.png", np.zeros((12, 16, 3)))
    return root / "images" / "lonely.png"


def _bad_size(root):
    _flat(root)
    _pair(root, "big", mask_array=np.zeros((10, 10), np.uint8))
    return root / "masks" / "big.png"


def _bad_class_id(root):
    _flat(root)
    _pair(root, "odd", cls=7)
    return root / "masks" / "odd.png"


def _bad_rgb(root):
    _flat(root)
    rgb = np.zeros((12, 16, 3), np.uint8)
    rgb[3:6, 3:6] = (200, 30, 30)
    _pair(root, "colour", mask_array=rgb)
    return root / "masks" / "colour.png"


def _bad_corrupt(root):
    _flat(root)
    _pair(root, "broken")
    data = (root / "images" / "broken.png").read_bytes()
    (root / "images" / "broken.png").write_bytes(data[: len(data) // 2])
    return root / "images" / "broken.png"


def _bad_voc_missing(root):
    _voc(root, ids_train=("a", "b", "c", "e"), extra_listed=("ghost",))
    return root / "JPEGImages" / "ghost.jpg"


@pytest.mark.parametrize("make_bad", [_bad_missing_mask, _bad_size, _bad_class_id, _bad_rgb, _bad_corrupt,
                                      _bad_voc_missing])
def test_bad_files_fail_or_skip(tmp_path, capsys, make_bad):
    bad_path = make_bad(tmp_path)
    with pytest.raises(DataError) as e:
        build_seg_data(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(bad_path) in msg and msg.startswith("1 bad image file")
    b = build_seg_data(tmp_path, bad_images="skip", val_split=0.0)
    assert [d["path"] for d in b.bad_files] == [str(bad_path)]
    assert "skipped 1 bad file" in capsys.readouterr().err
    kept = [s[0] for ds in b.splits().values() for s in ds.samples]
    assert len(kept) == 5 and str(bad_path) not in kept
