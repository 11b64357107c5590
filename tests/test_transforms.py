"""visionkit.transforms: per-image presets, the batched on-device path, MixUp/CutMix. CPU only, a few seconds."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from visionkit.config import AugConfig
from visionkit.transforms import PRESETS, BatchAugment, build_batch_mix, build_eval_transform, build_train_transform

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def photo(w: int = 160, h: int = 120) -> Image.Image:
    """A photo-like RGB test image: colour gradients, a bright disc and stripes (no extra dependency)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 255 * xx / (w - 1)
    g = 255 * yy / (h - 1)
    b = 127 + 127 * np.sin(xx / 5.0) * np.cos(yy / 7.0)
    disc = (xx - w * 0.6) ** 2 + (yy - h * 0.4) ** 2 < (min(w, h) / 5) ** 2
    arr = np.stack([r, g, b], -1)
    arr[disc] = 240
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")


def normalised_bounds(mean, std) -> tuple[float, float]:
    lo = min((0 - m) / s for m, s in zip(mean, std))
    hi = max((1 - m) / s for m, s in zip(mean, std))
    return lo - 1e-5, hi + 1e-5


@pytest.mark.parametrize("size", [96, 32])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_train_presets_shape_dtype_range(preset, size):
    torch.manual_seed(0)
    tf = build_train_transform(AugConfig(preset=preset, erasing=0.5), (3, size, size), IMAGENET_MEAN, IMAGENET_STD)
    lo, hi = normalised_bounds(IMAGENET_MEAN, IMAGENET_STD)
    for _ in range(3):
        x = tf(photo())
        assert x.shape == (3, size, size) and x.dtype == torch.float32
        assert torch.isfinite(x).all() and lo <= x.min() and x.max() <= hi
        assert x.std() > 0.1  # real content, not a blank image


def test_non_square_and_non_rgb_input():
    tf = build_train_transform(AugConfig(preset="standard"), (3, 80, 112), (0.5,) * 3, (0.5,) * 3)
    assert tf(photo().convert("L")).shape == (3, 80, 112)
    ev = build_eval_transform((3, 80, 112), (0.5,) * 3, (0.5,) * 3)
    assert ev(photo().convert("RGBA")).shape == (3, 80, 112)


@pytest.mark.parametrize("preset", ["none", "basic", "randaugment"])
def test_grayscale_input_size(preset):
    tf = build_train_transform(AugConfig(preset=preset), (1, 28, 28), (0.5,), (0.5,))
    x = tf(photo())
    assert x.shape == (1, 28, 28) and -1.0 - 1e-6 <= x.min() and x.max() <= 1.0 + 1e-6
    assert build_eval_transform((1, 96, 96), (0.5,), (0.5,))(photo()).shape == (1, 96, 96)


def test_eval_exact_normalisation_small():
    img = photo(32, 32)
    x = build_eval_transform((3, 32, 32), IMAGENET_MEAN, IMAGENET_STD)(img)
    ref = (torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None])
    ref = ref / torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(x, ref)


def test_eval_resize_then_center_crop():
    img = photo(200, 100)  # resize shorter side 100 -> floor(96 / 0.875) = 109, then crop 96
    x = build_eval_transform((3, 96, 96), (0.5,) * 3, (0.5,) * 3, crop_pct=0.875)(img)
    assert x.shape == (3, 96, 96)
    full = build_eval_transform((3, 96, 96), (0.5,) * 3, (0.5,) * 3, crop_pct=1.0)(img)
    assert not torch.allclose(x, full)  # crop_pct matters


def test_unknown_preset_and_albumentations_missing(monkeypatch):
    with pytest.raises(ValueError, match="unknown augmentation preset"):
        build_train_transform(AugConfig(preset="fancy"), (3, 32, 32), (0.5,) * 3, (0.5,) * 3)
    monkeypatch.setitem(sys.modules, "albumentations", None)  # makes `import albumentations` fail
    with pytest.raises(ValueError) as e:
        build_train_transform(AugConfig(backend="albumentations"), (3, 32, 32), (0.5,) * 3, (0.5,) * 3)
    assert str(e.value) == "albumentations is not installed: pip install 'visionkit[albumentations]'"


