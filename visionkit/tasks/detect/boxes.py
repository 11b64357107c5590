"""Anchor boxes, matching, offsets and post-processing: what an anchor-based detector needs besides its network.

This is the part of single-shot detection that Dive into Deep Learning teaches (Zhang et al., d2l.ai, chapter 14.4
"Anchor Boxes" and 14.7 "Single Shot Multibox Detection") and that no library exposes as plain functions; SSD itself is
Liu et al., "SSD: Single Shot MultiBox Detector" (ECCV 2016). Everything box-geometric is torchvision.ops
(``box_iou``, ``box_convert``, ``batched_nms``, ``clip_boxes_to_image``); boxes are ``xyxy`` in pixels throughout.

* :func:`anchors` - d2l's ``multibox_prior``: ``n + m - 1`` anchors centred on every cell of a feature map.
* :func:`assign` - d2l's ``assign_anchor_to_bbox``: every ground-truth box gets its best anchor (greedy, so two truths
  never share one), then every other anchor whose best IoU reaches the threshold.
* :func:`encode` / :func:`decode` - centre/size offsets with the usual variances (d2l's ``offset_boxes`` /
  ``offset_inverse``; torchvision's ``BoxCoder`` with weights 10, 10, 5, 5), exact inverses of each other.
* :func:`multibox_detect` - scores and offsets to per-image detections: per-class NMS (``batched_nms``), background
  excluded, at most ``max_det`` per image, labels ``0..K-1``.

Example::

    >>> import torch
    >>> a = anchors((2, 2), (64, 64), sizes=(0.5, 0.25), ratios=(1, 2, 0.5))
    >>> a.shape  # 2 x 2 cells, 2 + 3 - 1 = 4 anchors each
    torch.Size([16, 4])
    >>> a[0].tolist()  # the first cell's first anchor: size 0.5 of the image, centred on (16, 16)
    [0.0, 0.0, 32.0, 32.0]
    >>> gt = torch.tensor([[0.0, 0.0, 30.0, 30.0]])
    >>> m = assign(a, gt)
    >>> int((m == 0).sum()) >= 1, torch.allclose(decode(a, encode(a, gt[m.clamp(min=0)])), gt[m.clamp(min=0)])
    (True, True)
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchvision.ops import batched_nms, box_convert, box_iou, clip_boxes_to_image

__all__ = ["BOX_WEIGHTS", "anchors", "assign", "decode", "encode", "multibox_detect"]

BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # 1 / the variances (0.1, 0.1, 0.2, 0.2) of SSD's offsets
_MAX_LOG_SCALE = math.log(1000.0 / 16)  # torchvision's clip: exp() of a wild width offset cannot overflow


def anchors(fmap_hw: tuple[int, int], img_hw: tuple[int, int], sizes: Sequence[float],
            ratios: Sequence[float]) -> torch.Tensor:
    """Anchor boxes of one feature map, ``[H * W * (n + m - 1), 4]`` xyxy in pixels of an ``img_hw`` image.

    d2l's ``multibox_prior``: ``sizes`` ``s1..sn`` are fractions of the image's side (``sqrt(H * W)`` for a non-square
    image), ``ratios`` ``r1..rm`` are width / height. Each cell gets the anchors ``(s1..sn, r1)`` then ``(s1, r2..rm)``
    (not every pair: ``n + m - 1`` instead of ``n * m``), all centred on the cell's centre; cells are in row-major
    order and a cell's anchors are consecutive, which is the order of a ``[B, A * C, H, W]`` prediction permuted to
    ``[B, H, W, A * C]`` and flattened.

    Example::

        >>> anchors((1, 1), (100, 100), sizes=(0.2,), ratios=(1, 4)).tolist()
        [[40.0, 40.0, 60.0, 60.0], [30.0, 45.0, 70.0, 55.0]]
    """
    fh, fw = int(fmap_hw[0]), int(fmap_hw[1])
    ih, iw = float(img_hw[0]), float(img_hw[1])
    if not sizes or not ratios:
        raise ValueError("anchors need at least one size and one ratio")
    side = math.sqrt(ih * iw)
    shapes = [(s, ratios[0]) for s in sizes] + [(sizes[0], r) for r in ratios[1:]]
    wh = torch.tensor([(s * side * math.sqrt(r), s * side / math.sqrt(r)) for s, r in shapes])  # [A, 2]
    cy = (torch.arange(fh, dtype=torch.float32) + 0.5) * (ih / fh)
    cx = (torch.arange(fw, dtype=torch.float32) + 0.5) * (iw / fw)
    centres = torch.stack(torch.meshgrid(cx, cy, indexing="xy"), -1).reshape(-1, 1, 2)  # [H*W, 1, 2] (x, y)
    boxes = torch.cat([centres.expand(-1, len(shapes), 2), wh.expand(fh * fw, -1, -1)], -1)  # cx, cy, w, h
    return box_convert(boxes.reshape(-1, 4), "cxcywh", "xyxy")


def assign(anchors: torch.Tensor, gt_boxes: torch.Tensor, iou_thresh: float = 0.5) -> torch.Tensor:
    """The ground-truth box each anchor is matched to (its index), ``-1`` for background; ``[A]`` int64.

    d2l's ``assign_anchor_to_bbox`` (SSD's matching strategy): first every anchor whose largest IoU with a truth
    reaches ``iou_thresh`` takes that truth; then, greedily, the largest remaining entry of the IoU matrix assigns its
    anchor to its truth and both its row and column are discarded, once per truth. So every truth gets an anchor (its
    best one unless a better-overlapping truth took it first) even when no anchor reaches the threshold, and no two
    truths share an anchor - which the simpler "force each truth's argmax anchor" can get wrong for nearby truths.

    Example::

        >>> a = torch.tensor([[0.0, 0, 10, 10], [0, 0, 12, 12], [20, 20, 30, 30]])
        >>> assign(a, torch.tensor([[0.0, 0, 11, 11], [1, 1, 11, 11]])).tolist()  # truth 1's best anchor is taken
        [1, 0, -1]
    """
    n_anchors, n_gt = anchors.shape[0], gt_boxes.shape[0]
    matched = torch.full((n_anchors,), -1, dtype=torch.long, device=anchors.device)
    if n_gt == 0 or n_anchors == 0:
        return matched
    iou = box_iou(anchors, gt_boxes.to(anchors.dtype))  # [A, G]
    best_iou, best_gt = iou.max(1)
    keep = best_iou >= iou_thresh
    matched[keep] = best_gt[keep]
    work = iou.clone()
    for _ in range(min(n_anchors, n_gt)):
        flat = int(work.argmax())
        a, g = divmod(flat, n_gt)
        matched[a] = g
        work[a, :] = -1
        work[:, g] = -1
    return matched


def encode(anchors: torch.Tensor, boxes: torch.Tensor, weights: Sequence[float] = BOX_WEIGHTS) -> torch.Tensor:
    """Offsets of ``boxes`` relative to ``anchors`` (both ``[..., 4]`` xyxy): ``(wx * dx / w_a, wy * dy / h_a,
    ww * log(w / w_a), wh * log(h / h_a))`` with ``dx, dy`` the shift of the centre (d2l's ``offset_boxes``; the
    weights 10, 10, 5, 5 are SSD's variances 0.1 and 0.2 inverted). Boxes need positive widths and heights.

    Example::

        >>> [round(v, 3) for v in encode(torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([[1.0, 0, 11, 20]]))[0].tolist()]
        [1.0, 5.0, 0.0, 3.466]
    """
    wx, wy, ww, wh = weights
    a = box_convert(anchors, "xyxy", "cxcywh")
    b = box_convert(boxes.to(a.dtype), "xyxy", "cxcywh")
    return torch.stack([wx * (b[..., 0] - a[..., 0]) / a[..., 2], wy * (b[..., 1] - a[..., 1]) / a[..., 3],
                        ww * torch.log(b[..., 2] / a[..., 2]), wh * torch.log(b[..., 3] / a[..., 3])], -1)


def decode(anchors: torch.Tensor, offsets: torch.Tensor, weights: Sequence[float] = BOX_WEIGHTS) -> torch.Tensor:
    """Boxes (xyxy) from ``offsets`` relative to ``anchors``: the inverse of :func:`encode` (d2l's
    ``offset_inverse``); the log-size offsets are clipped at ``log(1000 / 16)`` (as torchvision's ``BoxCoder``) so a
    wild prediction cannot overflow.

    Example::

        >>> a = torch.tensor([[0.0, 0, 10, 10]])
        >>> decode(a, torch.tensor([[1.0, 5.0, 0.0, 0.0]])).tolist()
        [[1.0, 5.0, 11.0, 15.0]]
    """
    wx, wy, ww, wh = weights
    a = box_convert(anchors, "xyxy", "cxcywh").to(offsets.dtype)
    cx = offsets[..., 0] / wx * a[..., 2] + a[..., 0]
    cy = offsets[..., 1] / wy * a[..., 3] + a[..., 1]
    w = torch.exp((offsets[..., 2] / ww).clamp(max=_MAX_LOG_SCALE)) * a[..., 2]
    h = torch.exp((offsets[..., 3] / wh).clamp(max=_MAX_LOG_SCALE)) * a[..., 3]
    return box_convert(torch.stack([cx, cy, w, h], -1), "cxcywh", "xyxy")


def multibox_detect(cls_scores: torch.Tensor, offsets: torch.Tensor, anchors: torch.Tensor,
                    score_thresh: float = 0.05, nms_thresh: float = 0.5, max_det: int = 100,
                    img_hw: tuple[int, int] | None = None, logits: bool = True, pre_nms_top: int = 1000,
                    weights: Sequence[float] = BOX_WEIGHTS) -> list[dict[str, torch.Tensor]]:
    """Detections per image from class scores ``[B, A, K + 1]`` (column 0 = background; logits, or probabilities
    with ``logits=False``) and offsets ``[B, A, 4]`` against ``anchors`` ``[A, 4]``.

    As torchvision's SSD post-processing (d2l's ``multibox_detection`` keeps only each anchor's top class and runs one
    class-agnostic NMS; here an anchor may give boxes of several classes): every (anchor, class) pair with a
    softmax score above ``score_thresh`` is a candidate (background never is), at most ``pre_nms_top`` per image by
    score; boxes are decoded, clipped to ``img_hw`` when given, NMS'd per class (``batched_nms`` at ``nms_thresh``)
    and the best ``max_det`` kept. Returns one ``{"boxes" [M, 4], "scores" [M], "labels" [M] in 0..K-1}`` per image,
    sorted by score.

    Example::

        >>> a = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]])
        >>> logits = torch.tensor([[[0.0, 5, 0], [0, 4, 0], [0, 0, 5]]])  # anchors 0, 1: class 0; anchor 2: class 1
        >>> out = multibox_detect(logits, torch.zeros(1, 3, 4), a)[0]
        >>> out["labels"].tolist(), out["boxes"].tolist()  # anchor 1 overlaps anchor 0 (IoU 0.82): suppressed
        ([0, 1], [[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    """
    probs = torch.softmax(cls_scores.float(), -1) if logits else cls_scores.float()
    num_fg = probs.shape[-1] - 1
    out = []
    for p, off in zip(probs, offsets):
        scores = p[:, 1:].reshape(-1)  # anchor-major: index = anchor * K + class
        keep = torch.nonzero(scores > score_thresh).squeeze(1)
        if keep.numel() > pre_nms_top:
            keep = keep[scores[keep].topk(pre_nms_top).indices]
        scores = scores[keep]
        anchor_idx, labels = keep // num_fg, keep % num_fg
        boxes = decode(anchors[anchor_idx], off[anchor_idx].float(), weights)
        if img_hw is not None:
            boxes = clip_boxes_to_image(boxes, (int(img_hw[0]), int(img_hw[1])))
        kept = batched_nms(boxes, scores, labels, nms_thresh)[:max_det]  # sorted by score, best first
        out.append({"boxes": boxes[kept], "scores": scores[kept], "labels": labels[kept]})
    return out
