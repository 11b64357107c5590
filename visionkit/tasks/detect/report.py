"""The detection run report: one self-contained HTML page for a run directory of ``task: detect``.

Sections: run summary, learning curves (loss and its terms, lr; mAP and mAP@.5), per-class AP, the worst and the
best validation images by their own F1 at IoU 0.5 (truth | detections), and the data (splits, objects per class,
box sizes, bad files). The prediction sections score ``best.pt`` (else ``last.pt``) on the run's validation split
(else test) through the task's evaluator; when that is impossible (no checkpoint yet, data not found here) they
say why in one line and the rest still renders. Built with the shared helpers of ``visionkit.report``.

Example::

    from visionkit.tasks.detect.report import build_report
    build_report("runs/tinyssd-det-shapes-1")   # runs/tinyssd-det-shapes-1/report.html, PNGs in .../report/
"""
from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from ...config import ConfigError
from ...core.rundir import atomic_write_bytes
from ...report import html as H
from ...report import plots
from ...report.build import (
    RunFiles,
    best_epoch,
    cfg_value,
    duration,
    eval_split,
    first_line,
    monitor_of,
    pct,
    read_run,
    report_checkpoint,
    run_notes,
)

PLOT_DIR = "report"
PLOT_NAMES = ("curves_loss.png", "curves_lr.png", "curves_quality.png", "per_class_ap.png")
SECTIONS = {"summary": "Run summary", "curves": "Learning curves", "per-class": "Per-class AP",
            "gallery": "Worst and best images", "data": "Data"}
MAX_SCORED = 100  # validation images predicted one by one for the gallery (the whole split is scored for mAP)
MAX_BAD_FILES = 50
TILE_PX = 192
GALLERY_CONF = 0.3  # detections drawn (and counted by the gallery's F1) from this score on
METRIC_HEADS = (("map", "mAP@[.5:.95]"), ("map50", "mAP@.5"), ("map75", "mAP@.75"), ("map_small", "AP small"),
                ("map_medium", "AP medium"), ("map_large", "AP large"), ("mar100", "AR@100"))


def _pct(v) -> str:
    return pct(v, 1) if isinstance(v, (int, float)) else "—"


def _png(fig: Figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def quality_plot(rows: list[dict], best: int | None = None) -> bytes | None:
    """Validation mAP and mAP@.5 per epoch (None when the run has no validation split)."""
    keys = [k for k in ("val_map", "val_map50") if any(r.get(k) is not None for r in rows)]
    if not keys:
        return None
    fig = Figure(figsize=(5, 3.2))
    ax = fig.add_subplot()
    for k in keys:
        pts = [(r["epoch"], r[k]) for r in rows if r.get(k) is not None]
        ax.plot(*zip(*pts), marker="o", ms=3, label=k.replace("val_", "val "))
    if best is not None:
        ax.axvline(best, color="grey", ls=":", lw=1)
    ax.set_xlabel("epoch")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _png(fig)


def ap_bar_plot(per_class: list[dict]) -> bytes:
    """AP@[.5:.95] and AP@.5 per class, horizontal bars."""
    names = [str(c["class"]) for c in per_class]
    fig = Figure(figsize=(5.5, 0.35 * len(names) + 1.2))
    ax = fig.add_subplot()
    y = range(len(names))
    ax.barh([i + 0.2 for i in y], [c["ap50"] or 0 for c in per_class], height=0.4, label="AP@.5", color="#9ecae1")
    ax.barh([i - 0.2 for i in y], [c["ap"] or 0 for c in per_class], height=0.4, label="AP@[.5:.95]",
            color="#3182bd")
    ax.set_yticks(list(y), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _png(fig)


@dataclass
class Predictions:
    checkpoint: Path
    split: str
    scores: dict  # the evaluator's full output on the split
    images: list  # (F1, index, objects, truth tile, detections tile) of up to MAX_SCORED images
    classes: list[str]


def _tile(img: torch.Tensor, det: dict, classes: list[str], palette) -> bytes:
    from .predict import draw_boxes
    pil = TF.to_pil_image(img)
    scale = TILE_PX / max(pil.size)
    if scale != 1:
        pil = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))), Image.BILINEAR)
        det = {**det, "boxes": det["boxes"] * scale}
    buf = io.BytesIO()
    draw_boxes(pil, det, classes, palette, width=1).save(buf, format="PNG")
    return buf.getvalue()