@pytest.mark.parametrize("preset", ["none", "basic", "standard"])
@pytest.mark.parametrize("size", [(3, 96, 96), (1, 32, 32)])
def test_albumentations_backend(preset, size):
    pytest.importorskip("albumentations")
    mean, std = (0.5,) * size[0], (0.5,) * size[0]
    tf = build_train_transform(AugConfig(preset=preset, backend="albumentations", erasing=0.5), size, mean, std)
    x = tf(photo())
    assert x.shape == size and x.dtype == torch.float32 and -1.0 - 1e-5 <= x.min() and x.max() <= 1.0 + 1e-5


# ----------------------------------------------------------------------------------------------- BatchAugment


def batch(b: int = 16, c: int = 1, h: int = 28, w: int = 28, seed: int = 0) -> torch.Tensor:
    """uint8 batch with values 1..255 (exact zeros then only come from padding)."""
    return torch.randint(1, 256, (b, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def norm(x: torch.Tensor, mean: float = 0.5, std: float = 0.5) -> torch.Tensor:
    return (x.float() / 255 - mean) / std


@pytest.mark.parametrize("preset", ["basic", "standard", "randaugment", "trivialaugment"])
def test_batch_determinism_and_global_rng_untouched(preset):
    x = batch(c=3)
    aug = BatchAugment(AugConfig(preset=preset, erasing=0.5), (0.5,) * 3, (0.5,) * 3, (28, 28), train=True)
    cpu_state = torch.get_rng_state()
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    c = aug(x, torch.Generator().manual_seed(2))
    assert torch.equal(torch.get_rng_state(), cpu_state)
    assert a.shape == (16, 3, 28, 28) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_batch_generator_state_advances_like_a_stream():
    """Resuming from a saved generator state reproduces the next batch exactly."""
    x = batch()
    aug = BatchAugment(AugConfig(preset="basic", erasing=0.5), (0.5,), (0.5,), (28, 28), train=True)
    g = torch.Generator().manual_seed(3)
    aug(x, g)
    saved = g.get_state()
    second = aug(x, g)
    assert torch.equal(aug(x, torch.Generator().set_state(saved)), second)


def test_batch_flip_flips():
    x = batch()
    aug = BatchAugment(AugConfig(preset="basic", hflip=1.0, crop_pad=0), (0.5,), (0.5,), (28, 28), train=True)
    torch.testing.assert_close(aug(x, torch.Generator().manual_seed(0)), norm(x.flip(-1)))
    aug0 = BatchAugment(AugConfig(preset="basic", hflip=0.0, crop_pad=0), (0.5,), (0.5,), (28, 28), train=True)
    torch.testing.assert_close(aug0(x, torch.Generator().manual_seed(0)), norm(x))


def shifted(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[i, j] = img[i + dy, j + dx], zero outside."""
    h, w = img.shape[-2:]
    out = torch.zeros_like(img)
    out[..., max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = \
        img[..., max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
    return out


@pytest.mark.parametrize("hflip", [0.0, 1.0])
def test_batch_translation_keeps_content(hflip):
    pad = 3
    x = batch(b=32)
    aug = BatchAugment(AugConfig(preset="basic", hflip=hflip, crop_pad=pad), (0.5,), (0.5,), (28, 28), train=True)
    out = aug(x, torch.Generator().manual_seed(5))
    src = x.flip(-1) if hflip else x
    shifts = set()
    for i in range(len(x)):
        match = [(dy, dx) for dy in range(-pad, pad + 1) for dx in range(-pad, pad + 1)
                 if torch.allclose(out[i], norm(shifted(src[i], dy, dx)), atol=1e-6)]  # padding 0 -> -1
        assert len(match) == 1, f"sample {i}: output is not a zero-padded shift of the input"
        shifts.add(match[0])
    assert len(shifts) > 5  # offsets are per sample, not one for the batch


def test_batch_erasing():
    x = batch(b=32)
    aug = BatchAugment(AugConfig(preset="basic", hflip=0, crop_pad=0, erasing=1.0), (0.5,), (0.5,), (28, 28), True)
    out = aug(x, torch.Generator().manual_seed(0))
    erased = out == 0  # else impossible: normalised 0 would need uint8 127.5
    assert erased.flatten(1).any(1).all()  # every image got a rectangle
    assert not erased.flatten(1).all(1).any()  # none erased entirely
    torch.testing.assert_close(out[~erased], norm(x)[~erased])  # the rest untouched
    none = BatchAugment(AugConfig(preset="basic", hflip=0, crop_pad=0, erasing=0.0), (0.5,), (0.5,), (28, 28), True)
    assert not (none(x, torch.Generator().manual_seed(0)) == 0).any()


def test_batch_eval_exact_and_resize():
    x = batch(c=3)
    mean, std = (0.2, 0.4, 0.6), (0.3, 0.2, 0.1)
    ev = BatchAugment(AugConfig(preset="randaugment", erasing=1.0), mean, std, (28, 28), train=False)
    ref = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(ev(x), ref)
    up = BatchAugment(AugConfig(), mean, std, (32, 32), train=False)(x)
    torch.testing.assert_close(up, F.interpolate(ref, size=(32, 32), mode="bilinear", align_corners=False))
    down = BatchAugment(AugConfig(), mean, std, (14, 14), train=False)(x)
    torch.testing.assert_close(down, F.interpolate(ref, size=(14, 14), mode="bilinear", antialias=True))
    tr = BatchAugment(AugConfig(preset="basic"), mean, std, (40, 36), train=True)(x, torch.Generator().manual_seed(0))
    assert tr.shape == (16, 3, 40, 36)


def test_batch_channel_adaptation():
    x1 = batch(c=1)
    out = BatchAugment(AugConfig(), (0.5,) * 3, (0.5,) * 3, (28, 28), train=False)(x1)
    assert out.shape == (16, 3, 28, 28) and torch.equal(out[:, 0], out[:, 2])
    assert BatchAugment(AugConfig(), (0.5,), (0.5,), (28, 28), train=False)(batch(c=3)).shape == (16, 1, 28, 28)


def test_batch_input_checks():
    aug = BatchAugment(AugConfig(), (0.5,), (0.5,), (28, 28), train=True)
    with pytest.raises(ValueError, match="uint8"):
        aug(torch.rand(2, 1, 28, 28), torch.Generator())
    with pytest.raises(ValueError, match="Generator"):
        aug(batch())


# ----------------------------------------------------------------------------------------------- MixUp / CutMix


def test_batch_mix_off():
    assert build_batch_mix(AugConfig(), 10) is None


@pytest.mark.parametrize("mixup,cutmix", [(0.2, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_batch_mix_soft_targets(mixup, cutmix):
    torch.manual_seed(0)
    mix = build_batch_mix(AugConfig(mixup=mixup, cutmix=cutmix), num_classes=5)
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 5, (8,))
    for _ in range(3):
        xm, ym = mix(x, y)
        assert xm.shape == x.shape and ym.shape == (8, 5) and ym.dtype.is_floating_point
        torch.testing.assert_close(ym.sum(1), torch.ones(8))
        assert (ym >= 0).all()


def test_batch_mix_prob_zero_gives_one_hot():
    mix = build_batch_mix(AugConfig(mixup=0.2, mix_prob=0.0), num_classes=4)
    x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    xm, ym = mix(x, y)
    assert torch.equal(xm, x) and torch.equal(ym, F.one_hot(y, 4).float())
