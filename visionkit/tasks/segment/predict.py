"""Segmentation checkpoints at work: ``SegPredictor`` (image files -> masks, overlays, per-class pixel fractions)
and ``evaluate_checkpoints`` (a split's mIoU and per-class table through the task's one evaluator).

Example::

    p = SegPredictor("runs/unet-seg-shapes-1")
    p.predict(["photo.jpg"], out="masks/")   # [{"path", "mask", "overlay", "fractions": {class: fraction}}]
    evaluate_checkpoints(["runs/unet-seg-shapes-1"], split="test")["miou"]
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from ...config import Config, ConfigError, resolve_config
from ...core.runtime import resolve_device, run_autocast
from ...engine.checkpoint import load_checkpoint
from ...engine.loop import evaluate
from ..base import output_files, read_images, split_to_score
from .data import voc_colormap
from .models import create_seg_model
from .task import SegmentationTask, build_bundle, loader_for, model_kwargs, upsample_logits


@dataclass
class SegModelFile:
    """A trained segmentation model with everything needed to use it."""
    path: str
    classes: list[str]
    preprocess: dict
    config: Config
    model: torch.nn.Module
    autocast: object
    device: torch.device
    palette: list


def load_seg_model(checkpoint: str | os.PathLike, device: str | torch.device = "auto") -> SegModelFile:
    """A checkpoint (a run directory means its best.pt) as an eval-mode model on ``device`` (EMA weights if any)."""
    p = Path(checkpoint)
    if p.is_dir() and (p / "best.pt").is_file():
        p = p / "best.pt"
    ckpt = load_checkpoint(p)
    dev = resolve_device(device) if isinstance(device, str) else device
    cfg = resolve_config(base=ckpt["config"])
    kw, _ = model_kwargs(cfg)
    net = create_seg_model(ckpt["model_cfg"]["name"], num_classes=len(ckpt["classes"]), in_chans=3,
                           aux_loss=ckpt["model_cfg"].get("aux_loss", False), **kw)
    net.load_state_dict(ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"])
    palette = ckpt.get("palette") or voc_colormap(max(len(ckpt["classes"]), 1))
    return SegModelFile(str(ckpt["path"]), list(ckpt["classes"]), ckpt["preprocess"], cfg, net.to(dev).eval(),
                        run_autocast(cfg.train.amp, dev), dev, [tuple(c) for c in palette])


def _one(paths: str | list) -> list:
    return [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)


def _check_members(members: list[SegModelFile]) -> None:
    for m in members[1:]:
        if m.classes != members[0].classes:
            raise ConfigError(f"{m.path} has other classes than {members[0].path}; an ensemble needs the same classes")


def _ensemble_task(members: list[SegModelFile], tta: str):
    """The task whose ``predict`` averages the members' softmax (and their mirrored views with TTA)."""
    first = members[0]
    task = SegmentationTask(len(first.classes), loss=None, ignore_index=first.preprocess.get("ignore_index", 255),
                            class_names=first.classes)
    if len(members) == 1:
        return task, first.model, tta != "none"

    class Mean(torch.nn.Module):  # the ensemble as one model: mean softmax as log-probabilities
        def forward(self, x):
            p = sum(task.predict(m.model, x, tta != "none").softmax(1) for m in members) / len(members)
            return {"out": p.clamp_min(1e-12).log()}
    return task, Mean().eval(), False


def evaluate_checkpoints(checkpoints: list[str], data: str | None = None, split: str = "val",
                         ensemble: str = "mean", tta: str = "none", device: str = "auto",
                         batch_size: int | None = None) -> dict:
    """mIoU, pixel accuracy, mean class accuracy, Dice, fwIoU, loss, n and ``per_class`` ({class, iou, acc, dice,
    support}) of a checkpoint (or the mean of several) on a split of ``data`` (default: the run's own), rebuilt
    with the run's hold-out seed and fraction."""
    if ensemble != "mean":
        raise ConfigError(f"--ensemble {ensemble} is for classification; segmentation ensembles average "
                          f"probabilities (--ensemble mean)")
    if tta not in ("none", "flip"):
        raise ConfigError(f"--tta {tta} is for classification; segmentation has none or flip")
    members = [load_seg_model(c, device) for c in _one(checkpoints)]
    _check_members(members)
    first = members[0]
    cfg, ds = split_to_score(first.config, first.classes, build_bundle, data, split, batch_size)
    task, model, flip = _ensemble_task(members, tta)
    loader = loader_for(ds, cfg, first.preprocess, first.device, False)
    try:
        res = evaluate(model, task, loader, first.autocast, tta=flip, full=True)
    finally:
        loader.close()
    res = {k: v for k, v in res.items() if k != "confusion_matrix"} | {"confusion_matrix": res.get("confusion_matrix")}
    return {"split": split, "classes": first.classes, "members": [m.path for m in members], "tta_mode": tta, **res}