def _predict_split(run: RunFiles, device, bundle=None) -> tuple[Predictions | None, str]:
    """The best checkpoint on the validation split (else test): full metrics, and per-image F1 with drawn tiles."""
    from ...engine.loop import evaluate
    from .metrics import image_hits
    from .predict import load_det_model
    from .task import DetectionTask, build_bundle, loader_for

    ckpt, why = report_checkpoint(run)
    if ckpt is None:
        return None, why
    try:
        m = load_det_model(ckpt, device)
    except (OSError, ValueError) as e:
        return None, first_line(e)
    bundle, split, ds, why = eval_split(run, m.config, m.classes, build_bundle, bundle)
    if ds is None:
        return None, why
    cfg = m.config
    task = DetectionTask(len(m.classes), m.classes)
    loader = loader_for(ds, cfg, m.preprocess, m.device, False)
    try:
        scores = evaluate(m.model, task, loader, m.autocast, full=True)
    finally:
        loader.close()
    size = m.preprocess["input_size"][1:]
    images = []
    palette = m.palette
    with torch.no_grad():
        for i in range(min(len(ds), MAX_SCORED)):
            img, target = ds[i]
            img = img.as_subclass(torch.Tensor)
            h, w = img.shape[-2:]
            x = TF.resize(TF.to_dtype(img, torch.float32, scale=True), list(size), antialias=True)
            with m.autocast():
                d = task.predict(m.model, x.unsqueeze(0).to(m.device))[0]
            sx, sy = w / size[1], h / size[0]
            d = {k: v.cpu() for k, v in d.items()}
            d["boxes"] = d["boxes"] * torch.tensor([sx, sy, sx, sy])
            keep = d["scores"] >= GALLERY_CONF
            shown = {k: v[keep] for k, v in d.items()}
            truth = {"boxes": torch.as_tensor(target["boxes"]).float(), "labels": target["labels"]}
            f1 = image_hits(d, truth, GALLERY_CONF)["f1"]
            images.append((f1, i, img, truth, shown))
    tiles = [(f1, i, len(truth["labels"]), _tile(img, truth, m.classes, palette),
              _tile(img, shown, m.classes, palette)) for f1, i, img, truth, shown in images]
    return Predictions(Path(ckpt), split, scores, tiles, m.classes), ""


