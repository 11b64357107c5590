"""Semantic segmentation for the engine: the loss and logs of a batch, the outputs and evaluator for metrics, and
the set-up of a segmentation run (data, model, pretrained encoder, loaders, optimizer, schedule).

Example::

    task = SegmentationTask(num_classes=6, loss=build_seg_loss("ce", 6))
    out = task.training_step(model, (x, masks))   # {"loss", "n", "logs": {"pixel_acc": sum over images}}
"""
from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...config import Config
from ...engine import distributed
from ...engine.distributed import Dist
from ..base import Setup, check_resume_classes, monitor_for, start_run, trains_everything
from .data import SegBundle, build_seg_data, make_seg_loader
from .losses import build_seg_loss
from .metrics import SegMetrics
from .models import create_seg_model


class SegmentationTask:
    """Per-pixel cross-entropy (or Dice / focal / CE + Dice, with an aux head's loss) and a confusion-matrix
    evaluator (mIoU and friends). Outputs are ``{"out": logits [B, K, H, W]}`` dicts; targets ``[B, H, W]`` ids."""

    name = "segment"
    monitor = ("val_miou", "max")
    log_names = ("pixel_acc",)
    metric_names = ("loss", "miou", "pixel_acc", "mean_acc", "dice", "fwiou")
    show = ("val_pixel_acc",)

    def __init__(self, num_classes: int, loss: Callable, ignore_index: int = 255, class_names: list[str] | None = None):
        self.num_classes, self.loss, self.ignore_index = num_classes, loss, ignore_index
        self.class_names = class_names

    def training_step(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict:
        x, target = batch
        out = model(x)
        loss, _ = self.loss(out, target)
        with torch.no_grad():  # per image: the fraction of its labelled pixels predicted right
            valid = target != self.ignore_index
            hits = ((out["out"].argmax(1) == target) & valid).sum((1, 2))
            acc = (hits.float() / valid.sum((1, 2)).clamp_min(1)).sum()
        return {"loss": loss, "n": x.shape[0], "logs": {"pixel_acc": acc}}

    @torch.no_grad()
    def predict(self, model: nn.Module, x: torch.Tensor, tta: bool = False) -> torch.Tensor:
        """Logits [B, K, H, W] (float32); with ``tta``, the mean softmax over the image and its mirror, as log-probs."""
        logits = model(x)["out"].float()
        if tta:
            p = (logits.softmax(1) + model(x.flip(3))["out"].float().flip(3).softmax(1)) / 2
            logits = p.clamp_min(1e-12).log()
        return logits

    def new_metrics(self) -> SegMetrics:
        return SegMetrics(self.num_classes, ignore_index=self.ignore_index, class_names=self.class_names)


def build_bundle(cfg: Config) -> SegBundle:
    """The run's data, split as training split it (same hold-out seed and fraction)."""
    seed = cfg.data.split_seed if cfg.data.split_seed is not None else cfg.train.seed
    return build_seg_data(cfg.data.source, val_split=cfg.data.val_split, seed=seed, bad_images=cfg.data.bad_images)


def preprocess_for(cfg: Config, bundle: SegBundle, model_cfg: dict) -> dict:
    """Input size and normalisation, stored in checkpoints: predict and eval resize images (masks nearest) to it."""
    size = cfg.data.img_size or bundle.native_size or model_cfg["input_size"][-1]
    return {"input_size": [3, size, size], "mean": list(model_cfg["mean"]), "std": list(model_cfg["std"]),
            "interpolation": "bilinear", "resize": "whole", "ignore_index": cfg.segment.ignore_index}


def loader_for(ds, cfg: Config, pre: dict, device: torch.device, train: bool, dist: Dist | None = None):
    """A loader of ``ds`` with the run's preprocessing; ``dist``: this worker's part of every global batch."""
    d = dist or Dist()
    bs = cfg.data.batch_size if train else (cfg.data.eval_batch_size or 2 * cfg.data.batch_size)
    workers = cfg.data.workers
    if workers is None:
        workers = min(4, (os.cpu_count() or 1) // d.local_world)
    return make_seg_loader(ds, batch_size=bs, train=train, seed=cfg.train.seed, device=device,
                           input_size=tuple(pre["input_size"]), mean=pre["mean"], std=pre["std"],
                           aug=cfg.aug if train else None, workers=workers, channels_last=cfg.model.channels_last,
                           rank=d.rank, world=d.world, ignore_index=pre.get("ignore_index", 255))


def model_kwargs(cfg: Config) -> tuple[dict, bool]:
    """(the model's keyword options, whether it has an aux head): torchvision's FCN/DeepLab train with theirs
    (the reference recipe's aux loss) unless ``model.kwargs.aux_loss`` says otherwise."""
    kw = dict(cfg.model.kwargs)
    aux = kw.pop("aux_loss", None)
    if aux is None:
        aux = cfg.model.name.startswith("tv:") and "lraspp" not in cfg.model.name and cfg.segment.aux_weight > 0
    return kw, bool(aux)


def setup(cfg: Config, ckpt: dict | None, dist: Dist | None = None, device: torch.device | None = None) -> Setup:
    """Data, model (pretrained encoder included), loaders, optimizer and schedule of a segmentation run."""
    d, device, dtype = start_run(cfg, dist, device)
    bundle = build_bundle(cfg)
    classes = list(bundle.classes)
    check_resume_classes(ckpt, classes)
    source = cfg.model.weights or cfg.model.pretrained
    kw, aux = model_kwargs(cfg)
    net = create_seg_model(cfg.model.name, num_classes=len(classes), in_chans=3,
                           pretrained=source if ckpt is None else False, aux_loss=aux,
                           weights_strict=cfg.model.weights_strict, **kw)
    model_cfg = {**net.visionkit_cfg, "aux_loss": aux}
    pre = ckpt["preprocess"] if ckpt is not None else preprocess_for(cfg, bundle, model_cfg)
    if cfg.dist.sync_bn and d.enabled:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    net.to(device)
    if cfg.model.channels_last:
        net.to(memory_format=torch.channels_last)
    distributed.broadcast_module(d, net)

    loss = build_seg_loss(cfg.segment.loss, len(classes), ignore_index=cfg.segment.ignore_index,
                          aux_weight=cfg.segment.aux_weight)
    task = SegmentationTask(len(classes), loss, cfg.segment.ignore_index, classes)
    train_loader = loader_for(bundle.train, cfg, pre, device, True, dist=d)
    has_val = bundle.val is not None and len(bundle.val) > 0
    val_loader = loader_for(bundle.val, cfg, pre, device, False, dist=d) if has_val else None
    monitor_mode = monitor_for(task, cfg.train.monitor, cfg.train.monitor_mode, has_val)[1]
    parts = trains_everything(cfg, net, ckpt, d, len(bundle.train), train_loader, monitor_mode, "segmentation",
                              announce=bool(source))
    return Setup(device=device, dtype=dtype, bundle=bundle, classes=classes, net=net, model_cfg=model_cfg, pre=pre,
                 task=task, train_loader=train_loader, val_loader=val_loader, dist=d,
                 loader_for=lambda ds: loader_for(ds, cfg, pre, device, False), **parts,
                 meta={"finetune": parts["decision"].to_dict(), "palette": bundle.palette})


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits at the model's input size back to an image's own (H, W), bilinearly (as torchvision's references)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


__all__ = ["SegmentationTask", "build_bundle", "loader_for", "model_kwargs", "preprocess_for", "setup",
           "upsample_logits"]
