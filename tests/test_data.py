"""Tests for visionkit.data: sources, validation, conversions, splits and deterministic loaders (fast, offline)."""
from __future__ import annotations

import csv
import gzip
import os
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionkit.config import AugConfig
from visionkit.data import (
    DataError,
    ImageFiles,
    TensorImages,
    build_data,
    class_weights,
    list_datasets,
    load_rgb,
    make_fake,
    make_loader,
    sample_weights,
    stratified_split,
)
from visionkit.data.builtins import DEBIAN_FASHION_MNIST

# ---------------------------------------------------------------- helpers


def _img(path: Path, color=(200, 30, 30), size=(12, 10), mode="RGB", fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, color)
    im = im if mode == "RGB" else im.convert(mode)
    im.save(path, fmt)
    return path


def _folder(root: Path, counts: dict[str, int], ext: str = ".png") -> Path:
    for c, n in counts.items():
        for i in range(n):
            _img(root / c / f"{c}{i}{ext}", color=(20 * i % 256, 60 if c == "a" else 180, 90), size=(10 + i, 8 + i))
    return root


def _rng_states() -> tuple:
    return torch.get_rng_state().clone(), random.getstate(), np.random.get_state()[1].copy()


def _assert_rng_same(before: tuple) -> None:
    after = _rng_states()
    assert torch.equal(before[0], after[0])
    assert before[1] == after[1]
    assert np.array_equal(before[2], after[2])


# ---------------------------------------------------------------- sources


def test_class_folder_split_is_stratified_seeded_and_disjoint(tmp_path):
    src = _folder(tmp_path / "d", {"a": 10, "b": 5})
    b1 = build_data(str(src), val_split=0.2, seed=3)
    b2 = build_data(str(src), val_split=0.2, seed=3)
    assert b1.classes == ["a", "b"] and b1.in_chans == 3 and b1.native_size is None
    tr, va = {p for p, _ in b1.train.samples}, {p for p, _ in b1.val.samples}
    assert not tr & va and len(tr | va) == 15
    assert sorted(b1.val.targets) == [0, 0, 1]  # 20% of each class
    assert b1.train.samples == b2.train.samples and b1.val.samples == b2.val.samples
    assert b1.fingerprint == b2.fingerprint
    s = b1.summary()
    assert s["splits"]["train"]["class_counts"] == {"a": 8, "b": 4}
    assert s["image_sizes"]["width"]["min"] == 10 and s["image_sizes"]["width"]["max"] == 19
    assert build_data(str(src), val_split=0).val is None


def test_image_files_of_a_type_not_read_are_named_not_dropped_in_silence(tmp_path, capsys):
    src = _folder(tmp_path / "d", {"a": 4, "b": 4})
    _img(src / "b" / "imageNotFound.gif", color=(1, 2, 3), size=(9, 9))  # as in hymenoptera's ants/
    (src / "a" / "notes.txt").write_text("not an image: no note")
    b = build_data(str(src), val_split=0)
    assert len(b.train) == 8
    err = capsys.readouterr().err
    assert "left out 1 file" in err and "imageNotFound.gif" in err and "notes.txt" not in err


def test_stratified_split_properties():
    t = [0] * 50 + [1] * 30 + [2] * 2 + [3]
    keep, held = stratified_split(t, 0.2, seed=1)
    assert sorted(keep + held) == list(range(len(t))) and not set(keep) & set(held)
    assert stratified_split(t, 0.2, seed=1) == (keep, held)
    assert stratified_split(t, 0.2, seed=2) != (keep, held)
    held_t = [t[i] for i in held]
    assert held_t.count(0) == 10 and held_t.count(1) == 6 and held_t.count(2) == 1 and held_t.count(3) == 0


def test_train_val_test_layout(tmp_path):
    _folder(tmp_path / "train", {"a": 3, "b": 3})
    _folder(tmp_path / "val", {"b": 2})  # a class missing in val is fine
    _folder(tmp_path / "test", {"a": 1, "b": 1})
    b = build_data(str(tmp_path))
    assert b.classes == ["a", "b"]
    assert len(b.train) == 6 and len(b.val) == 2 and len(b.test) == 2
    assert set(b.val.targets) == {1}


def test_train_only_layout_splits_train(tmp_path):
    _folder(tmp_path / "train", {"a": 5, "b": 5})
    b = build_data(str(tmp_path), val_split=0.2)
    assert len(b.train) == 8 and len(b.val) == 2 and b.test is None


def test_val_class_unknown_to_train(tmp_path):
    _folder(tmp_path / "train", {"a": 2, "b": 2})
    _folder(tmp_path / "val", {"c": 1})
    with pytest.raises(DataError, match="val classes not in train: c"):
        build_data(str(tmp_path))