def colorize(mask: np.ndarray, palette: list) -> np.ndarray:
    """Index mask [H, W] -> RGB [H, W, 3] with the class colours (ignore and unknown ids black)."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    for i, c in enumerate(palette[:256]):
        lut[i] = c
    return lut[mask]


class SegPredictor:
    """Masks for image files of any size: each image is resized to the model's input size, predicted, and its
    logits resized back (bilinearly) to the image's own size; with ``segment.tile`` > 0 in the run's config (or
    ``tile``), large images are predicted in overlapping tiles at their own resolution instead."""

    task = "segment"

    def __init__(self, checkpoint: str | list[str], device: str = "auto", ensemble: str = "mean", tta: str = "none",
                 tile: int | None = None):
        if ensemble != "mean" or tta not in ("none", "flip"):
            raise ConfigError("segmentation predicts with --ensemble mean and --tta none or flip")
        self.members = [load_seg_model(c, device) for c in _one(checkpoint)]
        _check_members(self.members)
        first = self.members[0]
        self.classes, self.preprocess, self.palette, self.device = first.classes, first.preprocess, first.palette, \
            first.device
        self.task_obj, self.model, self.flip = _ensemble_task(self.members, tta)
        self.tile = first.config.segment.tile if tile is None else tile

    @torch.no_grad()
    def logits(self, image: Image.Image) -> torch.Tensor:
        """[K, H, W] float32 logits of one RGB image at its own size."""
        pre = self.preprocess
        x = TF.to_dtype(TF.pil_to_tensor(image), torch.float32, scale=True)
        x = TF.normalize(x, pre["mean"], pre["std"]).unsqueeze(0).to(self.device)
        h, w = x.shape[-2:]
        if self.tile and max(h, w) > self.tile:
            return self._tiled(x)[0]
        size = pre["input_size"][1:]
        xin = TF.resize(x, list(size), antialias=True) if (h, w) != tuple(size) else x
        with self.members[0].autocast():
            out = self.task_obj.predict(self.model, xin, tta=self.flip)
        return upsample_logits(out.float(), (h, w))[0]

    def _tiled(self, x: torch.Tensor) -> torch.Tensor:
        """Overlapping tiles (stride tile/2) at full resolution; the logits of overlapping tiles are averaged."""
        t = self.tile
        _, _, h, w = x.shape
        ph, pw = max(t - h, 0), max(t - w, 0)
        x = torch.nn.functional.pad(x, (0, pw, 0, ph))
        H, W = x.shape[-2:]
        k = len(self.classes)
        acc = torch.zeros(1, k, H, W, device=x.device)
        cnt = torch.zeros(1, 1, H, W, device=x.device)
        stride = max(t // 2, 1)
        ys = sorted({*range(0, H - t + 1, stride), H - t})
        xs = sorted({*range(0, W - t + 1, stride), W - t})
        for y0 in ys:
            for x0 in xs:
                with self.members[0].autocast():
                    out = self.task_obj.predict(self.model, x[..., y0:y0 + t, x0:x0 + t], tta=self.flip)
                acc[..., y0:y0 + t, x0:x0 + t] += out.float()
                cnt[..., y0:y0 + t, x0:x0 + t] += 1
        return (acc / cnt)[..., :h, :w]

    def predict(self, paths: list[str], out: str | os.PathLike | None = None) -> list[dict]:
        """Per image: ``fractions`` (each class's share of its pixels) and, with ``out``, the index-PNG ``mask``
        (palette PNG: the ids are the pixel values) and a colour ``overlay``. Every image is read before anything is
        written, and no existing file is overwritten."""
        images = read_images(paths)
        targets = output_files(out, paths, ("_mask.png", "_overlay.jpg")) if out is not None else []
        res = []
        flat_palette = [v for c in self.palette[:256] for v in c]
        for i, (p, im) in enumerate(zip(paths, images)):
            mask = self.logits(im).argmax(0).to(torch.uint8).cpu().numpy()
            counts = np.bincount(mask.ravel(), minlength=len(self.classes))
            r = {"path": str(p), "size": [im.width, im.height],
                 "fractions": {c: float(n) / mask.size for c, n in zip(self.classes, counts.tolist())}}
            if targets:
                mpath, opath = targets[i]
                m = Image.fromarray(mask, mode="P")
                m.putpalette(flat_palette + [0] * (768 - len(flat_palette)))
                m.save(mpath)
                blend = (0.5 * np.asarray(im, dtype=np.float32) + 0.5 * colorize(mask, self.palette)).astype(np.uint8)
                Image.fromarray(blend).save(opath, quality=90)
                r.update(mask=str(mpath), overlay=str(opath))
            res.append(r)
        return res
