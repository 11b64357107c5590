"""Object detection for the engine: the losses of a batch, the detections and evaluator for mAP, and the set-up of a
detection run (data, model, loaders, optimizer, schedule).

A detector takes images in [0, 1] and normalises them itself (as torchvision's detectors do); in train mode with
targets it returns its named losses, in eval mode a list of ``{"boxes", "scores", "labels"}`` per image (see
``models.py`` and the contract in this package's ``__init__``).

Example::

    task = DetectionTask(num_classes=5)
    out = task.training_step(model, (x, targets))   # {"loss", "n", "logs": {"loss_cls": ..., "loss_box": ...}}
"""
from __future__ import annotations

import os

import torch
from torch import nn
from torchvision.ops import batched_nms

from ...config import Config
from ...engine import distributed
from ...engine.distributed import Dist
from ..base import Setup, check_resume_classes, monitor_for, start_run, trains_everything
from .data import DetBundle, build_det_data, make_det_loader
from .metrics import DetMetrics
from .models import create_det_model


class DetectionTask:
    """The model's own losses (summed) and a COCO mAP evaluator. Targets are lists of ``{"boxes", "labels", ...}``
    dicts in the pixels of the model's input."""

    name = "detect"
    monitor = ("val_map", "max")
    metric_names = ("map", "map50", "map75", "mar100")
    show = ("val_map50",)

    def __init__(self, num_classes: int, class_names: list[str] | None = None, log_names: tuple[str, ...] = ()):
        self.num_classes, self.class_names = num_classes, class_names
        self.log_names = log_names  # the model's loss terms: each is logged as train_<name>

    def training_step(self, model: nn.Module, batch: tuple[torch.Tensor, list[dict]]) -> dict:
        x, targets = batch
        losses = model(x, targets)
        loss = sum(losses.values())
        n = x.shape[0]
        return {"loss": loss, "n": n, "logs": {k: v.detach().float() * n for k, v in losses.items()}}

    @torch.no_grad()
    def predict(self, model: nn.Module, x: torch.Tensor, tta: bool = False) -> list[dict]:
        """Detections per image (float32 boxes in input pixels); with ``tta`` also on the mirrored batch, merged
        by per-class NMS at the model's own IoU threshold."""
        dets = [_float(d) for d in model(x)]
        if not tta:
            return dets
        w = x.shape[-1]
        mirrored = []
        for m in model(x.flip(-1)):
            m = _float(m)
            boxes = m["boxes"].clone()
            boxes[:, 0], boxes[:, 2] = w - m["boxes"][:, 2], w - m["boxes"][:, 0]
            mirrored.append({**m, "boxes": boxes})
        return merge([dets, mirrored], getattr(model, "nms_thresh", 0.5), getattr(model, "max_det", 100))

    def new_metrics(self) -> DetMetrics:
        return DetMetrics(self.num_classes, class_names=self.class_names)


def merge(parts: list[list[dict]], iou: float, max_det: int) -> list[dict]:
    """Per image, the detections of several sources (TTA views, ensemble members) pooled and reduced by per-class
    NMS (the best ``max_det`` kept)."""
    out = []
    for dets in zip(*parts):
        boxes = torch.cat([d["boxes"] for d in dets])
        scores = torch.cat([d["scores"] for d in dets])
        labels = torch.cat([d["labels"] for d in dets])
        keep = batched_nms(boxes, scores, labels, iou)[:max_det]
        out.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return out


def _float(d: dict) -> dict:
    return {"boxes": d["boxes"].float(), "scores": d["scores"].float(), "labels": d["labels"].long()}


def build_bundle(cfg: Config) -> DetBundle:
    """The run's data, split as training split it (same hold-out seed and fraction)."""
    seed = cfg.data.split_seed if cfg.data.split_seed is not None else cfg.train.seed
    return build_det_data(cfg.data.source, val_split=cfg.data.val_split, seed=seed, bad_images=cfg.data.bad_images)