class DetReport:
    """Builds the sections; PNG copies of the plots are collected in ``self.pngs`` (file name -> bytes)."""

    def __init__(self, run: RunFiles, pred: Predictions | None, why: str, max_gallery: int) -> None:
        self.run, self.pred, self.why, self.max_gallery = run, pred, why, max_gallery
        self.pngs: dict[str, bytes] = {}
        self.best = best_epoch(run, "val_map")

    def _plot(self, name: str, png: bytes, alt: str) -> H.Html:
        self.pngs[name] = png
        return H.plot(png, alt)

    def summary(self) -> H.Html:
        run, env, summ = self.run, self.run.env or {}, self.run.summary or {}
        out = run_notes(run)
        best_row = next((r for r in run.metrics if r["epoch"] == self.best), None) or summ.get("best") or None
        mon = monitor_of(run, "val_map")
        planned = cfg_value(run, "train.epochs")
        epochs_run = summ.get("epochs_run", len(run.metrics))
        test = summ.get("test") or {}
        wall = duration(summ.get("wall_seconds"))
        out.append(H.cards([
            ("task", "detect"), ("model", cfg_value(run, "model.name")),
            ("data", (run.data or {}).get("name") or cfg_value(run, "data.source")),
            ("best epoch", f"{self.best} of {epochs_run}" if self.best is not None else "—"),
            (f"best {mon}", _pct(best_row.get(mon)) if best_row else "—"),
            ("test mAP", _pct(test.get("map")) if test else None),
            ("test mAP@.5", _pct(test.get("map50")) if test else None),
            ("wall time", wall),
        ]))
        out.append(H.tag("h3", "Run"))
        out.append(H.kv_table([
            ("directory", str(run.dir.resolve())), ("started", env.get("started")),
            ("epochs", f"{epochs_run} of {planned} planned" + (" (stopped early)" if summ.get("stopped_early") else "")
             if planned is not None else epochs_run),
            ("device", " — ".join(str(x) for x in (env.get("device"), env.get("device_name")) if x)),
            ("seed", env.get("seed", cfg_value(run, "train.seed"))), ("command", env.get("command")),
            ("recipe", run.config.get("recipe") or None),
            ("input size", cfg_value(run, "data.img_size")),
            ("optimizer", f"{cfg_value(run, 'optim.name')}, lr {cfg_value(run, 'optim.lr')}"),
            ("batch size", cfg_value(run, "data.batch_size")),
            ("training images", summ.get("n_train")), ("validation images", summ.get("n_val")),
        ]))
        heads = [H.num(h) for _, h in METRIC_HEADS] + [H.num("images")]
        if test:
            out.append(H.tag("h3", "Test split (best weights)"))
            out.append(H.table(heads, [[*[H.num(_pct(test.get(k))) for k, _ in METRIC_HEADS], H.num(test.get("n"))]]))
        if self.pred is not None:
            s = self.pred.scores
            out.append(H.tag("h3", f"This report's predictions: {self.pred.checkpoint.name} on the "
                                   f"{self.pred.split} split"))
            out.append(H.table(heads, [[*[H.num(_pct(s.get(k))) for k, _ in METRIC_HEADS], H.num(s.get("n"))]]))
        else:
            out.append(H.note(f"No predictions in this report: {self.why}."))
        return H.join(out)

    def curves(self) -> H.Html:
        rows = self.run.metrics
        if not rows:
            return H.note("No metrics yet: no epoch has finished, so there are no learning curves to draw.")
        figs = plots.curve_plots(rows, self.best)
        items = []
        if "loss" in figs:
            items.append(self._plot("curves_loss.png", figs["loss"], "loss per epoch"))
        q = quality_plot(rows, self.best)
        if q is not None:
            items.append(self._plot("curves_quality.png", q, "validation mAP per epoch"))
        if "lr" in figs:
            items.append(self._plot("curves_lr.png", figs["lr"], "learning rate per epoch"))
        terms = sorted(k for k in rows[-1] if k.startswith("train_") and k != "train_loss")
        body = [H.plots(items)]
        if terms:
            body.append(H.tag("h3", "Loss terms, last epoch"))
            body.append(H.table([H.num(t[6:]) for t in terms], [[H.num(f"{rows[-1][t]:.4f}") for t in terms]]))
        return H.join(body)

    def per_class(self) -> H.Html:
        if self.pred is None:
            return H.note(f"Needs the model's predictions, which are not available: {self.why}.")
        pcs = self.pred.scores.get("per_class") or []
        if not pcs:
            return H.note("No per-class figures.")
        rows = [[c["class"], H.num(_pct(c["ap"])), H.num(_pct(c["ap50"])), H.num(_pct(c["ar100"])),
                 H.num(c["support"]), H.num(c["detections"])] for c in pcs]
        return H.join([self._plot("per_class_ap.png", ap_bar_plot(pcs), "AP per class"),
                       H.table(["class", H.num("AP@[.5:.95]"), H.num("AP@.5"), H.num("AR@100"), H.num("objects"),
                                H.num("detections")], rows)])

    def gallery(self) -> H.Html:
        if self.pred is None:
            return H.note(f"Needs the model's predictions, which are not available: {self.why}.")
        ims = self.pred.images
        worst = sorted(ims, key=lambda t: (t[0], -t[2], t[1]))  # lowest F1 first; of equals, the most objects
        best = sorted((t for t in ims if t[2]), key=lambda t: (-t[0], -t[2], t[1]))  # images with objects only
        k = min(self.max_gallery, len(ims) // 2)
        if not k:
            return H.note("Too few images to show.")
        out = [H.para(f"Each image's F1 at IoU 0.5 over detections scoring ≥ {GALLERY_CONF:g} (left: truth, right: "
                      f"detections), of the first {len(ims)} images of the {self.pred.split} split; the best are "
                      f"chosen among images with objects (an empty image with no detection is trivially right).",
                      "muted")]
        for title, part in (("Worst", worst[:k]), ("Best", best[:k])):
            out.append(H.tag("h3", title))
            out.append(H.gallery([H.tile([(t, "truth"), (d, "detections")],
                                         f"#{i} · {n} object{'s' * (n != 1)} · F1 {f1:.2f}")
                                  for f1, i, n, t, d in part], pairs=True))
        return H.join(out)

    def data(self) -> H.Html:
        d = self.run.data or {}
        summ = d.get("summary") or {}
        out = []
        splits = {k: v for k, v in summ.items() if isinstance(v, dict)}
        if splits:
            keys = sorted({k for v in splits.values() for k, x in v.items() if isinstance(x, (int, float))})
            out.append(H.table(["split", *[H.num(k) for k in keys]],
                               [[sp, *[H.num(v.get(k, "—")) for k in keys]] for sp, v in splits.items()]))
        else:
            out.append(H.note("No data summary in this run directory."))
        bad = d.get("bad_files") or []
        if bad:
            out.append(H.tag("h3", f"Bad files skipped ({len(bad)})"))
            out.append(H.table(["file", "reason"], [[H.tag("code", b.get("path", "")), b.get("reason", "")]
                                                    for b in bad[:MAX_BAD_FILES]]))
        return H.join(out)


def build_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, device: str = "auto",
                 bundle=None, max_gallery: int = 4) -> Path:
    """Write one self-contained HTML report for a detection run directory; returns its path (default
    ``RUN_DIR/report.html``), PNG copies of the plots in ``RUN_DIR/report/``.

    Example::

        build_report("runs/tinyssd-det-shapes-1", device="cpu")
    """
    if not isinstance(max_gallery, int) or max_gallery < 0:
        raise ConfigError(f"max_gallery must be a whole number >= 0, got {max_gallery!r}")
    from ...core.runtime import resolve_device
    t0 = time.perf_counter()
    run = read_run(run_dir)
    task = run.config.get("task")
    if task not in ("detect", "detection"):
        raise ConfigError(f"{run.dir} is a {task} run, not a detection run; use visionkit report {run.dir}")
    dev = resolve_device(device)
    pred, why = _predict_split(run, dev, bundle)
    rep = DetReport(run, pred, why, max_gallery)
    sections = [H.section(sid, fn(), SECTIONS[sid]) for sid, fn in (
        ("summary", rep.summary), ("curves", rep.curves), ("per-class", rep.per_class), ("gallery", rep.gallery),
        ("data", rep.data))]
    model = cfg_value(run, "model.name") or "?"
    data = (run.data or {}).get("name") or cfg_value(run, "data.source") or "?"
    subtitle = f"detection · {model} on {data} · {run.dir.resolve()}"
    footer = (f"visionkit report, written {time.strftime('%Y-%m-%d %H:%M:%S')} in {time.perf_counter() - t0:.1f} s. "
              f"Plots also as PNG files in {run.dir.resolve() / PLOT_DIR}.")
    doc = H.page(f"Run report: {run.dir.resolve().name}", subtitle, sections, footer, nav_sections=SECTIONS)
    plot_dir = run.dir / PLOT_DIR
    for name in PLOT_NAMES:
        if name not in rep.pngs:
            (plot_dir / name).unlink(missing_ok=True)
    for name, png in rep.pngs.items():
        atomic_write_bytes(plot_dir / name, png)
    path = Path(out) if out is not None else run.dir / "report.html"
    atomic_write_bytes(path, doc.encode("utf-8"))
    return path


__all__ = ["ap_bar_plot", "build_report", "quality_plot"]
