"""Explain a trained model: CAM overlays (pytorch-grad-cam), ViT attention maps and feature-map grids.

:func:`explain` and :func:`features` work on a checkpoint and image files (they back ``visionkit explain`` and
``visionkit features``); :mod:`.cam`, :mod:`.attention` and :mod:`.feature_maps` hold the tensor-level functions.

Example::

    from visionkit.explain import explain
    for r in explain("runs/x/best.pt", ["cat.jpg"], method="gradcam++"):
        print(r["label"], r["prob"], r["out"])     # cat 0.97 explain/cat_gradcam++.png
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError
from .attention import attention_maps, class_token_grid, cls_attention, rollout
from .cam import METHODS, compute_cams, denormalize, overlay, spatial_layers, target_layer
from .feature_maps import feature_grid, feature_maps, save_feature_grid

__all__ = ["ATTENTION_METHODS", "METHODS", "attention_maps", "cls_attention", "compute_cams", "denormalize",
           "explain", "feature_grid", "feature_maps", "features", "overlay", "rollout", "save_feature_grid",
           "spatial_layers", "target_layer"]

ATTENTION_METHODS = ("attention", "rollout")  # ViT attention of the last layer / rolled out through all layers
MIN_SIDE = 224  # overlays of smaller inputs are enlarged (nearest neighbour) by a whole factor to at least this
MAX_LABELS = 20  # class labels listed in an "unknown target" message


def _read(pred, paths: list[str]) -> torch.Tensor:
    """The images as the model sees them (its eval preprocessing), one DataError naming every unreadable file."""
    from ..data import DataError, load_rgb
    if not paths:
        raise ConfigError("no images given; pass one or more image files")
    images, bad = [], []
    for p in paths:
        try:
            images.append(pred.transform(load_rgb(p)))
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for missing/corrupt/non-image files
            reason = "not found" if isinstance(e, FileNotFoundError) else (str(e).splitlines() or ["unreadable"])[0]
            bad.append(f"{p} ({reason[:120]})")
    if bad:
        raise DataError(f"{len(bad)} of {len(paths)} inputs cannot be read: " + "; ".join(bad[:5]))
    return torch.stack(images)


def _target_index(classes: list[str], target: str | None) -> int | None:
    if target is None:
        return None
    if target in classes:
        return classes.index(target)
    shown = ", ".join(classes[:MAX_LABELS]) + (f", ... (and {len(classes) - MAX_LABELS} more)"
                                               if len(classes) > MAX_LABELS else "")
    raise ConfigError(f"unknown target label {target!r}; the checkpoint's classes are: {shown}")


def _free_path(path: Path) -> Path:
    """``path``, or ``stem-1.png``, ``stem-2.png``, ... when it exists: nothing is overwritten."""
    n, candidate = 0, path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def _write_png(array: np.ndarray, path: Path) -> Path:
    """Write a PNG at ``path`` or the next free name (exclusive create, so a file appearing meanwhile is kept)."""
    from PIL import Image
    while True:
        path = _free_path(path)
        try:
            with open(path, "xb") as f:
                Image.fromarray(array).save(f, format="PNG")
            return path
        except FileExistsError:
            continue


def _enlarge(rgb: np.ndarray, cam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Small inputs (28 px digits) enlarged for viewing: the image by pixel repetition, the CAM smoothly."""
    import cv2
    h, w = rgb.shape[:2]
    k = math.ceil(MIN_SIDE / min(h, w)) if min(h, w) < MIN_SIDE else 1
    if k == 1:
        return rgb, cam
    rgb = np.repeat(np.repeat(rgb, k, axis=0), k, axis=1)
    return rgb, cv2.resize(np.float32(cam), (w * k, h * k), interpolation=cv2.INTER_LINEAR)


def _predict(pred, x: torch.Tensor, batch_size: int = 64) -> tuple[list[int], list[float]]:
    idx, prob = [], []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            with pred.autocast():
                p = pred.model(x[i:i + batch_size].to(pred.device)).float().softmax(1)
            v, c = p.max(1)
            idx += c.tolist()
            prob += v.tolist()
    return idx, prob


def _attention_cams(model: torch.nn.Module, x: torch.Tensor, method: str, batch_size: int = 32) -> np.ndarray:
    """Attention (last layer, class token) or rollout maps at the input's size, ``[N, H, W]``, each min-max scaled
    to [0, 1] as pytorch-grad-cam scales CAMs (attention is often nearly flat: scaled by its maximum alone, an
    overlay would be one colour)."""
    from pytorch_grad_cam.utils.image import scale_cam_image
    prefix, grid = class_token_grid(model, tuple(x.shape[1:]))
    out = []
    for i in range(0, len(x), batch_size):
        maps = attention_maps(model, x[i:i + batch_size])
        small = rollout(maps, prefix_tokens=prefix, grid=grid) if method == "rollout" else \
            cls_attention(maps, prefix_tokens=prefix, grid=grid)
        out.append(scale_cam_image(small, (x.shape[-1], x.shape[-2])))
    return np.clip(np.concatenate(out), 0, 1).astype(np.float32)