def test_csv_with_and_without_header(tmp_path):
    for i in range(4):
        _img(tmp_path / "imgs" / f"{i}.png")
    _img(tmp_path / "abs.png")
    rows = [("imgs/0.png", "10"), ("imgs/1.png", "2"), ("imgs/2.png", "10"), ("imgs/3.png", "2"),
            (str(tmp_path / "abs.png"), "2")]
    with_header = tmp_path / "h.csv"
    with open(with_header, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    no_header = tmp_path / "n.csv"
    with open(no_header, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    for p in (with_header, no_header):
        b = build_data(str(p), val_split=0)
        assert b.classes == ["2", "10"]  # numeric labels sort as numbers
        assert len(b.train) == 5 and b.train.targets == [1, 0, 1, 0, 0]
    assert build_data(str(with_header)).fingerprint == build_data(str(no_header)).fingerprint


def test_bad_csv(tmp_path):
    _img(tmp_path / "x.png")
    p = tmp_path / "bad.csv"
    p.write_text("path,label\nx.png\n")
    with pytest.raises(DataError, match="line 2: expected path,label"):
        build_data(str(p))
    p.write_text("file,colour\nx.png,a\n")
    with pytest.raises(DataError, match="lacks a label column"):
        build_data(str(p))
    p.write_text("x.png,a\nmissing.png,b\n")
    with pytest.raises(DataError, match="1 file listed in .* not found: .*missing.png"):
        build_data(str(p))
    p.write_text("")
    with pytest.raises(DataError, match="empty"):
        build_data(str(p))


def test_user_errors(tmp_path):
    with pytest.raises(DataError, match="data not found"):
        build_data(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="unknown built-in|neither an existing path nor a built-in") as e:
        build_data("imagenet-mini")
    assert "fashion-mnist" in str(e.value)
    _folder(tmp_path / "one", {"cats": 2})
    with pytest.raises(DataError, match=r"only one class \(cats\)"):
        build_data(str(tmp_path / "one"))
    _folder(tmp_path / "emp", {"a": 2})
    (tmp_path / "emp" / "b").mkdir()
    with pytest.raises(DataError, match=r"empty class folder: .*emp/b"):
        build_data(str(tmp_path / "emp"))
    _img(tmp_path / "flat" / "x.png")
    with pytest.raises(DataError, match="no class sub-folders"):
        build_data(str(tmp_path / "flat"))
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "a" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="no images found"):
        build_data(str(tmp_path / "noimg"))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DataError, match="not a .csv"):
        build_data(str(tmp_path / "f.txt"))
    assert issubclass(DataError, ValueError)


