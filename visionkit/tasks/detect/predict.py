"""Detection checkpoints at work: ``DetPredictor`` (image files -> boxes with classes and scores, drawn images) and
``evaluate_checkpoints`` (a split's COCO metrics and per-class table through the task's one evaluator).

Several checkpoints (or ``tta="flip"``) are merged the way detections are: every member's boxes pooled, then
per-class NMS (so an object found by two members is kept once, with the higher score).

Example::

    p = DetPredictor("runs/tinyssd-det-shapes-1")
    p.predict(["photo.jpg"], conf=0.25)   # [{"path", "size", "detections": [{"class", "score", "box"}]}]
    evaluate_checkpoints(["runs/tinyssd-det-shapes-1"], split="test")["map"]
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from ...config import Config, ConfigError, resolve_config
from ...core.runtime import resolve_device, run_autocast
from ...engine.checkpoint import load_checkpoint
from ...engine.loop import evaluate
from ..base import output_files, read_images, split_to_score
from .models import create_det_model
from .task import DetectionTask, build_bundle, loader_for, merge, set_postprocess


@dataclass
class DetModelFile:
    """A trained detector with everything needed to use it."""
    path: str
    classes: list[str]
    preprocess: dict
    config: Config
    model: torch.nn.Module
    autocast: object
    device: torch.device
    palette: list | None


def load_det_model(checkpoint: str | os.PathLike, device: str | torch.device = "auto") -> DetModelFile:
    """A checkpoint (a run directory means its best.pt) as an eval-mode detector on ``device`` (EMA weights if
    any), with the run's evaluation post-processing."""
    p = Path(checkpoint)
    if p.is_dir() and (p / "best.pt").is_file():
        p = p / "best.pt"
    ckpt = load_checkpoint(p)
    dev = resolve_device(device) if isinstance(device, str) else device
    cfg = resolve_config(base=ckpt["config"])
    net = create_det_model(ckpt["model_cfg"]["name"], num_classes=len(ckpt["classes"]),
                           img_size=ckpt["preprocess"]["input_size"][-1], **cfg.model.kwargs)
    net.load_state_dict(ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"])
    set_postprocess(net, cfg.detect.eval_conf, cfg.detect.nms_iou, cfg.detect.max_det)
    return DetModelFile(str(ckpt["path"]), list(ckpt["classes"]), ckpt["preprocess"], cfg, net.to(dev).eval(),
                        run_autocast(cfg.train.amp, dev), dev, ckpt.get("palette"))


def _one(paths: str | list) -> list:
    return [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)


class Merged(torch.nn.Module):
    """Several detectors as one (eval only): their detections pooled per image, then per-class NMS."""

    def __init__(self, models: list[torch.nn.Module], iou: float, max_det: int):
        super().__init__()
        self.members = torch.nn.ModuleList(models)
        self.nms_thresh, self.max_det = iou, max_det

    def forward(self, x: torch.Tensor) -> list[dict]:
        task = DetectionTask(1)
        return merge([task.predict(m, x) for m in self.members], self.nms_thresh, self.max_det)


def _check(members: list[DetModelFile], ensemble: str, tta: str) -> None:
    if ensemble != "mean":
        raise ConfigError(f"--ensemble {ensemble} is for classification; detection ensembles pool the members' "
                          f"boxes and keep the best by NMS (--ensemble mean)")
    if tta not in ("none", "flip"):
        raise ConfigError(f"--tta {tta} is for classification; detection has none or flip")
    for m in members[1:]:
        if m.classes != members[0].classes:
            raise ConfigError(f"{m.path} has other classes than {members[0].path}; an ensemble needs the same classes")
        if m.preprocess["input_size"] != members[0].preprocess["input_size"]:
            raise ConfigError(f"{m.path} takes {m.preprocess['input_size'][-1]} px images, {members[0].path} "
                              f"{members[0].preprocess['input_size'][-1]} px; an ensemble needs one input size")


def _model(members: list[DetModelFile]) -> torch.nn.Module:
    first = members[0]
    if len(members) == 1:
        return first.model
    return Merged([m.model for m in members], first.model.nms_thresh, first.model.max_det).eval()


def evaluate_checkpoints(checkpoints: list[str], data: str | None = None, split: str = "val",
                         ensemble: str = "mean", tta: str = "none", device: str = "auto",
                         batch_size: int | None = None) -> dict:
    """COCO mAP@[.5:.95], mAP@.5, mAP@.75, by size, mAR@100, n and ``per_class`` ({class, ap, ap50, ar100,
    support, detections}) of a checkpoint (or several, merged) on a split of ``data`` (default: the run's own),
    rebuilt with the run's hold-out seed and fraction."""
    members = [load_det_model(c, device) for c in _one(checkpoints)]
    _check(members, ensemble, tta)
    first = members[0]
    cfg, ds = split_to_score(first.config, first.classes, build_bundle, data, split, batch_size)
    task = DetectionTask(len(first.classes), first.classes)
    loader = loader_for(ds, cfg, first.preprocess, first.device, False)
    try:
        res = evaluate(_model(members), task, loader, first.autocast, tta=tta == "flip", full=True)
    finally:
        loader.close()
    return {"split": split, "classes": first.classes, "members": [m.path for m in members], "tta_mode": tta, **res}


class DetPredictor:
    """Boxes for image files of any size: each image is resized to the model's input size (as in training), the
    detections are mapped back to the image's own pixels."""

    task = "detect"

    def __init__(self, checkpoint: str | list[str], device: str = "auto", ensemble: str = "mean", tta: str = "none"):
        self.members = [load_det_model(c, device) for c in _one(checkpoint)]
        _check(self.members, ensemble, tta)
        first = self.members[0]
        self.classes, self.preprocess, self.device = first.classes, first.preprocess, first.device
        self.palette = first.palette
        self.model, self.flip = _model(self.members), tta == "flip"
        self.task_obj = DetectionTask(len(self.classes), self.classes)

    @torch.no_grad()
    def detect(self, image: Image.Image, conf: float = 0.25, iou: float = 0.5, max_det: int = 100) -> dict:
        """``{"boxes" [M,4] xyxy in the image's pixels, "scores", "labels"}`` of one RGB image."""
        size = self.preprocess["input_size"][1:]
        x = TF.to_dtype(TF.pil_to_tensor(image), torch.float32, scale=True)
        x = TF.resize(x, list(size), antialias=True).unsqueeze(0).to(self.device)
        models = self.model.members if isinstance(self.model, Merged) else [self.model]
        for m in models:
            set_postprocess(m, conf, iou, max_det)
        if isinstance(self.model, Merged):
            self.model.nms_thresh, self.model.max_det = iou, max_det
        with self.members[0].autocast():
            d = self.task_obj.predict(self.model, x, tta=self.flip)[0]
        sx, sy = image.width / size[1], image.height / size[0]
        boxes = d["boxes"].cpu() * torch.tensor([sx, sy, sx, sy])
        return {"boxes": boxes, "scores": d["scores"].cpu(), "labels": d["labels"].cpu()}

    def predict(self, paths: list[str], conf: float = 0.25, iou: float = 0.5, max_det: int = 100,
                out: str | os.PathLike | None = None) -> list[dict]:
        """Per image: ``detections`` (``class``, ``class_id``, ``score``, ``box`` = [x1, y1, x2, y2] in the image's
        pixels, best first) and, with ``out``, the image with its boxes drawn (``drawn``). Every image is read
        before anything is written, and no existing file is overwritten."""
        if not 0 <= conf < 1 or not 0 < iou <= 1 or max_det < 1:
            raise ConfigError(f"--conf must be in [0, 1), --iou in (0, 1], --max-det >= 1 "
                              f"(got {conf:g}, {iou:g}, {max_det})")
        images = read_images(paths)
        targets = [f for f, in output_files(out, paths, ("_boxes.jpg",))] if out is not None else []
        res = []
        for i, (p, im) in enumerate(zip(paths, images)):
            d = self.detect(im, conf, iou, max_det)
            dets = [{"class": self.classes[int(k)], "class_id": int(k), "score": round(float(s), 4),
                     "box": [round(float(v), 1) for v in b]}
                    for b, s, k in zip(d["boxes"], d["scores"], d["labels"])]
            r = {"path": str(p), "size": [im.width, im.height], "detections": dets}
            if targets:
                draw_boxes(im, d, self.classes, self.palette).save(targets[i], quality=90)
                r["drawn"] = str(targets[i])
            res.append(r)
        return res


def draw_boxes(image: Image.Image, det: dict, classes: list[str], palette: list | None = None,
               width: int = 2) -> Image.Image:
    """``image`` with each detection's box and ``class score`` label drawn (torchvision's draw_bounding_boxes)."""
    from torchvision.utils import draw_bounding_boxes

    x = TF.pil_to_tensor(image)
    if not len(det["boxes"]):
        return image
    colours = [tuple(palette[int(k) % len(palette)]) if palette else None for k in det["labels"]]
    scores = det.get("scores")
    labels = [f"{classes[int(k)]}" + (f" {float(s):.2f}" if scores is not None else "")
              for k, s in zip(det["labels"], scores if scores is not None else det["labels"])]
    drawn = draw_bounding_boxes(x, det["boxes"].float(), labels=labels,
                                colors=colours if palette else None, width=width)
    return TF.to_pil_image(drawn)


__all__ = ["DetPredictor", "Merged", "draw_boxes", "evaluate_checkpoints", "load_det_model"]