def explain(checkpoint: str, images: list[str], method: str = "gradcam", layer: str = "auto",
            target: str | None = None, out: str = "explain", device: str = "auto") -> list[dict]:
    """Write one overlay per image, ``OUT/<stem>_<method>.png``, and return what was explained.

    ``method``: a CAM method (``gradcam``, ``gradcam++``, ``scorecam``, ``eigencam``, ``layercam``, ``hirescam``)
    at ``layer`` (``auto``: the last conv stage / last ViT block), or ``attention`` / ``rollout`` for ViTs with a
    class token (class-agnostic: no ``target``, no ``layer``). ``target``: a class label of the checkpoint
    (default: each image's predicted class). The overlay is drawn on the image as the model sees it (its eval
    resize / crop), enlarged to at least 224 px; existing files are never overwritten (``-1``, ``-2`` suffixes).
    Returns one dict per image: ``path``, ``out`` (the PNG), ``label`` and ``prob`` (the prediction), ``target``
    (the label explained; None for attention maps), ``method``.

    Example::

        rows = explain("runs/x/best.pt", ["a.png", "b.png"], method="gradcam", target="cat", out="cams")
        rows[0]   # {'path': 'a.png', 'out': PosixPath('cams/a_gradcam.png'), 'label': 'dog', 'prob': 0.81, ...}
    """
    from ..tasks.classify.predict import Predictor

    if method not in METHODS and method not in ATTENTION_METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join([*METHODS, *ATTENTION_METHODS])}")
    if method in ATTENTION_METHODS and target is not None:
        raise ConfigError(f"{method} maps do not depend on a class; drop --target, or use a grad-cam method "
                          f"({', '.join(METHODS)}) to explain {target!r}")
    if method in ATTENTION_METHODS and layer not in ("auto", None):
        raise ConfigError(f"{method} maps use every attention layer; drop --layer, or use a grad-cam method")
    outdir = Path(out)
    if outdir.exists() and not outdir.is_dir():
        raise ConfigError(f"--out {outdir} is a file; give a folder for the overlays")
    pred = Predictor(checkpoint, device)
    t = _target_index(pred.classes, target)
    x = _read(pred, [str(p) for p in images])
    idx, prob = _predict(pred, x)
    explained = [t if t is not None else i for i in idx]
    if method in ATTENTION_METHODS:
        cams = _attention_cams(pred.model, x.to(pred.device), method)
    else:
        cams = compute_cams(pred.model, x, targets=explained, method=method, layer=layer or "auto")
    rgbs = denormalize(x, pred.preprocess["mean"], pred.preprocess["std"])
    outdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for p, rgb, cam, c, pr, e in zip(images, rgbs, cams, idx, prob, explained):
        written = _write_png(overlay(*_enlarge(rgb, cam)), outdir / f"{Path(p).stem}_{method}.png")
        rows.append({"path": str(p), "out": written, "label": pred.classes[c], "prob": float(pr),
                     "target": None if method in ATTENTION_METHODS else pred.classes[e], "method": method})
    return rows


def features(checkpoint: str, image: str, layer: str | None = None, out: str | None = None,
             device: str = "auto") -> Path:
    """Write a grid of ``layer``'s feature maps (None: the layer CAMs use) for one image and return its path.

    ``out``: the PNG file, or a folder for it; default ``<image stem>_features_<layer>.png`` in the current
    folder (with a ``-1``, ``-2`` suffix rather than over an existing file; an explicit ``out`` file that exists
    is a ConfigError).

    Example::

        features("runs/x/best.pt", "cat.jpg", layer="layer3")   # PosixPath('cat_features_layer3.png')
    """
    from ..tasks.classify.predict import Predictor

    pred = Predictor(checkpoint, device)
    x = _read(pred, [str(image)])
    _, _, name = target_layer(pred.model, tuple(x.shape[1:]), layer or "auto")
    default = f"{Path(image).stem}_features_{name}.png"
    if out is None or Path(out).is_dir() or str(out).endswith(("/", os.sep)):
        path = _free_path(Path(out or ".") / default)
    else:
        path = Path(out)
    return save_feature_grid(pred.model, x, name, path)
