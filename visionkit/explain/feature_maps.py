"""Feature-map grids: one layer's activations for one image, the most active channels first.

Example::

    >>> import torch
    >>> from visionkit.models import create_model
    >>> m = create_model("lenet", num_classes=3, in_chans=1)
    >>> feature_grid(m, torch.randn(1, 1, 28, 28), "features.2", max_channels=4).shape
    (208, 180, 3)
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import ConfigError
from .cam import _frozen, _model_device, _resolve

__all__ = ["feature_grid", "feature_maps", "save_feature_grid"]

TILE = 64  # smallest tile side in pixels (small maps are enlarged, nearest neighbour)
LABEL = 14  # height of the strip above each tile holding the channel index
PAD = 4


def feature_maps(model: nn.Module, x: torch.Tensor, layer: str = "auto") -> tuple[torch.Tensor, str]:
    """The activations ``[C, h, w]`` of ``layer`` for one normalised image ``x`` (``[C, H, W]`` or ``[1, C, H, W]``)
    and the layer's name (``auto``: the layer CAMs use). Token and NHWC outputs come back as maps.

    Example::

        >>> from visionkit.models import create_model
        >>> maps, name = feature_maps(create_model("lenet", num_classes=3, in_chans=1), torch.randn(1, 28, 28))
        >>> tuple(maps.shape), name
        ((16, 5, 5), 'features')
    """
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or len(x) != 1:
        raise ConfigError(f"feature maps are drawn for one image [1, C, H, W], got shape {tuple(x.shape)}")
    module, reshape, name, _ = _resolve(model, tuple(x.shape[1:]), layer)
    got: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, i, out: got.append(out.detach()))
    device, dtype = _model_device(model)
    try:
        with _frozen(model), torch.no_grad():
            model(x.to(device=device, dtype=dtype))
    finally:
        handle.remove()
    out = got[-1]
    if reshape is not None:
        out = reshape(out)
    return out[0].float().cpu(), name


def _colour(tile: np.ndarray) -> np.ndarray:
    import cv2
    return cv2.cvtColor(cv2.applyColorMap(np.uint8(np.round(tile * 255)), cv2.COLORMAP_VIRIDIS), cv2.COLOR_BGR2RGB)


def feature_grid(model: nn.Module, x: torch.Tensor, layer: str = "auto", max_channels: int = 32) -> np.ndarray:
    """A grid image (uint8 RGB ``[H, W, 3]``) of ``layer``'s feature maps for one image: the ``max_channels`` channels
    with the highest mean activation first, each min-max normalised (viridis), labelled with its channel index.

    See the module docstring for an example.
    """
    from PIL import Image, ImageDraw

    if max_channels < 1:
        raise ConfigError(f"max_channels must be at least 1, got {max_channels}")
    maps, _ = feature_maps(model, x, layer)
    order = maps.flatten(1).mean(1).argsort(descending=True)[:max_channels].tolist()
    h, w = maps.shape[1:]
    scale = max(1, math.ceil(TILE / max(h, w)))
    th, tw = h * scale, w * scale
    cols = math.ceil(math.sqrt(len(order)))
    rows = math.ceil(len(order) / cols)
    cell_h, cell_w = th + LABEL + PAD, tw + PAD
    canvas = np.full((rows * cell_h + PAD, cols * cell_w + PAD, 3), 255, np.uint8)
    for k, c in enumerate(order):
        m = maps[c].numpy()
        lo, hi = float(m.min()), float(m.max())
        m = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
        tile = _colour(np.kron(m, np.ones((scale, scale), np.float32)))
        r, q = divmod(k, cols)
        top, left = r * cell_h + PAD + LABEL, q * cell_w + PAD
        canvas[top:top + th, left:left + tw] = tile
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    for k, c in enumerate(order):
        r, q = divmod(k, cols)
        draw.text((q * cell_w + PAD, r * cell_h + PAD), f"#{c}", fill=(0, 0, 0))
    return np.asarray(img)


def save_feature_grid(model: nn.Module, x: torch.Tensor, layer: str, path: str | Path,
                      max_channels: int = 32) -> Path:
    """Write :func:`feature_grid` as a PNG at ``path`` (never over an existing file: that is a ConfigError).

    Example::

        >>> from visionkit.models import create_model
        >>> save_feature_grid(create_model("lenet", num_classes=3, in_chans=1), torch.randn(1, 28, 28), "auto",
        ...                   "/tmp/lenet_features.png")  # doctest: +SKIP
        PosixPath('/tmp/lenet_features.png')
    """
    from PIL import Image

    path = Path(path)
    grid = feature_grid(model, x, layer, max_channels)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "xb") as f:
            Image.fromarray(grid).save(f, format="PNG")
    except FileExistsError:
        raise ConfigError(f"{path} already exists; choose another output file") from None
    return path
