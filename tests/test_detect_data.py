"""Detection data: det-shapes, the COCO / VOC / YOLO / CSV readers, validation (fail | skip), loaders (determinism,
resume), joint transforms and layout detection. Everything runs on a handful of tiny images."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from visionkit.config import AugConfig
from visionkit.data.builtins import fingerprint_tensors
from visionkit.data.errors import DataError
from visionkit.data.loaders import isolated_rng
from visionkit.tasks.detect.data import (
    DET_SHAPES_CLASSES,
    VOC_CLASSES,
    DetFiles,
    DetTensors,
    build_det_data,
    is_detection_source,
    make_det_loader,
    make_det_shapes,
)
from visionkit.tasks.detect.transforms import DetBatchAugment, build_det_eval_transform, build_det_train_transform

# ---------------------------------------------------------------- helpers

def _img(path, w=40, h=32, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, fmt)
    return path


def _coco(root, split, files, anns, cats=((3, "cat"), (7, "dog"), (11, "emu"))):
    """root/annotations/instances_<split>.json + root/images/<split>/<file> (w 40, h 32)."""
    images = []
    for i, f in enumerate(files, 1):
        _img(root / "images" / split / f)
        images.append({"id": i, "file_name": f, "width": 40, "height": 32})
    data = {"images": images, "categories": [{"id": c, "name": n} for c, n in cats],
            "annotations": [{"id": k, "image_id": a[0], "category_id": a[1], "bbox": a[2], "iscrowd": a[3] if
                             len(a) > 3 else 0} for k, a in enumerate(anns, 1)]}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


def _voc_xml(path, objs):
    body = "".join(f"<object><name>{n}</name><difficult>{int(d)}</difficult><bndbox><xmin>{b[0]}</xmin>"
                   f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b, d in objs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation><filename>{path.stem}.jpg</filename>{body}</annotation>")


def _voc(root, names=("dog", "cat")):
    for i, stem in enumerate(("a", "b", "c")):
        _img(root / "JPEGImages" / f"{stem}.jpg")
        _voc_xml(root / "Annotations" / f"{stem}.xml",
                 [(names[0], (1, 2, 10, 12), False), (names[1], (5, 5, 30, 25), i == 0)])
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nb\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("c\n")
    return root


def _yolo(root, lines=None):
    """root/images/{train,val} + root/labels/{train,val}, names in data.yaml ({id: name})."""
    lines = lines or {"train/a": "1 0.5 0.5 0.5 0.25\n0 0.25 0.25 0.1 0.1\n", "train/b": "0 0.5 0.5 1 1\n",
                      "val/c": "1 0.1 0.1 0.2 0.2\n"}
    for key, text in lines.items():
        _img(root / "images" / f"{key}.png")
        (root / "labels" / key).parent.mkdir(parents=True, exist_ok=True)
        (root / "labels" / f"{key}.txt").write_text(text)
    _img(root / "images" / "train" / "neg.png")  # no label file: a negative
    (root / "data.yaml").write_text("names:\n  0: cat\n  1: dog\n")
    return root


def _csv(root, rows, header="image,label,xmin,ymin,xmax,ymax,split"):
    for r in rows:
        if not (root / r.split(",")[0]).exists():
            _img(root / r.split(",")[0])
    (root / "boxes.csv").write_text("\n".join([header, *rows]) + "\n")
    return root / "boxes.csv"


# ---------------------------------------------------------------- readers

def test_coco_maps_noncontiguous_ids_and_keeps_crowds(tmp_path):
    root = _coco(tmp_path / "coco", "train", ["a.png", "b.png"],
                 [(1, 11, [2, 3, 10, 8]), (1, 3, [0, 0, 5, 5], 1), (2, 7, [10, 10, 20, 12])])
    _coco(root, "val", ["c.png"], [(1, 3, [1, 1, 4, 4])])
    b = build_det_data(root)
    assert b.classes == ["cat", "dog", "emu"] and b.category_ids == [3, 7, 11]
    assert len(b.train) == 2 and len(b.val) == 1 and b.test is None
    t = b.train.targets[0]
    assert t["labels"].tolist() == [2, 0] and t["difficult"].tolist() == [False, True]
    assert t["boxes"].tolist() == [[2, 3, 12, 11], [0, 0, 5, 5]]
    img, target = b.train[1]
    assert img.shape == (3, 32, 40) and isinstance(target["boxes"], tv_tensors.BoundingBoxes)
    assert target["boxes"].canvas_size == (32, 40) and target["labels"].tolist() == [1]
    s = b.summary()
    assert s["splits"]["train"]["objects"] == 3 and s["splits"]["train"]["per_class"] == {"cat": 1, "dog": 1, "emu": 1}
    assert s["category_ids"] == [3, 7, 11] and len(b.palette) == 3
    # the JSON file given directly (images beside it or in images/<split>: found through the roots)
    direct = build_det_data(root / "annotations" / "instances_val.json", val_split=0)
    assert len(direct.train) == 1 and direct.val is None


def test_voc_difficult_names_and_one_based_boxes(tmp_path):
    b = build_det_data(_voc(tmp_path / "voc"))
    assert b.classes == VOC_CLASSES  # the names fit VOC's 20
    t = b.train.targets[0]
    assert t["labels"].tolist() == [VOC_CLASSES.index("dog"), VOC_CLASSES.index("cat")]
    assert t["difficult"].tolist() == [False, True] and t["boxes"][0].tolist() == [0, 1, 10, 12]
    assert len(b.train) == 2 and len(b.val) == 1
    own = build_det_data(_voc(tmp_path / "voc2", names=("zebra", "ant")))
    assert own.classes == ["ant", "zebra"] and own.train.targets[0]["labels"].tolist() == [1, 0]


def test_yolo_normalised_boxes_round_trip(tmp_path):
    b = build_det_data(_yolo(tmp_path / "yolo"))
    assert b.classes == ["cat", "dog"] and len(b.train) == 3 and len(b.val) == 1
    by_name = {p.split("/")[-1]: t for p, t in zip(b.train.paths, b.train.targets)}
    assert torch.allclose(by_name["a.png"]["boxes"], torch.tensor([[10, 12, 30, 20], [8, 6.4, 12, 9.6]]))
    assert by_name["a.png"]["labels"].tolist() == [1, 0]
    assert by_name["b.png"]["boxes"].tolist() == [[0, 0, 40, 32]]
    assert len(by_name["neg.png"]["labels"]) == 0  # no label file: an image without objects
    assert b.summary()["splits"]["train"]["negatives"] == 1
    # Roboflow's split folders with classes.txt, and a polygon line
    rf = tmp_path / "rf"
    _img(rf / "train" / "images" / "x.jpg")
    (rf / "train" / "labels").mkdir(parents=True)
    (rf / "train" / "labels" / "x.txt").write_text("0 0.1 0.1 0.5 0.2 0.3 0.6\n")
    (rf / "classes.txt").write_text("thing\n")
    b = build_det_data(rf, val_split=0)
    assert torch.allclose(b.train.targets[0]["boxes"], torch.tensor([[4.0, 3.2, 20.0, 19.2]]))


def test_csv_several_boxes_per_image_and_negatives(tmp_path):
    path = _csv(tmp_path, ["a.png,cat,1,2,10,12,train", "a.png,dog,5,5,30,25,train", "b.png,,,,,,train",
                           "c.png,dog,0,0,4,4,val"])
    b = build_det_data(path)
    assert b.classes == ["cat", "dog"] and len(b.train) == 2 and len(b.val) == 1
    assert b.train.targets[0]["labels"].tolist() == [0, 1] and len(b.train.targets[1]["labels"]) == 0
    ids = _csv(tmp_path / "ids", ["a.png,0,1,2,10,12", "b.png,2,0,0,4,4"], header="image,label,xmin,ymin,xmax,ymax")
    b = build_det_data(ids, val_split=0)
    assert b.classes == ["class_0", "class_1", "class_2"] and b.train.targets[1]["labels"].tolist() == [2]


# ---------------------------------------------------------------- validation: fail | skip

def _clipped(root):
    return _csv(root, ["a.png,cat,-5,2,10,12", "b.png,cat,1,1,8,8"], header="image,label,xmin,ymin,xmax,ymax"), None


def _zero_area(root):
    return _csv(root, ["a.png,cat,5,5,5,9", "a.png,cat,1,1,8,8", "b.png,cat,9,9,3,3"],
                header="image,label,xmin,ymin,xmax,ymax"), None


def _class_range(root):
    _yolo(root, {"train/a": "0 0.5 0.5 0.2 0.2\n", "train/b": "5 0.5 0.5 0.2 0.2\n"})
    return root, "b.txt"


def _missing_image(root):
    _coco(root, "train", ["a.png", "b.png"], [(1, 3, [1, 1, 5, 5])])
    (root / "images" / "train" / "b.png").unlink()
    return root, "b.png"


def _malformed_line(root):
    _yolo(root, {"train/a": "0 0.5 0.5 0.2 0.2\n", "train/b": "0 0.5 0.5\n"})
    return root, "b.txt"


def _malformed_xml(root):
    _voc(root)
    (root / "Annotations" / "b.xml").write_text("<annotation><object>")
    return root, "b.xml"


def _corrupt_image(root):
    _yolo(root, {"train/a": "0 0.5 0.5 0.2 0.2\n", "train/b": "0 0.5 0.5 0.2 0.2\n"})
    (root / "images" / "train" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return root, "b.png"


@pytest.mark.parametrize("make_bad", [_class_range, _missing_image, _malformed_line, _malformed_xml, _corrupt_image])
def test_bad_files_fail_or_skip(tmp_path, capsys, make_bad):
    src, name = make_bad(tmp_path / "d")
    with pytest.raises(DataError, match="--bad-images skip") as e:
        build_det_data(src)
    assert name in str(e.value) and "\n" not in str(e.value)
    b = build_det_data(src, bad_images="skip", val_split=0)
    assert len(b.bad_files) == 1 and b.bad_files[0]["path"].endswith(name)
    assert len(b.train) >= 1 and not any(p.endswith(name) for p in b.train.paths)
    assert "skipped 1 bad file" in capsys.readouterr().err


def test_boxes_clipped_and_zero_area_dropped_are_notes(tmp_path, capsys):
    b = build_det_data(_clipped(tmp_path / "c")[0], val_split=0)
    assert b.train.targets[0]["boxes"].tolist() == [[0, 2, 10, 12]] and not b.bad_files
    assert "1 box partly outside the image: clipped" in capsys.readouterr().err
    b = build_det_data(_zero_area(tmp_path / "z")[0], val_split=0)
    assert [len(t["labels"]) for t in b.train.targets] == [1, 0] and not b.bad_files
    assert "2 boxes of zero or negative area: dropped" in capsys.readouterr().err


def test_errors_are_one_line(tmp_path):
    (tmp_path / "cats").mkdir()
    _img(tmp_path / "cats" / "a.png")
    with pytest.raises(DataError, match="is not a detection data set: expected COCO JSON"):
        build_det_data(tmp_path)
    with pytest.raises(DataError, match="neither an existing path nor a built-in"):
        build_det_data(tmp_path / "nope")
    with pytest.raises(DataError, match="bad_images must be"):
        build_det_data("det-shapes", bad_images="maybe")


# ---------------------------------------------------------------- layouts

def test_is_detection_source(tmp_path):
    assert is_detection_source("det-shapes") and not is_detection_source("seg-shapes")
    assert is_detection_source(_coco(tmp_path / "coco", "train", ["a.png"], []))
    assert is_detection_source(_coco(tmp_path / "coco2", "train", ["a.png"], []) / "annotations" /
                               "instances_train.json")
    assert is_detection_source(_voc(tmp_path / "voc")) and is_detection_source(_yolo(tmp_path / "yolo"))
    assert is_detection_source(_csv(tmp_path / "csv", ["a.png,cat,1,2,10,12,train"]))
    # classification class folders, segmentation images + masks (also named labels/ or annotations/), other CSVs
    for d in ("cls/cat", "cls/dog"):
        _img(tmp_path / d / "x.png")
    for masks in ("masks", "labels", "annotations"):
        _img(tmp_path / f"seg_{masks}" / "images" / "a.png")
        _img(tmp_path / f"seg_{masks}" / masks / "a.png")
        _img(tmp_path / f"segsplit_{masks}" / "train" / "images" / "a.png")
        _img(tmp_path / f"segsplit_{masks}" / "train" / masks / "a.png")
    (tmp_path / "seg.csv").write_text("image,mask\na.png,a_mask.png\n")
    (tmp_path / "other.json").write_text('{"hello": 1}')
    for neg in ("cls", "seg_masks", "seg_labels", "seg_annotations", "segsplit_labels", "segsplit_masks",
                "segsplit_annotations", "seg.csv", "other.json", "missing", "det-shapes/x"):
        assert not is_detection_source(tmp_path / neg), neg


# ---------------------------------------------------------------- det-shapes

def test_det_shapes_deterministic_and_valid():
    x, ts = make_det_shapes(120, seed=5)
    x2, ts2 = make_det_shapes(120, seed=5, workers=1)
    assert torch.equal(x, x2) and all(torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
                                      for a, b in zip(ts, ts2))
    assert x.shape == (120, 3, 128, 128) and x.dtype == torch.uint8 and len(ts) == 120
    assert not torch.equal(make_det_shapes(4, seed=6)[0], x[:4])
    counts = [len(t["labels"]) for t in ts]
    assert min(counts) == 0 and max(counts) <= 6 and sum(counts) > 250  # some negatives, ~3 objects an image
    boxes = torch.cat([t["boxes"] for t in ts])
    labels = torch.cat([t["labels"] for t in ts])
    assert boxes.min() >= 0 and boxes.max() <= 128 and (boxes[:, 2:] > boxes[:, :2]).all()
    side = (boxes[:, 2:] - boxes[:, :2]).max(dim=1).values
    assert side.min() >= 2 and side.max() <= 61 and (side < 16).any() and (side > 40).any()  # several scales
    assert set(labels.tolist()) == set(range(len(DET_SHAPES_CLASSES)))
    fp = fingerprint_tensors
    assert fp(x, *[t["boxes"] for t in ts]) == fp(x2, *[t["boxes"] for t in ts2])


# ---------------------------------------------------------------- loaders and transforms

def _same(a, b):
    return len(a) == len(b) and all(torch.equal(xa, xb) and len(ya) == len(yb) and all(
        torch.equal(p[k], q[k]) for p, q in zip(ya, yb) for k in p) for (xa, ya), (xb, yb) in zip(a, b))


def test_tensor_loader_deterministic_resume(tmp_path):
    x, ts = make_det_shapes(24, seed=1)
    ds = DetTensors(x, ts, DET_SHAPES_CLASSES)
    for preset in ("basic", "standard"):
        dl = make_det_loader(ds, batch_size=8, train=True, seed=3, device="cpu", input_size=(3, 64, 64),
                             aug=AugConfig(preset=preset))
        full = list(dl.epoch(2))
        assert len(full) == 3 and _same(list(dl.epoch(2, start=2)), full[2:])
        assert not _same(list(dl.epoch(3, start=2)), full[2:])
        xb, _yb = full[0]
        assert xb.shape == (8, 3, 64, 64) and xb.dtype == torch.float32 and 0 <= xb.min() and xb.max() <= 1
        for t in (t for _, y in full for t in y):
            assert len(t["boxes"]) == len(t["labels"]) == len(t["difficult"]) and t["orig_size"].tolist() == [128, 128]
            assert (t["boxes"] >= 0).all() and (t["boxes"] <= 64).all()
    ev = make_det_loader(ds.subset(range(10)), batch_size=4, train=False, seed=0, device="cpu", input_size=64)
    out = list(ev.epoch(0))
    assert [len(y) for _, y in out] == [4, 4, 2]
    assert torch.allclose(out[0][1][0]["boxes"], ds.targets[0]["boxes"] / 2)  # 128 -> 64: boxes halve


def test_file_loader_deterministic_resume_and_collate(tmp_path):
    b = build_det_data(_yolo(tmp_path / "yolo"), val_split=0)
    dl = make_det_loader(b.train, batch_size=2, train=True, seed=0, device="cpu", input_size=(3, 48, 48),
                         aug=AugConfig(preset="standard"), workers=0)
    full = list(dl.epoch(1))
    assert len(full) == 1 and _same(list(dl.epoch(1)), full) and _same(list(dl.epoch(1, start=1)), [])
    ev = make_det_loader(b.train, batch_size=2, train=False, seed=0, device="cpu", input_size=(3, 64, 80), workers=1)
    try:
        (xa, ya), (_xb, yb) = list(ev.epoch(0))
        assert xa.shape == (2, 3, 64, 80) and len(yb) == 1 and yb[0]["orig_size"].tolist() == [32, 40]
        k = b.train.paths.index(next(p for p in b.train.paths if p.endswith("a.png")))
        assert torch.allclose([*ya, *yb][k]["boxes"], b.train.targets[k]["boxes"] * 2)  # 32x40 -> 64x80
    finally:
        ev.close()


def _sample(h=60, w=80):
    """An image with 6 boxes; label i, difficult = i is odd (so a misaligned filter shows)."""
    boxes = torch.tensor([[0, 0, 20, 20], [50, 30, 80, 60], [70, 0, 80, 10], [10, 40, 30, 58], [30, 10, 60, 40],
                          [2, 2, 4, 4]], dtype=torch.float32)
    img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return tv_tensors.Image(img), {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
                                   "labels": torch.arange(6), "difficult": torch.arange(6) % 2 == 1}


def test_transforms_keep_boxes_in_canvas_and_aligned():
    seen = set()
    for preset in ("none", "basic", "standard"):
        tf = build_det_train_transform(AugConfig(preset=preset), 48)
        for seed in range(8):
            with isolated_rng(seed):
                x, t = tf(*_sample())
            with isolated_rng(seed):
                x2, t2 = tf(*_sample())
            assert torch.equal(x, x2) and torch.equal(t["boxes"], t2["boxes"])  # seeded: reproducible
            assert x.shape == (3, 48, 48) and x.dtype == torch.float32 and t["boxes"].canvas_size == (48, 48)
            bx = t["boxes"].as_subclass(torch.Tensor)
            assert (bx >= 0).all() and (bx <= 48).all() and (bx[:, 2:] - bx[:, :2] >= 1).all()
            assert torch.equal(t["difficult"], t["labels"] % 2 == 1)
            seen.add(len(bx))
    assert len(seen) > 1  # some boxes were cropped away
    _, t = build_det_eval_transform((30, 40))(*_sample())
    assert t["boxes"][1].tolist() == [25, 15, 40, 30]  # stretch: x / 2, y / 2


def test_batch_augment_keeps_boxes_aligned():
    img, t = _sample(64, 64)
    x = img.as_subclass(torch.Tensor)[None].repeat(16, 1, 1, 1)
    targets = [{k: v.as_subclass(torch.Tensor) for k, v in t.items()} for _ in range(16)]
    aug = DetBatchAugment(AugConfig(preset="standard"), 32, train=True)
    out, ys = aug(x, targets, torch.Generator().manual_seed(0))
    assert out.shape == (16, 3, 32, 32) and 0 <= out.min() and out.max() <= 1
    assert len({len(y["boxes"]) for y in ys}) > 1
    for y in ys:
        assert (y["boxes"] >= 0).all() and (y["boxes"] <= 32).all() and torch.equal(y["difficult"], y["labels"] % 2 == 1)
    out2, ys2 = aug(x, targets, torch.Generator().manual_seed(0))
    assert torch.equal(out, out2) and all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(ys, ys2))
    _ev, ye = DetBatchAugment(None, 32, train=False)(x, targets)
    assert torch.equal(ye[0]["boxes"], targets[0]["boxes"] / 2)
    # a flip alone maps boxes exactly
    flip = DetBatchAugment(AugConfig(preset="basic", hflip=1.0), 64, train=True)
    flip.zoom = None
    xf, yf = flip(x[:1], targets[:1], torch.Generator().manual_seed(0))
    assert torch.allclose(xf[0], x[0].flip(-1).float() / 255, atol=1e-5)
    assert torch.allclose(yf[0]["boxes"][0], torch.tensor([44.0, 0, 64, 20]))


def test_datasets_subset_and_files(tmp_path):
    x, ts = make_det_shapes(6, seed=0)
    ds = DetTensors(x, ts, DET_SHAPES_CLASSES)
    sub = ds.subset([4, 1])
    assert torch.equal(sub.images[0], x[4]) and torch.equal(sub.targets[1]["boxes"], ts[1]["boxes"])
    p = _img(tmp_path / "a.png")
    f = DetFiles([str(p)], [{"boxes": torch.tensor([[1.0, 2, 3, 4]]), "labels": torch.tensor([0])}], ["a"])
    img, t = f[0]
    assert img.shape == (3, 32, 40) and t["difficult"].tolist() == [False] and f.sizes == [(32, 40)]
    assert len(f.subset([])) == 0


def test_the_task_is_inferred_from_each_detection_layout(tmp_path):
    """YOLO's labels/ and COCO's annotations/ beside images/ also read as mask folders to segmentation's check:
    detection is asked first, and a segmentation tree with such folder names stays segmentation."""
    from visionkit.tasks import infer_task
    assert infer_task(str(_yolo(tmp_path / "yolo"))) == "detect"
    assert infer_task(str(_coco(tmp_path / "coco", "train", ["a.png"], [(1, 3, [1, 1, 5, 5])]))) == "detect"
    assert infer_task(str(_voc(tmp_path / "voc"))) == "detect"
    assert infer_task(str(_csv(tmp_path / "csv", ["a.png,cat,1,2,10,12,train"]))) == "detect"
    for masks in ("labels", "annotations"):
        _img(tmp_path / f"seg_{masks}" / "images" / "a.png")
        _img(tmp_path / f"seg_{masks}" / masks / "a.png")
        assert infer_task(str(tmp_path / f"seg_{masks}")) == "segment", masks
