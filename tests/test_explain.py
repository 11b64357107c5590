"""visionkit.explain: CAMs that find what decides the class, the layer each architecture gets, ViT attention maps,
feature grids, and `explain()` / `features()` end to end on checkpoints (files written, nothing overwritten)."""
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

import visionkit
from visionkit.config import ConfigError
from visionkit.data import DataError
from visionkit.explain import explain, features
from visionkit.explain.attention import attention_maps, cls_attention, rollout
from visionkit.explain.cam import METHODS, compute_cams, denormalize, overlay, spatial_layers, target_layer
from visionkit.explain.feature_maps import feature_grid, feature_maps, save_feature_grid
from visionkit.models import create_model

SIZE, PATCH = 40, 12  # localisation images: noise background, one bright square whose colour is the class
COLOURS = torch.tensor([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.1, 0.1, 1.0]])
TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 2}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread (torch and BLAS) is as fast, and far faster on a busy 2-core machine."""
    from threadpoolctl import threadpool_limits
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(n)


def one_line_error(exc_info, *words):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg


def tv_vit(**kw):
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                                mlp_dim=64, num_classes=3, **kw)


# --------------------------------------------------------------------------------------------- localisation
def patch_images(n, seed):
    """Images whose class is decided by the colour of a bright square at a random place; boxes as (top, left)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, SIZE, SIZE, generator=g) * 0.5
    y = torch.randint(0, 3, (n,), generator=g)
    top = torch.randint(0, SIZE - PATCH + 1, (n,), generator=g)
    left = torch.randint(0, SIZE - PATCH + 1, (n,), generator=g)
    for i in range(n):
        x[i, :, top[i]:top[i] + PATCH, left[i]:left[i] + PATCH] = COLOURS[y[i]].view(3, 1, 1)
    return (x - 0.5) / 0.25, y, torch.stack([top, left], 1).numpy()


def small_cnn():
    def cbr(i, o):
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]
    # receptive field of the last conv: 18 px, more than the square, as in any CNN that sees whole objects
    return nn.Sequential(*cbr(3, 16), nn.MaxPool2d(2), *cbr(16, 32), nn.MaxPool2d(2), *cbr(32, 32),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 3))


@pytest.fixture(scope="module")
def patch_model():
    torch.manual_seed(0)
    net = small_cnn()
    x, y, _ = patch_images(2048, seed=1)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, len(x), (32,), generator=g)
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    xt, yt, boxes = patch_images(200, seed=2)
    with torch.no_grad():
        acc = (net(xt).argmax(1) == yt).float().mean().item()
    return net, acc, xt[:50], yt[:50], boxes[:50]


def test_the_patch_model_learns_the_task(patch_model):
    net, acc, *_ = patch_model
    assert acc >= 0.95
    assert target_layer(net, (3, SIZE, SIZE))[2] == "10"  # the last ReLU, which feeds the global pool


@pytest.mark.parametrize("method", list(METHODS))
def test_cam_peak_falls_on_the_deciding_patch(patch_model, method):
    net, _, x, y, boxes = patch_model
    cams = compute_cams(net, x, targets=y.tolist(), method=method, batch_size=16)
    assert cams.shape == (50, SIZE, SIZE) and cams.dtype == np.float32
    assert cams.min() >= 0 and cams.max() <= 1
    r, c = np.divmod(cams.reshape(len(cams), -1).argmax(1), SIZE)
    inside = (r >= boxes[:, 0]) & (r < boxes[:, 0] + PATCH) & (c >= boxes[:, 1]) & (c < boxes[:, 1] + PATCH)
    assert inside.mean() >= 0.9, f"{method}: CAM peak on the patch for {inside.mean():.0%} of the images"


def test_gradient_cams_follow_the_target_class(patch_model):
    """A CAM for a class whose colour is absent must not peak on the patch as the true class's CAM does."""
    net, _, x, y, boxes = patch_model
    true = compute_cams(net, x, targets=y.tolist())
    other = compute_cams(net, x, targets=((y + 1) % 3).tolist())
    inside = np.zeros_like(true, dtype=bool)
    for i, (t, left) in enumerate(boxes):
        inside[i, t:t + PATCH, left:left + PATCH] = True
    assert (true * inside).sum() / true.sum() > 2 * (other * inside).sum() / other.sum()


