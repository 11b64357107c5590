"""Image classification: cross-entropy (with label smoothing, class weights and soft MixUp/CutMix targets), and the
set-up of a classification run (data, model, pretrained weights, fine-tuning strategy, loaders, optimizer)."""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ... import finetune as ft
from ...config import Config
from ...core.runtime import autocast_for
from ...data import class_weights
from ...engine import distributed
from ...engine.distributed import Dist
from ...engine.optim import build_optimizer, build_scheduler
from ...models import create_model
from ...transforms import build_batch_mix
from ..base import Setup, check_resume_classes, monitor_for, start_run
from .data import build_bundle, loader_for, preprocess_for
from .metrics import ClassificationMetrics


class ClassificationTask:
    """Forward + loss for the training loop, and a metric accumulator for evaluation.

    Example::

        task = ClassificationTask(num_classes=10, label_smoothing=0.1)
        out = task.training_step(model, (x, y))   # {"loss", "n", "logs": {"acc": hits}}
    """

    name = "classify"
    monitor = ("val_acc1", "max")
    log_names = ("acc",)
    metric_names = ("loss", "acc1", "acc5")
    show = ()

    def __init__(self, num_classes: int, label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None):
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.class_weights = class_weights

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        w = self.class_weights.to(logits.device) if self.class_weights is not None else None
        # soft targets (MixUp/CutMix) are already smoothed by the mixing; hard targets get label smoothing here
        ls = self.label_smoothing if target.dtype == torch.long else 0.0
        return F.cross_entropy(logits.float(), target, weight=w, label_smoothing=ls)

    def training_step(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict:
        x, target = batch
        logits = model(x)
        loss = self.loss(logits, target)
        hard = target if target.dtype == torch.long else target.argmax(1)
        correct = (logits.detach().argmax(1) == hard).sum()
        return {"loss": loss, "n": x.shape[0], "logs": {"acc": correct}}

    @torch.no_grad()
    def predict(self, model: nn.Module, x: torch.Tensor, tta: bool = False) -> torch.Tensor:
        """Logits (float32); with ``tta``, the mean of the softmax over the image and its mirror, as log-probs."""
        logits = model(x).float()
        if tta:
            p = (logits.softmax(1) + model(x.flip(3)).float().softmax(1)) / 2
            logits = p.clamp_min(1e-12).log()
        return logits

    def new_metrics(self) -> ClassificationMetrics:
        return ClassificationMetrics(self.num_classes)


def _pairs(mix: Callable | None) -> Callable | None:
    """MixUp/CutMix ``(x, y) -> (x, y)`` as the loop's batch transform (a batch is the pair)."""
    return None if mix is None else (lambda batch: mix(*batch))


def setup(cfg: Config, ckpt: dict | None, dist: Dist | None = None, device: torch.device | None = None) -> Setup:
    """Data, model (pretrained weights and the fine-tuning strategy included), loaders, optimizer and schedule.

    ``dist``/``device``: this worker's place and device when several train (``distributed.init`` chose them)."""
    d, device, dtype = start_run(cfg, dist, device)
    bundle = build_bundle(cfg)
    classes = list(bundle.classes)
    check_resume_classes(ckpt, classes)

    source = cfg.model.weights or cfg.model.pretrained  # a local file wins over hub weights
    net = create_model(cfg.model.name, num_classes=len(classes), in_chans=bundle.in_chans,
                       pretrained=source if ckpt is None else False, drop_rate=cfg.model.drop_rate,
                       drop_path_rate=cfg.model.drop_path_rate, weights_strict=cfg.model.weights_strict,
                       **cfg.model.kwargs)
    model_cfg = dict(net.visionkit_cfg)
    pre = ckpt["preprocess"] if ckpt is not None else preprocess_for(cfg, bundle, model_cfg)
    if cfg.dist.sync_bn and d.enabled:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)  # same parameters, same state_dict keys
    net.to(device)
    if cfg.model.channels_last:
        net.to(memory_format=torch.channels_last)
    distributed.broadcast_module(d, net)  # rank 0's weights everywhere, before an EMA copy is taken

    weights = None
    if cfg.data.balance != "none":
        cw = class_weights(bundle.train.targets, len(classes))
        weights = cw if cfg.data.balance == "loss" else cw[torch.as_tensor(bundle.train.targets)]
    task = ClassificationTask(len(classes), cfg.train.label_smoothing,
                              class_weights=weights if cfg.data.balance == "loss" else None)
    sampler = weights if cfg.data.balance == "sampler" else None
    monitor_mode = monitor_for(task, cfg.train.monitor, cfg.train.monitor_mode, bool(bundle.val is not None and len(bundle.val)))[1]
    train_loader = loader_for(bundle.train, cfg, pre, device, True, sampler_weights=sampler, dist=d)
    has_val = bundle.val is not None and len(bundle.val)
    val_loader = loader_for(bundle.val, cfg, pre, device, False, dist=d) if has_val else None
    quiet = cfg.train.quiet or not d.is_main

    autocast = autocast_for(device, dtype)
    decision = None
    if ckpt is not None:  # a resumed run keeps its strategy; checkpoints older than strategies trained everything
        decision = ft.Decision(**ckpt["finetune"]) if ckpt.get("finetune") else ft.Decision(
            "none", "resumed from a checkpoint written before fine-tuning strategies existed", len(bundle.train))
    clean = None  # the train set without augmentation: for the auto decision and a linear probe's feature cache
    if decision is None:
        if cfg.finetune.strategy in ("auto", "linear-probe") and source:
            clean = loader_for(bundle.train, cfg, pre, device, False)  # the whole set on every rank
        # rank 0 decides for all: every rank must train the same way
        decision = distributed.on_main(d, lambda: choose_finetune(cfg, net, bundle, clean, bool(source), autocast))
    ftc = dataclasses.replace(cfg.finetune, **decision.settings)
    probe = decision.strategy == "linear-probe"
    epochs, optim_cfg, sched_cfg, forward_model, extra = cfg.train.epochs, cfg.optim, cfg.sched, None, []
    if decision.strategy == "linear-probe":  # the head alone, on cached features
        head = ft.probe_head(net, model_cfg["name"])
        clean = clean if clean is not None else loader_for(bundle.train, cfg, pre, device, False)
        images = [ld for ld in (train_loader, val_loader) if ld is not None]
        if d.world > 1:  # every rank caches the whole set; the feature loaders split the batches
            train_loader = loader_for(bundle.train, cfg, pre, device, True, sampler_weights=sampler)
            val_loader = loader_for(bundle.val, cfg, pre, device, False) if has_val else None
            images += [ld for ld in (train_loader, val_loader) if ld is not None]
        train_loader, val_loader = ft.probe_loaders(net, head, train_loader, clean, val_loader, ftc, ftc.probe_batch_size,
                                                    cfg.train.seed, autocast, quiet, rank=d.rank, world=d.world)
        for ld in images:  # replaced by the feature caches
            ld.close()
        for p in net.parameters():
            p.requires_grad_(False)
        head.requires_grad_(True)
        forward_model = ft.HeadOnly(head)
        epochs = ftc.probe_epochs
        optim_cfg = dataclasses.replace(cfg.optim, name="adamw", lr=ftc.probe_lr, weight_decay=ftc.probe_weight_decay)
        sched_cfg = dataclasses.replace(cfg.sched, name="cosine", warmup_epochs=0.0)
        opt = build_optimizer(forward_model, optim_cfg)
    else:
        opt, extra = ft.optimizer_for(net, decision.strategy, ftc, cfg.optim, quiet)
    if clean is not None:
        clean.close()
    steps_per_epoch = -(-len(train_loader) // cfg.train.grad_accum)
    sched, per_step = build_scheduler(opt, sched_cfg, epochs, steps_per_epoch, optim_cfg.lr, monitor_mode)
    ema = None
    if cfg.train.ema and decision.strategy != "linear-probe":
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(net, decay=cfg.train.ema_decay, use_warmup=cfg.train.ema_warmup)
    if cfg.model.compile and forward_model is None:
        forward_model = torch.compile(net)
    distributed.seed_rank(cfg.train.seed, d)  # from here on, each rank its own dropout / mixing draws
    return Setup(device=device, dtype=dtype, bundle=bundle, classes=classes, net=net, model_cfg=model_cfg, pre=pre,
                 task=task, train_loader=train_loader, val_loader=val_loader, opt=opt, sched=sched, per_step=per_step,
                 steps_per_epoch=steps_per_epoch, epochs=epochs, ema=ema, dist=d,
                 loader_for=lambda ds: loader_for(ds, cfg, pre, device, False),
                 forward_model=forward_model, callbacks=extra,
                 batch_transform=None if probe else _pairs(build_batch_mix(cfg.aug, len(classes))),
                 decision=decision, probe=probe, meta={"finetune": decision.to_dict()},
                 # a linear probe is a convex fit on a fixed schedule: its last epoch is the model, and the best
                 # epoch on a small validation split (tens of images on data this size) is noise
                 monitor="epoch" if probe else None)


def choose_finetune(cfg: Config, net: torch.nn.Module, bundle, clean, pretrained: bool,
                    autocast: Callable | None = None):
    """The run's fine-tuning strategy: as asked, or (auto) from the data's size and its distance from the
    pretraining domain, measured on up to ft.SHIFT_IMAGES training images. Printed, and recorded in finetune.json."""
    s, n = cfg.finetune.strategy, len(bundle.train)
    if s != "auto":
        why = "asked for" + ("" if pretrained or s == "none" else "; note: the weights are random, not pretrained")
        d = ft.Decision(s, f"--finetune {s} ({why})", n)
    elif not pretrained:
        d = ft.Decision("none", "no pretrained weights (--pretrained / --weights): everything trains", n)
    else:
        batches, have = [], 0
        gen = clean.epoch(0)
        for x, _ in gen:
            batches.append(x[:ft.SHIFT_IMAGES - have])
            have += len(batches[-1])
            if have >= ft.SHIFT_IMAGES:
                break
        gen.close()
        d = ft.decide(n, ft.domain_shift(net, batches, autocast or autocast_for(torch.device("cpu"), None)))
    if not cfg.train.quiet or (s == "auto" and pretrained):  # an automatic decision is always shown
        print(f"finetune: {d.reason}", file=sys.stderr)
    return d