def _bad_folder(root: Path) -> list[str]:
    _folder(root, {"a": 3, "b": 3}, ext=".jpg")
    (root / "a" / "zero.jpg").write_bytes(b"")
    (root / "a" / "text.png").write_text("this is not an image")
    good = _img(root / "b" / "full.jpg", size=(64, 64), fmt="JPEG").read_bytes()
    (root / "b" / "trunc.jpg").write_bytes(good[: len(good) // 2])
    png = _img(root / "b" / "full.png", size=(64, 64)).read_bytes()
    (root / "b" / "trunc.png").write_bytes(png[: len(png) - 40])
    (root / "b" / "full.png").unlink()
    os.symlink(root / "does-not-exist.jpg", root / "a" / "dangling.jpg")
    return ["zero.jpg", "text.png", "trunc.jpg", "trunc.png", "dangling.jpg"]


def test_bad_images_fail_lists_all(tmp_path):
    names = _bad_folder(tmp_path)
    with pytest.raises(DataError) as e:
        build_data(str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("5 bad image files")
    assert all(n in msg for n in names) and "--bad-images skip" in msg
    assert "zero-byte" in msg and "not an image" in msg and "truncated" in msg and "unreadable" in msg


def test_bad_images_skip_records(tmp_path):
    names = _bad_folder(tmp_path)
    b = build_data(str(tmp_path), bad_images="skip", val_split=0)
    assert sorted(Path(x["path"]).name for x in b.bad_files) == sorted(names)
    assert all(x["reason"] for x in b.bad_files)
    assert len(b.train) == 7 and b.summary()["bad_files"] == 5


def test_conversions_to_rgb(tmp_path):
    d = tmp_path / "conv"
    _img(d / "a" / "cmyk.jpg", mode="CMYK", fmt="JPEG", color=(255, 0, 0))
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(d / "a" / "w16.png")
    a16 = np.full((4, 4), 32896, np.uint16)  # 128 * 257
    a16[0, 0] = 1000  # clipping at 255 would map this to 255; scaling gives 4
    Image.fromarray(a16).save(d / "a" / "g16.png")
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 1)
    (d / "b").mkdir()
    pal.save(d / "b" / "pal.png", transparency=0)
    rgba = Image.new("RGBA", (4, 4), (0, 0, 255, 255))
    rgba.putpixel((0, 0), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    rgba.save(d / "b" / "rgba.png")
    Image.new("LA", (4, 4), (100, 255)).save(d / "b" / "la.png")
    rot = Image.new("RGB", (20, 10), (0, 200, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    rot.save(d / "b" / "rot.jpg", exif=exif)

    b = build_data(str(d), val_split=0)  # none of these is "bad"
    assert not b.bad_files and len(b.train) == 7
    px = {Path(p).name: load_rgb(p) for p, _ in b.train.samples}
    assert all(im.mode == "RGB" for im in px.values())
    r, g, bl = px["cmyk.jpg"].getpixel((2, 2))
    assert r > 230 and g < 30 and bl < 30
    assert px["w16.png"].getpixel((1, 1)) == (255, 255, 255)
    assert px["g16.png"].getpixel((1, 1)) == (128, 128, 128) and px["g16.png"].getpixel((0, 0)) == (4, 4, 4)
    assert px["pal.png"].getpixel((0, 0)) == (255, 0, 0) and px["pal.png"].getpixel((1, 1)) == (255, 255, 255)
    assert px["rgba.png"].getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert px["rgba.png"].getpixel((2, 2)) == (0, 0, 255)
    assert all(abs(v - 127) <= 1 for v in px["rgba.png"].getpixel((1, 0)))  # half black over white
    assert px["la.png"].getpixel((0, 0)) == (100, 100, 100)
    assert px["rot.jpg"].size == (10, 20)
    img, _ = ImageFiles(b.train.samples, b.classes)[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB"


# ---------------------------------------------------------------- built-ins


def test_digits_builtin():
    b = build_data("digits", seed=0)
    assert (b.in_chans, b.native_size, len(b.classes)) == (1, 8, 10)
    n = {k: len(v) for k, v in b.splits().items()}
    assert sum(n.values()) == 1797 and abs(n["test"] - 360) <= 5 and abs(n["val"] - 360) <= 5
    assert b.train.images.dtype == torch.uint8 and int(b.train.images.max()) == 255
    x, y = b.train[0]
    assert x.shape == (1, 8, 8) and isinstance(y, int)
    assert b.fingerprint == build_data("digits", seed=1).fingerprint  # data, not split
    assert not torch.equal(b.test.targets, build_data("digits", seed=1).test.targets)


def test_fake_builtin_deterministic():
    b = build_data("fake", seed=0)
    assert (b.in_chans, b.native_size, len(b.classes)) == (3, 32, 10)
    assert b.train.images.shape[1:] == (3, 32, 32) and len(b.test) == 1000
    x0, y0 = make_fake(40, seed=5)
    x1, y1 = make_fake(40, seed=5)
    assert torch.equal(x0, x1) and torch.equal(y0, y1) and not torch.equal(x0, make_fake(40, seed=6)[0])
    assert torch.bincount(y0).tolist() == [4] * 10
    assert len(b.summary()["splits"]["val"]["class_counts"]) == 10


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_mnist_local_copy_and_offline_error(tmp_path, monkeypatch):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 10)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    b = build_data("mnist", root=str(tmp_path), download=False, val_split=0.25)
    assert (len(b.train), len(b.val), len(b.test)) == (30, 10, 10) and b.native_size == 28
    monkeypatch.setenv("VISIONKIT_DATA", str(tmp_path))
    assert build_data("mnist", download=False).fingerprint == b.fingerprint
    with pytest.raises(DataError, match="downloads are off: put train-images-idx3-ubyte.gz"):
        build_data("mnist", root=str(tmp_path / "empty"), download=False)
    with pytest.raises(DataError, match="cifar-10-python.tar.gz"):
        build_data("cifar10", root=str(tmp_path / "empty"), download=False)


@pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_files(tmp_path):
    b = build_data("fashion-mnist", root=str(tmp_path), download=False)
    assert (len(b.train), len(b.val), len(b.test)) == (48000, 12000, 10000)
    assert b.classes[0] == "T-shirt/top" and b.train.images.shape[1:] == (1, 28, 28)
    assert torch.bincount(b.test.targets).tolist() == [1000] * 10


def test_list_datasets():
    rows = {d["name"]: d for d in list_datasets()}
    assert {"fashion-mnist", "mnist", "cifar10", "cifar100", "digits", "fake"} <= set(rows)
    assert rows["digits"]["local"] and rows["fake"]["local"]
    assert set(rows["mnist"]) == {"name", "classes", "size", "splits", "local", "note"}


# ---------------------------------------------------------------- loaders


def _tensor_ds(n=50) -> TensorImages:
    g = torch.Generator().manual_seed(0)
    return TensorImages(torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8), torch.arange(n) % 5,
                        [str(i) for i in range(5)])


def _kw(**over) -> dict:
    """make_loader keyword arguments: a CPU train loader unless overridden."""
    return {"train": True, "device": "cpu", **over}


def _batches(loader, epoch, start=0):
    return [(x.clone(), y.clone()) for x, y in loader.epoch(epoch, start)]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_tensor_loader_deterministic_and_resumable():
    ds = _tensor_ds()
    kw = _kw(batch_size=8, seed=7, input_size=(3, 8, 8), mean=(0.5,) * 3, std=(0.5,) * 3, aug=AugConfig())
    before = _rng_states()
    l1, l2 = make_loader(ds, **kw), make_loader(ds, **kw)
    assert len(l1) == 6 and l1.num_samples == 50  # drop_last for train
    e1 = _batches(l1, 1)
    _assert_rng_same(before)
    assert _same(e1, _batches(l2, 1))
    assert _same(e1[4:], _batches(l2, 1, start=4))
    assert not _same(e1, _batches(l1, 2))
    x, y = e1[0]
    assert x.shape == (8, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long
    xl, _ = next(make_loader(ds, **{**kw, "channels_last": True}).epoch(0))
    assert xl.is_contiguous(memory_format=torch.channels_last)


def test_tensor_eval_loader_keeps_order():
    ds = _tensor_ds(21)
    dl = make_loader(ds, batch_size=8, train=False, seed=0, device="cpu", input_size=(1, 8, 8), mean=(0.0,),
                     std=(1.0,))
    b = _batches(dl, 0)
    assert len(dl) == 3 and torch.equal(torch.cat([y for _, y in b]), ds.targets)
    assert torch.allclose(b[0][0], ds.images[:8].float() / 255)


def test_sampler_weights_and_class_weights():
    ds = _tensor_ds()
    ds.targets = torch.tensor([0] * 45 + [1] * 5)
    w = sample_weights(ds.targets, 2)
    kw = _kw(batch_size=10, seed=1, input_size=(1, 8, 8), mean=(0.0,), std=(1.0,), sampler_weights=w)
    dl = make_loader(ds, **kw)
    ys = torch.cat([y for _, y in dl.epoch(0)])
    assert 10 < int((ys == 1).sum()) < 40  # balanced-ish, drawn with replacement
    assert _same(_batches(dl, 3), _batches(make_loader(ds, **kw), 3))
    cw = class_weights([0, 0, 0, 1], 3)
    assert torch.allclose(cw, torch.tensor([0.5, 1.5, 0.0]))


@pytest.fixture
def small_files(tmp_path) -> ImageFiles:
    src = _folder(tmp_path / "imgs", {"a": 6, "b": 5})
    return build_data(str(src), val_split=0).train


def test_file_loader_deterministic_and_resumable(small_files):
    kw = _kw(batch_size=4, seed=3, input_size=(3, 8, 8), mean=(0.5,) * 3, std=(0.5,) * 3, aug=AugConfig(), workers=0)
    before = _rng_states()
    dl = make_loader(small_files, **kw)
    e0 = _batches(dl, 0)
    _assert_rng_same(before)
    assert len(dl) == 2 and len(e0) == 2 and e0[0][0].shape == (4, 3, 8, 8)
    assert _same(e0, _batches(make_loader(small_files, **kw), 0))
    assert _same(e0[1:], _batches(dl, 0, start=1))
    assert not _same(e0, _batches(dl, 1))
    ev = make_loader(small_files, **{**kw, "train": False, "batch_size": 4})
    assert len(ev) == 3 and torch.cat([y for _, y in ev.epoch(0)]).tolist() == small_files.targets


def test_file_loader_independent_of_workers(small_files):
    kw = _kw(batch_size=4, seed=3, input_size=(1, 8, 8), mean=(0.5,), std=(0.5,), aug=AugConfig())
    ref = _batches(make_loader(small_files, **kw, workers=0), 2)
    dl = make_loader(small_files, **kw, workers=2)
    assert _same(ref, _batches(dl, 2)) and _same(ref[1:], _batches(dl, 2, start=1))
    next(iter(dl.epoch(0)))  # abandon an epoch midway: the persistent workers must start the next one cleanly
    assert _same(ref, _batches(dl, 2))
    assert ref[0][0].shape == (4, 1, 8, 8)