# ---------------------------------------------------------------------------------------------- layer choice
@pytest.mark.parametrize("name,kwargs,size,layer,layout", [
    ("tv:resnet18", {}, 64, "layer4", "NCHW"),
    ("timm:resnet18", {}, 64, "layer4", "NCHW"),
    ("lenet", {"in_chans": 1}, 28, "features", "NCHW"),
    ("fastnet", {"in_chans": 1}, 28, "stages", "NCHW"),
    ("timm:efficientnet_b0", {}, 64, "bn2", "NCHW"),  # the final conv + BN + act, after the blocks
    ("tv:mobilenet_v3_small", {}, 64, "features", "NCHW"),  # squeeze-excite pools inside are no global pool
    ("timm:vit_tiny_patch16_224", TINY_VIT, 32, "blocks.1.norm1", "tokens"),
    ("timm:deit_tiny_distilled_patch16_224", TINY_VIT, 32, "blocks.1.norm1", "tokens"),
    ("timm:swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 4, "depths": (1, 1, 1, 1),
                                           "embed_dim": 24, "num_heads": (1, 1, 1, 1)}, 64, "norm", "NHWC"),
])
def test_auto_layer_and_cams_per_architecture(name, kwargs, size, layer, layout):
    kwargs = dict(kwargs)
    m = create_model(name, num_classes=3, in_chans=kwargs.pop("in_chans", 3), **kwargs)
    c = m.visionkit_cfg["input_size"][0]
    module, reshape, chosen = target_layer(m, (c, size, size))
    assert chosen == layer and module is m.get_submodule(layer)
    info = spatial_layers(m, (c, size, size))[layer]
    assert info.layout == layout and (reshape is None) == (layout == "NCHW")
    assert min(info.grid) >= 2  # a real map, not a pooled vector
    if layout == "tokens":
        assert info.prefix_tokens == m.num_prefix_tokens and info.grid == (4, 4)  # class (+ distillation) tokens
    cams = compute_cams(m, torch.randn(2, c, size, size))
    assert cams.shape == (2, size, size) and np.isfinite(cams).all() and cams.min() >= 0 and cams.max() <= 1


def test_torchvision_vit_uses_ln_1_of_the_last_block():
    m = tv_vit()
    _, reshape, name = target_layer(m, (3, 32, 32))
    assert name == "encoder.layers.encoder_layer_1.ln_1"
    assert tuple(reshape(torch.zeros(2, 17, 32)).shape) == (2, 32, 4, 4)
    cams = compute_cams(m, torch.randn(3, 3, 32, 32), targets=[0, 1, 2], method="layercam")
    assert cams.shape == (3, 32, 32) and cams.min() >= 0 and cams.max() <= 1


def test_compute_cams_leaves_the_model_as_it_was():
    m = create_model("fastnet", num_classes=3, in_chans=1)
    m.train()
    m.stem.eval()  # a partly frozen model: per-module modes must survive
    m.stem.requires_grad_(False)
    m(torch.randn(2, 1, 28, 28)).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    modes = {n: mod.training for n, mod in m.named_modules()}
    with torch.no_grad():  # CAMs need gradients: they are switched on inside
        cams = compute_cams(m, torch.randn(3, 1, 28, 28), method="gradcam++", batch_size=2)
    assert cams.shape == (3, 28, 28) and cams.max() > 0
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    assert {n: mod.training for n, mod in m.named_modules()} == modes
    assert all(torch.equal(p.grad, grads[n]) for n, p in m.named_parameters() if n in grads)
    assert all(not (mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks) for mod in m.modules())


def test_bad_layer_method_and_target_are_one_line_config_errors():
    m = create_model("tv:resnet18", num_classes=3)
    with pytest.raises(ConfigError) as e:
        target_layer(m, (3, 64, 64), "layer9")
    one_line_error(e, "unknown layer 'layer9'", "layers with spatial outputs: conv1, bn1, relu, maxpool, layer1",
                   "layer4", "more)")
    assert len(str(e.value).split(": ", 1)[1].split(", ")) <= 26  # at most 25 names and the "and N more"
    with pytest.raises(ConfigError) as e:
        target_layer(m, (3, 64, 64), "fc")
    one_line_error(e, "'fc' is the classifier head")
    with pytest.raises(ConfigError) as e:
        compute_cams(m, torch.randn(1, 3, 64, 64), method="gradcam+++")
    one_line_error(e, "unknown CAM method 'gradcam+++'", "gradcam, gradcam++, scorecam, eigencam, layercam, hirescam")
    with pytest.raises(ConfigError) as e:
        compute_cams(m, torch.randn(1, 3, 64, 64), targets=[7])
    one_line_error(e, "target class 7", "3 classes")


def test_scorecam_keeps_no_activations_of_its_masked_forwards():
    m = create_model("lenet", num_classes=3, in_chans=1).eval()
    cam = METHODS["scorecam"](m, [m.features])
    try:
        cam(torch.randn(2, 1, 28, 28), None)
        assert len(cam.activations_and_grads.activations) == 1  # the library keeps one per 16 masked copies too
    finally:
        cam.activations_and_grads.release()


