"""Model registry tests: every own model (forward, backward, head reset, options), a few torchvision and timm
models at small input size, name resolution, errors, pretrained loading from local files and offline failures."""
from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision
from torch import nn

import visionkit.models as vm
from visionkit.models import registry

OWN = sorted(vm.own_models())
CFG_KEYS = {"name", "input_size", "mean", "std", "interpolation", "crop_pct", "small_input", "num_classes"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> object:
    """Small tensors on a shared 2-core machine: one intra-op thread avoids OpenMP spin-waits (100x faster here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _check_cfg(model: nn.Module, canonical: str, in_chans: int, num_classes: int) -> None:
    cfg = model.visionkit_cfg
    assert set(cfg) == CFG_KEYS
    assert cfg["name"] == canonical and cfg["num_classes"] == num_classes
    c, h, w = cfg["input_size"]
    assert c == in_chans == len(cfg["mean"]) == len(cfg["std"]) and h > 0 and w > 0
    assert all(0 < s < 1 for s in cfg["std"]) and all(0 <= m < 1 for m in cfg["mean"])
    assert 0 < cfg["crop_pct"] <= 1 and cfg["interpolation"] in {"bilinear", "bicubic", "nearest"}


def _forward_backward(model: nn.Module, x: torch.Tensor, num_classes: int) -> None:
    model.train()
    out = model(x)
    assert out.shape == (x.shape[0], num_classes)
    out.logsumexp(1).mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"


# ------------------------------------------------------------------------------------------------- own models
@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", OWN)
def test_own_model_forward_backward(name: str, in_chans: int) -> None:
    torch.manual_seed(0)
    model = vm.create_model(name, num_classes=7, in_chans=in_chans)
    _check_cfg(model, f"own:{name}", in_chans, 7)
    assert model.visionkit_cfg["small_input"] == vm.own_models()[name].small_input
    _, h, w = model.visionkit_cfg["input_size"]
    _forward_backward(model, torch.randn(2, in_chans, h, w), 7)


@pytest.mark.parametrize("name", OWN)
def test_own_model_head_and_regularisation(name: str) -> None:
    torch.manual_seed(0)
    model = vm.create_model(name, num_classes=5, drop_rate=0.3, drop_path_rate=0.1)  # ignored with a note if unsupported
    x = torch.randn(2, *model.visionkit_cfg["input_size"])
    model.eval()
    feats = model.forward_features(x)
    assert model.forward_head(feats).shape == (2, 5)
    assert model.forward_head(feats, pre_logits=True).ndim == 2
    assert vm.get_classifier(model) is model.get_classifier()
    vm.reset_classifier(model, 3)
    assert model(x).shape == (2, 3) and model.visionkit_cfg["num_classes"] == 3


def test_own_small_resnet_is_torchvision_resnet_with_cifar_stem() -> None:
    model = vm.create_model("resnet18_small", num_classes=10, drop_path_rate=0.2)
    assert isinstance(model, torchvision.models.ResNet)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and isinstance(model.maxpool, nn.Identity)
    rates = [b.drop_path.p for b in model.modules() if isinstance(getattr(b, "drop_path", None),
                                                                    torchvision.ops.StochasticDepth)]
    assert len(rates) == 7 and rates == sorted(rates) and rates[-1] == pytest.approx(0.2)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), model(x))  # stochastic depth and dropout are off in eval mode


def test_mobilenet_v1_width_multiplier() -> None:
    full = vm.create_model("mobilenet_v1", num_classes=10)
    half = vm.create_model("mobilenet_v1", num_classes=10, width_mult=0.5)
    assert half.get_classifier().in_features == 512 and full.get_classifier().in_features == 1024
    assert sum(p.numel() for p in half.parameters()) < sum(p.numel() for p in full.parameters()) / 3


def test_lenet_batchnorm_option() -> None:
    assert any(isinstance(m, nn.BatchNorm2d) for m in vm.create_model("lenet", 10, in_chans=1, bn=True).modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in vm.create_model("lenet", 10, in_chans=1).modules())


# ------------------------------------------------------------------------------------- torchvision and timm
EXTERNAL = [("tv:resnet18", {}), ("tv:mobilenet_v3_small", {}), ("tv:efficientnet_b0", {}),
            ("timm:resnet10t", {}), ("timm:convnext_atto", {}), ("timm:vit_tiny_patch16_224", {"img_size": 32}),
            ("timm:tf_efficientnet_lite0", {})]


@pytest.mark.parametrize("name,kwargs", EXTERNAL, ids=[n for n, _ in EXTERNAL])
def test_external_model(name: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    model = vm.create_model(name, num_classes=4, in_chans=1, **kwargs)
    _check_cfg(model, name, 1, 4)
    assert vm.get_classifier(model).out_features == 4
    _forward_backward(model, torch.randn(2, 1, 32, 32), 4)
    vm.reset_classifier(model, 6)
    assert vm.get_classifier(model).out_features == 6
    assert model.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 6)


def test_external_regularisation_options(capsys: pytest.CaptureFixture) -> None:
    eff = vm.create_model("tv:efficientnet_b0", 3, drop_rate=0.3, drop_path_rate=0.1)
    assert eff.classifier[0].p == 0.3
    assert any(isinstance(m, torchvision.ops.StochasticDepth) and m.p > 0 for m in eff.modules())
    res = vm.create_model("tv:resnet18", 3, drop_rate=0.3)  # no dropout option: added before the head, same keys
    assert {"fc.weight", "fc.bias"} <= set(res.state_dict()) and res.fc.drop_rate == 0.3
    vm.reset_classifier(res, 2)
    assert res.fc.drop_rate == 0.3 and res.fc.out_features == 2
    vm.create_model("tv:resnet18", 3, drop_path_rate=0.1)
    assert "tv:resnet18 has no stochastic depth; drop_path_rate=0.1 is ignored" in capsys.readouterr().err
    vit = vm.create_model("timm:vit_tiny_patch16_224", 3, img_size=32, drop_rate=0.1, drop_path_rate=0.1)
    assert vit.visionkit_cfg["input_size"] == (3, 32, 32)


def test_tv_head_reset_to_features() -> None:
    model = vm.create_model("tv:squeezenet1_0", 3, in_chans=1)  # head is a 1x1 conv, not a Linear
    assert isinstance(vm.get_classifier(model), nn.Conv2d)
    vm.reset_classifier(model, 0)
    assert model.eval()(torch.randn(1, 1, 64, 64)).shape == (1, 512)


# ------------------------------------------------------------------------------------------------------ names
def test_resolution_order(monkeypatch: pytest.MonkeyPatch) -> None:
    assert vm.resolve_name("lenet") == ("own", "lenet")
    assert vm.resolve_name("resnet18") == ("tv", "resnet18")
    assert vm.resolve_name("efficientnet_lite0") == ("timm", "tf_efficientnet_lite0")  # packaged-weights alias
    assert vm.resolve_name("mixnet_s") == ("timm", "mixnet_s")
    assert vm.resolve_name("timm:resnet18") == ("timm", "resnet18")
    assert vm.resolve_name("torchvision:resnet18") == ("tv", "resnet18")
    assert vm.resolve_name("resnet10t.c3_in1k") == ("timm", "resnet10t.c3_in1k")
    entry = registry.ModelEntry("resnet18", vm.own_models()["lenet"].factory)
    monkeypatch.setitem(registry._OWN, "resnet18", entry)  # a bare name in own and torchvision picks own
    assert vm.resolve_name("resnet18") == ("own", "resnet18")
    assert vm.resolve_name("tv:resnet18") == ("tv", "resnet18")


@pytest.mark.parametrize("name,match", [("resnet81", "did you mean.*resnet18"), ("tv:lenet", "exists as 'own:lenet'"),
                                        ("timm:convnext_atoo", "convnext_atto"), ("foo:bar", "own:, tv: or timm:")])
def test_unknown_name(name: str, match: str) -> None:
    with pytest.raises(vm.ModelError, match=match) as info:
        vm.create_model(name, num_classes=3)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_unknown_option_is_one_line_error() -> None:
    for name in ("lenet", "tv:resnet18", "timm:resnet10t"):
        with pytest.raises(vm.ModelError, match="does not accept the option 'bogus'"):
            vm.create_model(name, 3, bogus=1)


def test_list_models() -> None:
    rows = vm.list_models()
    names = {r["name"] for r in rows}
    assert {f"own:{n}" for n in OWN} <= names and {"tv:resnet18", "timm:resnet18"} <= names
    assert all(set(r) == {"name", "source", "resolves_to", "description"} for r in rows)
    by_name = {r["name"]: r for r in rows}
    assert by_name["timm:resnet18"]["resolves_to"] == "tv:resnet18"
    assert by_name["timm:efficientnet_lite0"]["resolves_to"] == "timm:tf_efficientnet_lite0"  # the bare name is the alias
    assert by_name["timm:mixnet_s"]["resolves_to"] == "timm:mixnet_s"
    assert by_name["tv:resnet18"]["description"].startswith("ResNet-18")
    assert [r["name"] for r in vm.list_models("own:len")] == ["own:lenet"]
    assert {r["source"] for r in vm.list_models("resnet18*")} == {"own", "tv", "timm"}
    assert all(r["source"] == "tv" for r in vm.list_models("tv:*"))


# -------------------------------------------------------------------------------------------------- pretrained
def test_pretrained_own_model_has_no_weights() -> None:
    with pytest.raises(vm.ModelError, match="has no pretrained weights"):
        vm.create_model("lenet", num_classes=10, in_chans=1, pretrained=True)


def test_pretrained_tv_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache, so the download function is reached

    def offline(url: str, *args: object, **kwargs: object) -> None:
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(vm.ModelError) as info:
        vm.create_model("tv:resnet18", num_classes=3, pretrained=True)
    msg = str(info.value)
    assert "resnet18-f37072fd.pth" in msg and "unreachable" in msg and "\n" not in msg


def test_pretrained_timm_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm.models._builder as builder
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args: object, **kwargs: object) -> None:
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(builder, "load_state_dict_from_hf", offline)
    with pytest.raises(vm.ModelError, match=r"hf-hub:timm/resnet10t\.c3_in1k.*unreachable"):
        vm.create_model("timm:resnet10t", num_classes=3, pretrained=True)


def test_pretrained_tv_from_hub_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The real torchvision loading path, fed a local file in the hub cache instead of a download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    ref = torchvision.models.resnet18()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(ref.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    model = vm.create_model("tv:resnet18", num_classes=5, in_chans=1, pretrained=True)
    assert torch.equal(model.layer1[0].conv1.weight, ref.layer1[0].conv1.weight)
    assert torch.allclose(model.conv1.weight, ref.conv1.weight.sum(1, keepdim=True))  # timm's RGB → 1 channel
    assert model.fc.out_features == 5
    _check_cfg(model, "tv:resnet18", 1, 5)
    assert model.visionkit_cfg["crop_pct"] == pytest.approx(224 / 256)


def test_pretrained_local_files(tmp_path: Path) -> None:
    torch.manual_seed(0)
    lenet = vm.create_model("lenet", num_classes=10, in_chans=1)
    torch.save({"model": lenet.state_dict()}, tmp_path / "lenet.pth")  # checkpoint wrappers are unwrapped
    again = vm.create_model("lenet", num_classes=4, in_chans=3, pretrained=tmp_path / "lenet.pth")
    assert torch.equal(again.mlp[0].weight, lenet.mlp[0].weight) and again.fc.out_features == 4
    assert torch.allclose(again.features[0].weight, lenet.features[0].weight.repeat(1, 3, 1, 1) / 3)

    import timm
    ref = timm.create_model("resnet10t")
    torch.save(ref.state_dict(), tmp_path / "r10t.pth")
    model = vm.create_model("timm:resnet10t", num_classes=3, pretrained=str(tmp_path / "r10t.pth"))
    assert torch.equal(model.layer1[0].conv1.weight, ref.layer1[0].conv1.weight) and model.fc.out_features == 3

    with pytest.raises(vm.ModelError, match="fits tv:mobilenet_v3_small; the file is for another architecture"):
        vm.create_model("tv:mobilenet_v3_small", 3, pretrained=tmp_path / "lenet.pth")
    with pytest.raises(vm.ModelError, match="does not exist"):
        vm.create_model("lenet", 3, pretrained=tmp_path / "missing.pth")
