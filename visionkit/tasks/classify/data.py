"""Classification data: a folder of class sub-folders, a CSV of path,label rows or a built-in (``visionkit.data``),
the preprocessing a run stores, and the run's loaders.

Example::

    bundle = build_bundle(cfg)
    pre = preprocess_for(cfg, bundle, net.visionkit_cfg)
    train = loader_for(bundle.train, cfg, pre, torch.device("cpu"), train=True)
"""
from __future__ import annotations

import dataclasses
import os

from ...config import Config
from ...data import build_data, make_loader
from ...engine.distributed import Dist


def preprocess_for(cfg: Config, bundle, model_cfg: dict) -> dict:
    """Input size and normalisation for this run: stored in checkpoints so eval/predict/export never guess."""
    c = bundle.in_chans
    if cfg.data.img_size:
        size = cfg.data.img_size
    elif bundle.native_size:
        size = bundle.native_size
    else:
        size = model_cfg["input_size"][-1]
    mean, std = list(model_cfg["mean"]), list(model_cfg["std"])
    if len(mean) != c:  # e.g. ImageNet RGB statistics for a grey model: use their average
        mean, std = [sum(mean) / len(mean)] * c, [sum(std) / len(std)] * c
    # built-in tensor data sets are whole images, resized and never centre-cropped: predict must do the same
    crop = cfg.data.crop_pct or (1.0 if bundle.native_size else model_cfg.get("crop_pct", 0.875))
    return {"input_size": [c, size, size], "mean": mean, "std": std,
            "interpolation": model_cfg.get("interpolation", "bilinear"), "crop_pct": crop}


def build_bundle(cfg: Config):
    """The run's data: its source split as training split it (same hold-out seed and fraction)."""
    seed = cfg.data.split_seed if cfg.data.split_seed is not None else cfg.train.seed
    return build_data(cfg.data.source, val_split=cfg.data.val_split, seed=seed, bad_images=cfg.data.bad_images,
                      root=cfg.data.root, download=cfg.data.download)


def loader_for(ds, cfg: Config, pre: dict, device, train: bool, sampler_weights=None, dist: Dist | None = None):
    """A loader of ``ds`` with the run's preprocessing; ``dist``: this worker's part of every global batch."""
    d = dist or Dist()
    bs = cfg.data.batch_size if train else (cfg.data.eval_batch_size or 2 * cfg.data.batch_size)
    workers = cfg.data.workers
    if workers is None:  # the machine's cores shared by the workers on it
        workers = min(4, (os.cpu_count() or 1) // d.local_world)
    aug = cfg.aug
    if aug.interpolation == "model":  # train-time resizing as the model's eval preprocessing does it
        aug = dataclasses.replace(aug, interpolation=pre["interpolation"])
    return make_loader(ds, batch_size=bs, train=train, seed=cfg.train.seed, device=device,
                       input_size=tuple(pre["input_size"]), mean=pre["mean"], std=pre["std"],
                       aug=aug if train else None, channels_last=cfg.model.channels_last,
                       workers=workers, sampler_weights=sampler_weights, crop_pct=pre["crop_pct"],
                       interpolation=pre["interpolation"], rank=d.rank, world=d.world)