def test_overlay_and_denormalize():
    grey = denormalize(torch.zeros(2, 1, 10, 12), mean=[0.5], std=[0.2])
    assert grey.shape == (2, 10, 12, 3) and np.allclose(grey, 0.5)
    rgb = denormalize(torch.full((1, 3, 4, 4), 10.0), mean=[0.4] * 3, std=[0.2] * 3)
    assert rgb.max() == 1.0  # clipped
    out = overlay(grey[0], np.linspace(0, 1, 30, dtype=np.float32).reshape(5, 6))
    assert out.shape == (10, 12, 3) and out.dtype == np.uint8


# ------------------------------------------------------------------------------------------------ attention
@pytest.mark.parametrize("make", [lambda: create_model("timm:vit_tiny_patch16_224", num_classes=3, **TINY_VIT), tv_vit],
                         ids=["timm", "torchvision"])
def test_attention_maps_rollout_and_cls_attention(make):
    m = make().train()
    x = torch.randn(2, 3, 32, 32)
    maps = attention_maps(m, x)
    assert len(maps) == 2
    for a in maps:
        assert a.ndim == 4 and a.shape[0] == 2 and a.shape[2:] == (17, 17)
        assert a.min() >= 0 and torch.allclose(a.sum(-1), torch.ones(a.shape[:3]), atol=1e-5)
    for r in (rollout(maps), rollout(maps, discard_ratio=0.9, head_fusion="max"), cls_attention(maps)):
        assert r.shape == (2, 4, 4) and r.min() >= 0 and np.allclose(r.max(axis=(1, 2)), 1)
    assert m.training and all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())
    assert all(mod.fused_attn for mod in m.modules() if hasattr(mod, "fused_attn"))


def test_torchvision_attention_weights_are_the_real_ones():
    m = tv_vit().eval()
    x = torch.randn(1, 3, 32, 32)
    seen = {}
    h = m.encoder.layers[0].ln_1.register_forward_hook(lambda mod, i, o: seen.setdefault("x", o))
    maps = attention_maps(m, x)
    h.remove()
    t = seen["x"]
    _, expected = m.encoder.layers[0].self_attention(t, t, t, need_weights=True, average_attn_weights=False)
    assert torch.allclose(maps[0], expected, atol=1e-6)


def test_rollout_follows_where_attention_goes():
    n = 17
    uniform = torch.full((1, 2, n, n), 1 / n)
    assert np.allclose(rollout([uniform] * 3), 1.0)  # everything attended equally: a flat map
    focus = torch.zeros(1, 2, n, n)
    focus[..., 6] = 1.0  # every token attends to patch token 6 (grid cell 5: row 1, col 1)
    for r in (rollout([focus, focus]), cls_attention([focus])):
        assert np.unravel_index(r[0].argmax(), r[0].shape) == (1, 1)
    with pytest.raises(ConfigError) as e:
        rollout([focus], head_fusion="median")
    one_line_error(e, "median", "mean, max, min")


def test_attention_on_a_cnn_says_use_gradcam():
    with pytest.raises(ConfigError) as e:
        attention_maps(create_model("lenet", num_classes=3, in_chans=1), torch.randn(1, 1, 28, 28))
    one_line_error(e, "vision transformer with a class token", "grad-cam", "gradcam")