def preprocess_for(cfg: Config, bundle: DetBundle, model_cfg: dict) -> dict:
    """Input size and how images reach it, stored in checkpoints: predict and eval resize to it and map boxes back."""
    size = cfg.data.img_size or model_cfg["input_size"][-1]
    return {"input_size": [3, size, size], "mean": list(model_cfg["mean"]), "std": list(model_cfg["std"]),
            "interpolation": "bilinear", "resize": model_cfg.get("resize", "stretch"), "scale": "0-1"}


def loader_for(ds, cfg: Config, pre: dict, device: torch.device, train: bool, dist: Dist | None = None):
    """A loader of ``ds`` with the run's preprocessing; ``dist``: this worker's part of every global batch."""
    d = dist or Dist()
    bs = cfg.data.batch_size if train else (cfg.data.eval_batch_size or 2 * cfg.data.batch_size)
    workers = cfg.data.workers
    if workers is None:
        workers = min(4, (os.cpu_count() or 1) // d.local_world)
    return make_det_loader(ds, batch_size=bs, train=train, seed=cfg.train.seed, device=device,
                           input_size=tuple(pre["input_size"]), aug=cfg.aug if train else None, workers=workers,
                           channels_last=cfg.model.channels_last, rank=d.rank, world=d.world)


def set_postprocess(model: nn.Module, conf: float, iou: float, max_det: int) -> None:
    """The detector's score threshold, NMS IoU and detections per image (the model maps them onto its own)."""
    model.score_thresh, model.nms_thresh, model.max_det = conf, iou, max_det


def setup(cfg: Config, ckpt: dict | None, dist: Dist | None = None, device: torch.device | None = None) -> Setup:
    """Data, model (pretrained backbone included), loaders, optimizer and schedule of a detection run."""
    d, device, dtype = start_run(cfg, dist, device)
    bundle = build_bundle(cfg)
    classes = list(bundle.classes)
    check_resume_classes(ckpt, classes)
    source = cfg.model.weights or cfg.model.pretrained
    size = ckpt["preprocess"]["input_size"][-1] if ckpt is not None else (cfg.data.img_size or bundle.native_size)
    net = create_det_model(cfg.model.name, num_classes=len(classes), pretrained=source if ckpt is None else False,
                           img_size=size, **cfg.model.kwargs)
    set_postprocess(net, cfg.detect.eval_conf, cfg.detect.nms_iou, cfg.detect.max_det)
    model_cfg = dict(net.visionkit_cfg)
    pre = ckpt["preprocess"] if ckpt is not None else preprocess_for(cfg, bundle, model_cfg)
    if cfg.dist.sync_bn and d.enabled:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    net.to(device)
    if cfg.model.channels_last:
        net.to(memory_format=torch.channels_last)
    distributed.broadcast_module(d, net)

    task = DetectionTask(len(classes), classes, tuple(net.loss_names))
    train_loader = loader_for(bundle.train, cfg, pre, device, True, dist=d)
    has_val = bundle.val is not None and len(bundle.val) > 0
    val_loader = loader_for(bundle.val, cfg, pre, device, False, dist=d) if has_val else None
    monitor_mode = monitor_for(task, cfg.train.monitor, cfg.train.monitor_mode, has_val)[1]
    parts = trains_everything(cfg, net, ckpt, d, len(bundle.train), train_loader, monitor_mode, "detection",
                              announce=bool(source))
    return Setup(device=device, dtype=dtype, bundle=bundle, classes=classes, net=net, model_cfg=model_cfg, pre=pre,
                 task=task, train_loader=train_loader, val_loader=val_loader, dist=d,
                 loader_for=lambda ds: loader_for(ds, cfg, pre, device, False), **parts,
                 meta={"finetune": parts["decision"].to_dict(), "palette": bundle.palette,
                       "category_ids": bundle.category_ids})


__all__ = ["DetectionTask", "build_bundle", "loader_for", "merge", "preprocess_for", "set_postprocess", "setup"]