# ------------------------------------------------------------------------------------------------- features
def test_feature_grid_and_png(tmp_path):
    m = create_model("lenet", num_classes=3, in_chans=1)
    x = torch.randn(1, 1, 28, 28)
    maps, name = feature_maps(m, x, "features.0")
    assert tuple(maps.shape) == (6, 28, 28) and name == "features.0"
    grid = feature_grid(m, x, "features.0", max_channels=4)  # 2 x 2 tiles of 84 px + labels
    assert grid.dtype == np.uint8 and grid.shape == (2 * (84 + 14 + 4) + 4, 2 * (84 + 4) + 4, 3)
    vit = create_model("timm:vit_tiny_patch16_224", num_classes=3, **TINY_VIT)
    assert tuple(feature_maps(vit, torch.randn(3, 32, 32))[0].shape) == (192, 4, 4)  # tokens as maps
    path = save_feature_grid(m, x, "auto", tmp_path / "f.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= 64 and im.size[1] >= 64
    with pytest.raises(ConfigError):
        save_feature_grid(m, x, "auto", path)


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 colour classes, 6 images each: enough for a 1-epoch checkpoint in a second or two."""
    root = tmp_path_factory.mktemp("colours")
    g = torch.Generator().manual_seed(0)
    for name, rgb in {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}.items():
        (root / name).mkdir()
        for i in range(6):
            noise = (torch.rand(40, 40, 3, generator=g) * 60).to(torch.uint8)
            Image.fromarray((torch.tensor(rgb, dtype=torch.uint8) // 2 + noise).numpy()).save(root / name / f"{i}.png")
    return root


def checkpoint(folder, out, model, **over):
    run = visionkit.train(data=str(folder), model=model, epochs=1, out=str(out), quiet=True,
                          overrides={"data.img_size": 32, "data.batch_size": 8, "data.workers": 0, "train.report": False,
                                     "data.val_split": 0.2, **over})
    return run.dir / "best.pt"


@pytest.fixture(scope="module")
def lenet_ckpt(folder, tmp_path_factory):
    return checkpoint(folder, tmp_path_factory.mktemp("runs") / "lenet", "lenet")


@pytest.fixture(scope="module")
def vit_ckpt(folder, tmp_path_factory):
    return checkpoint(folder, tmp_path_factory.mktemp("runs") / "vit", "timm:vit_tiny_patch16_224",
                      **{"model.kwargs": TINY_VIT})


def test_explain_writes_overlays_and_never_overwrites(lenet_ckpt, folder, tmp_path):
    images = [str(folder / "red" / "0.png"), str(folder / "blue" / "1.png")]
    rows = explain(lenet_ckpt, images, out=str(tmp_path / "cams"))
    assert [r["out"].name for r in rows] == ["0_gradcam.png", "1_gradcam.png"]
    for r in rows:
        with Image.open(r["out"]) as im:
            im.verify()
        with Image.open(r["out"]) as im:
            assert im.format == "PNG" and im.size == (224, 224)  # 32 px input, enlarged 7x
        assert r["label"] in ("red", "green", "blue") and 0 <= r["prob"] <= 1 and r["target"] == r["label"]
    before = rows[0]["out"].read_bytes()
    again = explain(lenet_ckpt, images[:1], target="green", method="hirescam", out=str(tmp_path / "cams"))
    assert again[0]["target"] == "green" and again[0]["out"].name == "0_hirescam.png"
    third = explain(lenet_ckpt, images[:1], out=str(tmp_path / "cams"))
    assert third[0]["out"].name == "0_gradcam-1.png" and rows[0]["out"].read_bytes() == before


def test_explain_user_errors_are_one_line(lenet_ckpt, folder, tmp_path):
    img = str(folder / "red" / "0.png")
    for kw, words in [({"target": "purple"}, ("unknown target label 'purple'", "blue, green, red")),
                      ({"method": "smoothgrad"}, ("unknown method 'smoothgrad'", "rollout")),
                      ({"layer": "features.99"}, ("unknown layer 'features.99'", "features")),
                      ({"method": "rollout"}, ("vision transformer", "gradcam"))]:
        with pytest.raises(ConfigError) as e:
            explain(lenet_ckpt, [img], out=str(tmp_path), **kw)
        one_line_error(e, *words)
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture\nsecond line\n")
    with pytest.raises(DataError) as e:
        explain(lenet_ckpt, [img, str(text), str(tmp_path / "missing.png")], out=str(tmp_path / "x"))
    one_line_error(e, "2 of 3 inputs cannot be read", "notes.jpg", "missing.png (not found)")
    assert not (tmp_path / "x").exists()  # nothing written when an input is bad
    with pytest.raises(ConfigError) as e:
        explain(lenet_ckpt, [img], out=str(text))
    one_line_error(e, "is a file")


def test_explain_vit_attention_rollout_and_gradcam(vit_ckpt, folder, tmp_path):
    img = str(folder / "green" / "2.png")
    for method in ("attention", "rollout", "gradcam"):
        (row,) = explain(vit_ckpt, [img], method=method, out=str(tmp_path))
        assert row["out"].name == f"2_{method}.png" and row["out"].stat().st_size > 0
        assert row["target"] == (None if method != "gradcam" else row["label"])
    with pytest.raises(ConfigError):
        explain(vit_ckpt, [img], method="attention", target="red", out=str(tmp_path))


def test_features_default_name_and_no_overwrite(lenet_ckpt, folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    img = str(folder / "red" / "3.png")
    first = features(lenet_ckpt, img)
    assert first.name == "3_features_features.png" and first.exists()
    assert features(lenet_ckpt, img).name == "3_features_features-1.png"
    chosen = features(lenet_ckpt, img, layer="features.0", out=str(tmp_path / "sub" / "g.png"))
    with Image.open(chosen) as im:
        assert im.format == "PNG" and im.size[0] > 100
    with pytest.raises(ConfigError):
        features(lenet_ckpt, img, layer="features.0", out=str(chosen))
