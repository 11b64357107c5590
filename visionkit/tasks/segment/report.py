"""The segmentation run report: one self-contained HTML page for a run directory of ``task: segment``.

Sections: run summary, learning curves (loss, lr; mIoU and pixel accuracy), per-class IoU, the row-normalised
confusion matrix of pixels, the worst and the best validation images by their own mIoU (image | truth |
prediction), and the data (splits, per-class pixel fractions, bad files). The prediction sections score ``best.pt``
(else ``last.pt``) on the run's validation split (else test) through the task's evaluator; when that is impossible
(no checkpoint yet, data not found here) they say why in one line and the rest still renders. The page is built
with the classification report's helpers (``visionkit.report.html`` and ``visionkit.report.plots``).

Example::

    from visionkit.tasks.segment.report import build_report
    build_report("runs/unet-seg-shapes-1")   # runs/unet-seg-shapes-1/report.html, PNG copies in .../report/
"""
from __future__ import annotations

import copy
import io
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

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
PLOT_NAMES = ("curves_loss.png", "curves_lr.png", "curves_quality.png", "per_class_iou.png", "confusion_norm.png",
              "gallery_worst.png", "gallery_best.png")
SECTIONS = {  # id -> title, in page order
    "summary": "Run summary",
    "curves": "Learning curves",
    "per-class": "Per-class IoU",
    "confusion": "Confusion matrix",
    "gallery": "Worst and best images",
    "data": "Data",
}
MAX_SCORED = 200  # validation images scored one by one for the gallery (the whole split is scored for the metrics)
MAX_BAD_FILES = 50
TILE_PX = 128  # each of a gallery tile's three pictures, longer side
PCT_KEYS = ("miou", "iou", "acc", "dice", "fwiou")


# ------------------------------------------------------------------------------------------------ formatting






def _metric(key: str, v: float | None) -> str:
    """A metrics.csv / summary value as text: percentages for IoU, accuracy and Dice."""
    if v is None:
        return "—"
    if key == "epoch":
        return str(int(v))
    if key == "time":
        return duration(v) or "—"
    if key == "lr":
        return f"{v:.3g}"
    if any(k in key for k in PCT_KEYS):
        return pct(v, 2)
    return f"{v:.4f}"


def _swatch(rgb: tuple[int, int, int] | None) -> H.Html:
    """A small square of a class's mask colour (an inline style: the page's policy allows no other)."""
    if rgb is None:
        return H.Html("")
    r, g, b = (int(c) for c in rgb[:3])
    style = (f"display:inline-block;width:.9em;height:.9em;margin-right:6px;vertical-align:-1px;"
             f"background:rgb({r},{g},{b});border:1px solid #999;border-radius:2px")
    return H.tag("span", "", style=style)


def _class_cell(name: str, palette: list | None, i: int) -> H.Html:
    return H.join([_swatch(palette[i] if palette and i < len(palette) else None), name])


# ------------------------------------------------------------------------------------------------ plots
def quality_plot(rows: list[dict], best_epoch: int | None = None) -> bytes | None:
    """mIoU and pixel accuracy per epoch (train pixel accuracy, validation mIoU / pixel accuracy / Dice) from
    metrics rows; None when no column holds a number.

    Example::

        quality_plot([{"epoch": 1, "train_pixel_acc": 0.8, "val_miou": 0.4, "val_pixel_acc": 0.85}], best_epoch=1)
    """
    keys = [("train_pixel_acc", "train pixel acc", plots.TRAIN, "-", "o"),
            ("val_pixel_acc", "val pixel acc", plots.VAL, "-", "o"), ("val_miou", "val mIoU", plots.VAL, "--", "s"),
            ("val_dice", "val Dice", plots.VAL, ":", "^")]
    series = []
    for k, label, color, ls, mk in keys:
        pts = [(r["epoch"], r[k]) for r in rows if r.get(k) is not None and math.isfinite(r[k])]
        if pts:
            series.append(([p[0] for p in pts], [p[1] for p in pts], label, color, ls, mk))
    if not series:
        return None
    fig = Figure(figsize=(5.2, 3.4), layout="constrained")
    ax = fig.add_subplot()
    few = len(rows) <= 30  # markers while the points can be told apart (a single epoch: only markers)
    for xs, ys, label, color, ls, mk in series:
        ax.plot(xs, ys, ls, color=color, label=label, marker=mk if few else None, markersize=4)
    if best_epoch is not None:
        ax.axvline(best_epoch, color=plots.BEST, ls="--", lw=1.2, label=f"best epoch ({best_epoch})")
    ax.set_title("mIoU and pixel accuracy")
    ax.set_xlabel("epoch")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8, loc="lower right")
    return plots.png(fig)


def iou_bar_plot(per_class: list[dict], palette: list | None, miou: float | None = None) -> bytes:
    """Horizontal bars of each class's IoU in its mask colour (n/a: a class absent from truth and prediction).

    Example::

        iou_bar_plot([{"class": "bg", "iou": 0.9}, {"class": "cat", "iou": None}], [(0, 0, 0), (200, 0, 0)], 0.9)
    """
    k = len(per_class)
    fig = Figure(figsize=(5.6, max(2.2, 0.3 * k + 1.1)), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(k)
    vals = [r["iou"] if r["iou"] is not None else 0.0 for r in per_class]
    colors = [tuple(c / 255 for c in palette[i][:3]) if palette and i < len(palette) else plots.TRAIN
              for i in range(k)]
    ax.barh(y, vals, color=colors, edgecolor="#555555", linewidth=0.6, height=0.7)
    fs = max(5.0, min(9.0, 300.0 / max(k, 1)))
    for i, r in enumerate(per_class):
        ax.text(vals[i] + 0.01, i, "n/a" if r["iou"] is None else f"{r['iou'] * 100:.1f}", va="center", fontsize=fs)
    if miou is not None:
        ax.axvline(miou, color=plots.BAD, ls="--", lw=1.2, label=f"mIoU {miou * 100:.1f}%")
        fig.legend(fontsize=8, loc="outside upper right", frameon=False)
    ax.set_yticks(y, [plots.shorten(str(r["class"]), 24) for r in per_class], fontsize=fs)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("IoU")
    ax.set_title("IoU per class", loc="left")
    ax.grid(axis="x", alpha=0.3)
    return plots.png(fig)


def _mask_png(rgb: np.ndarray, size: int = TILE_PX) -> tuple[bytes, np.ndarray]:
    """A colour mask scaled to ``size`` with nearest neighbours (no blended colours): (PNG bytes, the array)."""
    im = Image.fromarray(rgb)
    scale = size / max(im.size)
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue(), np.asarray(im)


# ------------------------------------------------------------------------------------------------ predictions
class _PerImage:
    """The task's evaluator, which also scores each of the first ``cap`` images on its own: the image's mIoU from a
    bincount of its (true, predicted) pixel pairs, over the classes in its truth or prediction."""

    def __init__(self, inner, k: int, ignore_index: int, cap: int) -> None:
        self.inner, self.k, self.ignore_index, self.cap = inner, k, ignore_index, cap
        self.iou: list[float] = []
        self.preds: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []

    def update(self, outputs, target) -> None:
        import torch.nn.functional as F
        self.inner.update(outputs, target)
        room = self.cap - len(self.iou)
        if room <= 0:
            return
        logits = (outputs["out"] if isinstance(outputs, dict) else outputs)[:room].float()
        t = (target[:, 0] if target.ndim == 4 else target)[:room]
        if logits.shape[-2:] != t.shape[-2:]:
            logits = F.interpolate(logits, size=t.shape[-2:], mode="bilinear", align_corners=False)
        dtype = np.uint8 if self.k <= 255 else np.int32
        k = self.k
        for p, y in zip(logits.argmax(1).cpu().numpy(), t.cpu().numpy()):
            valid = (y != self.ignore_index) & (y >= 0) & (y < k)
            cm = np.bincount(y[valid] * k + p[valid], minlength=k * k).reshape(k, k)
            tp = np.diag(cm)
            union = cm.sum(0) + cm.sum(1) - tp
            seen = union > 0
            self.iou.append(float((tp[seen] / union[seen]).mean()) if seen.any() else math.nan)
            self.preds.append(p.astype(dtype))
            self.targets.append(y.astype(dtype))

    def sync(self, d, lists: bool = False) -> None:
        self.inner.sync(d, lists)

    def compute(self, full: bool = False) -> dict:
        return self.inner.compute(full=full)


class _Scoring:
    """The segmentation task for ``evaluate``, with :class:`_PerImage` as its evaluator."""

    def __init__(self, task, scorer: _PerImage) -> None:
        self.task, self.scorer = task, scorer

    def predict(self, model, x, tta: bool = False):
        return self.task.predict(model, x, tta=tta)

    def new_metrics(self) -> _PerImage:
        return self.scorer


@dataclass
class Predictions:
    """A checkpoint's scores on the held-out split, and the first images' own masks and mIoU for the gallery."""

    split: str
    checkpoint: Path
    model: object  # SegModelFile
    ds: object
    scores: dict  # SegMetrics.compute(full=True)
    image_iou: np.ndarray  # [n scored], nan for an image without a labelled pixel
    preds: list[np.ndarray] = field(repr=False)
    targets: list[np.ndarray] = field(repr=False)
    changed: str = ""  # why the data may not be the data the run was trained and validated on ("" when it is)

    @property
    def classes(self) -> list[str]:
        return self.model.classes

    @property
    def palette(self) -> list:
        return self.model.palette


def _predict_split(run: RunFiles, device, bundle=None) -> tuple[Predictions | None, str]:
    """(Predictions, "") or (None, why not): best.pt (else last.pt) on the run's validation split (else test)."""
    from ...engine.loop import evaluate
    from .predict import load_seg_model
    from .task import SegmentationTask, build_bundle, loader_for

    ckpt, why = report_checkpoint(run)
    if ckpt is None:
        return None, why
    try:
        m = load_seg_model(ckpt, device)
    except (ValueError, OSError, RuntimeError, KeyError) as e:
        return None, f"the checkpoint {ckpt.name} cannot be used: {first_line(e)}"
    source = m.config.data.source
    bundle, split, ds, why = eval_split(run, m.config, m.classes, build_bundle, bundle)
    if ds is None:
        return None, why
    ignore = m.preprocess.get("ignore_index", 255)
    task = SegmentationTask(len(m.classes), loss=None, ignore_index=ignore, class_names=m.classes)
    scorer = _PerImage(task.new_metrics(), len(m.classes), ignore, MAX_SCORED)
    loader = None
    try:
        loader = loader_for(ds, m.config, m.preprocess, m.device, False)
        res = evaluate(m.model, _Scoring(task, scorer), loader, m.autocast, tta=bool(m.config.train.tta), full=True)
    except (ValueError, OSError, RuntimeError) as e:
        return None, f"the model could not be run on the {split} split: {first_line(e)}"
    finally:
        if loader is not None and hasattr(loader, "close"):
            loader.close()
    was = (run.data or {}).get("fingerprint") or (run.env or {}).get("data_fingerprint")
    now = getattr(bundle, "fingerprint", "")
    changed = (f"the data at {source} changed since training (fingerprint {now}, the run's {was}): these predictions "
               f"are on today's data and need not match the scores logged in training") if was and now and was != now \
        else ""
    return Predictions(split, ckpt, m, ds, res, np.asarray(scorer.iou, dtype=np.float64), scorer.preds,
                       scorer.targets, changed), ""


def _model_view(pred: Predictions, indices: list[int]) -> list[np.ndarray]:
    """The images at ``indices`` of the split as the model sees them (resized, normalisation undone), uint8 RGB."""
    import torch

    from .task import loader_for
    m = pred.model
    cfg = copy.deepcopy(m.config)
    cfg.data.workers = 0  # a handful of images: worker processes would cost more than they save
    cfg.data.eval_batch_size = max(1, len(indices))
    loader = loader_for(pred.ds.subset(indices), cfg, m.preprocess, m.device, False)
    try:
        x = torch.cat([xb.float().cpu() for xb, _ in loader.epoch(0)])
    finally:
        if hasattr(loader, "close"):
            loader.close()
    mean = torch.as_tensor(m.preprocess["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(m.preprocess["std"], dtype=torch.float32).view(1, -1, 1, 1)
    a = (x * std + mean).clamp(0, 1)
    if a.shape[1] == 1:
        a = a.repeat(1, 3, 1, 1)
    return list((a[:, :3].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))


# ------------------------------------------------------------------------------------------------ the run's files






# ------------------------------------------------------------------------------------------------ sections
class SegReport:
    """Builds the sections; PNG copies of the plots are collected in ``self.pngs`` (file name -> bytes)."""

    def __init__(self, run: RunFiles, pred: Predictions | None, why: str, max_gallery: int) -> None:
        self.run, self.pred, self.why, self.max_gallery = run, pred, why, max_gallery
        self.pngs: dict[str, bytes] = {}
        self.best = best_epoch(run, "val_miou")
        self.classes = list(pred.classes if pred else run.classes or ((run.data or {}).get("summary") or {})
                            .get("classes") or [])
        self.palette = pred.palette if pred else None
        if self.palette is None and self.classes:
            from .data import voc_colormap
            self.palette = voc_colormap(len(self.classes))  # what load_seg_model falls back to

    def _plot(self, name: str, png: bytes, alt: str) -> H.Html:
        self.pngs[name] = png
        return H.plot(png, alt)

    def _no_predictions(self) -> H.Html:
        return H.note(f"Needs the model's predictions, which are not available: {self.why}.")

    def _split(self) -> str:
        return {"val": "validation", "test": "test"}.get(self.pred.split, self.pred.split) if self.pred else ""

    # -------------------------------------------------------------------------------- summary
    def summary(self) -> H.Html:
        run, env, summ = self.run, self.run.env or {}, self.run.summary or {}
        out = run_notes(run)
        best_row = next((r for r in run.metrics if r["epoch"] == self.best), None) or summ.get("best") or None
        mon = monitor_of(run, "val_miou")
        planned = cfg_value(run, "train.epochs")
        epochs_run = summ.get("epochs_run", len(run.metrics))
        test = summ.get("test") or {}
        wall = duration(summ.get("wall_seconds"))
        out.append(H.cards([
            ("task", run.config.get("task") or "segment"),
            ("model", cfg_value(run, "model.name")),
            ("data", (run.data or {}).get("name") or cfg_value(run, "data.source")),
            ("best epoch", f"{self.best} of {epochs_run}" if self.best is not None else "—"),
            (f"best {mon}", _metric(mon, best_row.get(mon)) if best_row else "—"),
            ("test mIoU", pct(test.get("miou"), 2) if test.get("miou") is not None else None),
            ("test pixel acc", pct(test.get("pixel_acc"), 2) if test.get("pixel_acc") is not None else None),
            ("epochs", f"{epochs_run} of {planned}" if planned is not None else epochs_run),
            ("wall time", wall),
        ]))
        out.append(H.tag("h3", "Run"))
        out.append(H.kv_table([
            ("directory", str(run.dir.resolve())),
            ("started", env.get("started")),
            ("epochs", f"{epochs_run} of {planned} planned" + (" (stopped early)" if summ.get("stopped_early") else "")
             if planned is not None else epochs_run),
            ("wall time", wall),
            ("device", " — ".join(str(x) for x in (env.get("device"), env.get("device_name")) if x)),
            ("seed", env.get("seed", cfg_value(run, "train.seed"))),
            ("command", env.get("command")),
            ("recipe", run.config.get("recipe") or None),
            ("model", f"{cfg_value(run, 'model.name')} {cfg_value(run, 'model.kwargs') or ''}".strip()),
            ("optimizer", f"{cfg_value(run, 'optim.name')}, lr {cfg_value(run, 'optim.lr')}" if cfg_value(run, "optim.name")
             else None),
            ("loss", cfg_value(run, "segment.loss")),
            ("batch size", cfg_value(run, "data.batch_size")),
            ("training images", summ.get("n_train")),
            ("validation images", summ.get("n_val")),
        ]))
        keys = ("miou", "pixel_acc", "mean_acc", "dice", "fwiou", "loss")
        heads = ["mIoU", "pixel acc", "mean acc", "Dice", "fwIoU", "loss", "images"]
        if best_row:
            cols = [k for k in ("epoch", "train_loss", "train_pixel_acc", "val_loss", "val_miou", "val_pixel_acc",
                                "val_mean_acc", "val_dice", "val_fwiou", "lr", "time") if best_row.get(k) is not None]
            out.append(H.tag("h3", f"Best epoch (by {mon})"))
            out.append(H.table([H.num(k) for k in cols], [[H.num(_metric(k, best_row.get(k))) for k in cols]]))
        if test:
            out.append(H.tag("h3", "Test split (best weights)"))
            out.append(H.table([H.num(h) for h in heads],
                               [[*[H.num(_metric(k, test.get(k))) for k in keys], H.num(test.get("n", "—"))]]))
        if self.pred is not None:
            s = self.pred.scores
            out.append(H.tag("h3", f"This report's predictions: {self.pred.checkpoint.name} on the "
                                   f"{self._split()} split"))
            out.append(H.table([H.num(h) for h in heads],
                               [[*[H.num(_metric(k, s.get(k))) for k in keys], H.num(s.get("n", "—"))]]))
            if self.pred.changed:
                out.append(H.note(f"Careful: {self.pred.changed}."))
        else:
            out.append(H.note(f"No predictions in this report: {self.why}."))
        return H.join(out)

    # -------------------------------------------------------------------------------- curves
    def curves(self) -> H.Html:
        rows = self.run.metrics
        if not rows:
            return H.note("No metrics yet: no epoch has finished, so there are no learning curves to draw.")
        figs = plots.curve_plots(rows, self.best)  # loss and lr (its accuracy panel is classification's)
        items = []
        if "loss" in figs:
            items.append(self._plot("curves_loss.png", figs["loss"], "loss per epoch"))
        q = quality_plot(rows, self.best)
        if q is not None:
            items.append(self._plot("curves_quality.png", q, "mIoU and pixel accuracy per epoch"))
        if "lr" in figs:
            items.append(self._plot("curves_lr.png", figs["lr"], "learning rate per epoch"))
        text = f"{len(rows)} epoch{'s' if len(rows) != 1 else ''} from metrics.csv"
        if self.best is not None:
            text += f"; the dashed green line marks the best epoch ({self.best}), the one kept as best.pt"
        if len(rows) == 1:
            text += " (one epoch: each curve is a single point)"
        return H.join([H.para(text + ".", "muted"), H.plots(items)])

    # -------------------------------------------------------------------------------- predictions sections
    def per_class(self) -> H.Html:
        if self.pred is None:
            return self._no_predictions()
        s, classes, pal = self.pred.scores, self.pred.classes, self.palette
        rows = s["per_class"]
        total = max(sum(r["support"] for r in rows), 1)
        scored = [i for i, r in enumerate(rows) if r["iou"] is not None]
        lo = min((rows[i]["iou"] for i in scored), default=None)
        hi = max((rows[i]["iou"] for i in scored), default=None)
        worst = [i for i in scored if lo is not None and rows[i]["iou"] == lo and lo < hi]
        body = [[_class_cell(str(r["class"]), pal, i), H.num(pct(r["iou"], 1)), H.num(pct(r["acc"], 1)),
                 H.num(pct(r["dice"], 1)), H.num(f"{r['support']:,}"), H.num(pct(r["support"] / total, 2))]
                for i, r in enumerate(rows)]
        text = (f"{self._split().capitalize()} split, {s['n']} images, {total:,} labelled pixels; mIoU "
                f"{pct(s['miou'], 2)} (the mean over classes seen in truth or prediction). IoU = TP / (TP + FP + FN), "
                "acc = recall of the class's pixels, support = its true pixels.")
        out = [H.para(text, "muted")]
        if self.pred.changed:
            out.append(H.note(f"Careful: {self.pred.changed}."))
        if worst:
            out.append(H.para(f"Weakest class (highlighted): {', '.join(classes[i] for i in worst)} "
                              f"(IoU {pct(lo, 1)})."))
        out.append(H.plots([self._plot("per_class_iou.png", iou_bar_plot(rows, pal, s["miou"]), "IoU per class")]))
        out.append(H.table(["class", H.num("IoU"), H.num("acc"), H.num("Dice"), H.num("support pixels"),
                            H.num("share")], body, ["worst" if i in worst else None for i in range(len(rows))]))
        return H.join(out)

    def confusion(self) -> H.Html:
        if self.pred is None:
            return self._no_predictions()
        cm, classes = self.pred.scores["confusion_matrix"], self.pred.classes
        fig = self._plot("confusion_norm.png", plots.confusion_plot(cm, classes, normalize=True),
                         "confusion matrix of pixels, row-normalised")
        text = (f"Pixels of the {self._split()} split; rows are the true class, columns the prediction, each row sums "
                "to 100% (its diagonal is the class's pixel accuracy).")
        if len(classes) > 25:
            text += " Cell numbers are left out with this many classes."
        return H.join([H.para(text, "muted"), H.plots([fig])])

    def gallery(self) -> H.Html:
        if self.pred is None:
            return self._no_predictions()
        if self.max_gallery <= 0:
            return H.para("Gallery switched off (max_gallery=0).", "muted")
        from .predict import colorize
        p = self.pred
        ok = np.nonzero(np.isfinite(p.image_iou))[0]
        if not len(ok):
            return H.note(f"No {self._split()} image has a labelled pixel: there is nothing to score.")
        order = ok[np.argsort(p.image_iou[ok], kind="stable")]
        n = min(self.max_gallery, max(1, len(order) // 2))
        worst = order[:n].tolist()
        best = [i for i in order[::-1][:n].tolist() if i not in worst]
        try:
            view = dict(zip(worst + best, _model_view(p, worst + best)))
        except (ValueError, OSError, RuntimeError) as e:
            return H.note(f"The {self._split()} images could not be read back for the gallery: {first_line(e)}")
        legend = H.join([H.tag("span", H.join([_swatch(c), name]), style="margin-right:14px;white-space:nowrap")
                         for name, c in zip(p.classes, p.palette)])
        scored = len(p.image_iou)
        n_split = p.scores.get("n", scored)
        first = f"the first {scored} of the {n_split}" if scored < n_split else f"the {scored}"
        median = pct(float(np.median(p.image_iou[ok])), 1)
        out = [H.para(f"Each {self._split()} image is scored on its own (its mIoU over the classes in its truth or "
                      f"prediction) for {first} {self._split()} images; median {median}. Each tile: the image as "
                      "the model sees it | the true mask | the predicted mask.", "muted"),
               H.para(legend, "muted")]
        for name, title, pick in (("worst", "Worst", worst), ("best", "Best", best)):
            if not pick:
                continue
            tiles, images, titles = [], [], []
            for i in pick:
                truth_png, truth = _mask_png(colorize(p.targets[i], p.palette))
                pred_png, pred = _mask_png(colorize(p.preds[i], p.palette))
                iou = p.image_iou[i]
                cap = H.join([H.tag("b", f"mIoU {pct(iou, 1)}", "bad" if name == "worst" else "good"),
                              H.tag("span", f" · {self._split()} image #{i}", "muted"), H.Html("<br>"),
                              H.tag("span", "image | truth | prediction", "muted")])
                tiles.append(H.tile([(plots.thumbnail(view[i], TILE_PX), f"{self._split()} image {i}"),
                                     (truth_png, "true mask"), (pred_png, f"predicted mask, mIoU {pct(iou, 1)}")],
                                    cap))
                images += [view[i], truth, pred]
                titles += [f"#{i}", "truth", f"pred {pct(iou, 0)}"]
            self.pngs[f"gallery_{name}.png"] = plots.image_grid(images, titles, cols=6, size=TILE_PX)
            out.append(H.tag("h3", f"{title} {len(pick)} by image mIoU"))
            grid = "display:grid;gap:10px;grid-template-columns:repeat(auto-fill,minmax(min(100%,330px),1fr))"
            out.append(H.tag("div", H.join(tiles), "gallery", style=grid))
        return H.join(out)

    # -------------------------------------------------------------------------------- data
    def data(self) -> H.Html:
        d = self.run.data
        if not d:
            return H.note("data.json is missing: the run stopped before its data was recorded.")
        s = d.get("summary") or {}
        classes = list(s.get("classes") or self.classes)
        splits = s.get("splits") or {}
        sizes = s.get("image_sizes")
        bad = d.get("bad_files") or []
        out = [H.kv_table([
            ("source", d.get("name")),
            ("fingerprint", d.get("fingerprint")),
            ("classes", s.get("num_classes", len(classes))),
            ("native size", f"{s['native_size']} px" if s.get("native_size") else None),
            ("ignore index", s.get("ignore_index")),
            *[(f"{split} images", v.get("n")) for split, v in splits.items()],
            *[(f"image {k} (min / median / max)", f"{v['min']} / {v['median']:g} / {v['max']} px")
              for k, v in (sizes or {}).items()],
            ("bad files skipped", s.get("bad_files", len(bad))),
        ])]
        if classes and splits:
            frac = {sp: v.get("pixel_fraction") or {} for sp, v in splits.items()}
            rows = [[_class_cell(c, self.palette, i), *[H.num(pct(frac[sp].get(c), 2)) for sp in frac]]
                    for i, c in enumerate(classes)]
            out.append(H.tag("h3", "Pixels per class"))
            out.append(H.para("Each class's share of the labelled (not ignored) pixels of each split.", "muted"))
            out.append(H.table(["class", *[H.num(sp) for sp in frac]], rows))
        if bad:
            out.append(H.tag("h3", f"Bad files skipped ({len(bad)})"))
            out.append(H.table(["file", "reason"], [[H.tag("code", b.get("path", "")), b.get("reason", "")]
                                                    for b in bad[:MAX_BAD_FILES]]))
            if len(bad) > MAX_BAD_FILES:
                out.append(H.para(f"… and {len(bad) - MAX_BAD_FILES} more (all listed in data.json).", "muted"))
        return H.join(out)


# ------------------------------------------------------------------------------------------------ entry point
def build_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, device: str = "auto",
                 bundle=None, max_gallery: int = 6) -> Path:
    """Write one self-contained HTML report for a segmentation run directory; returns its path (default
    ``RUN_DIR/report.html``), PNG copies of the plots in ``RUN_DIR/report/``. ``bundle``: the run's SegBundle when
    the caller holds it (``train`` does), instead of rebuilding the split; ``max_gallery``: images in each of the
    worst and best galleries. A directory that is not a run directory is a ConfigError.

    Example::

        build_report("runs/unet-seg-shapes-1", device="cpu")
    """
    if not isinstance(max_gallery, int) or max_gallery < 0:
        raise ConfigError(f"max_gallery must be a whole number >= 0, got {max_gallery!r}")
    from ...core.runtime import resolve_device
    t0 = time.perf_counter()
    run = read_run(run_dir)
    task = run.config.get("task")
    if task not in (None, "auto", "segment", "segmentation"):
        raise ConfigError(f"{run.dir} is a {task} run, not a segmentation run; use visionkit report {run.dir}")
    dev = resolve_device(device)  # a device that is not here is the caller's mistake, not a note in the report
    timings: dict[str, float] = {}
    pred, why = _predict_split(run, dev, bundle)
    timings["predictions"] = time.perf_counter() - t0
    rep = SegReport(run, pred, why, max_gallery)
    sections = []
    for sid, fn in (("summary", rep.summary), ("curves", rep.curves), ("per-class", rep.per_class),
                    ("confusion", rep.confusion), ("gallery", rep.gallery), ("data", rep.data)):
        t = time.perf_counter()
        sections.append(H.section(sid, fn(), SECTIONS[sid]))
        timings[sid] = time.perf_counter() - t
    model = cfg_value(run, "model.name") or "?"
    data = (run.data or {}).get("name") or cfg_value(run, "data.source") or "?"
    started = (run.env or {}).get("started")
    subtitle = f"segmentation · {model} on {data}" + (f" · started {started}" if started else "") + \
        f" · {run.dir.resolve()}"
    total = time.perf_counter() - t0
    slow = sorted(timings.items(), key=lambda kv: -kv[1])[:3]
    footer = (f"visionkit report, written {time.strftime('%Y-%m-%d %H:%M:%S')} in {total:.1f} s ("
              + ", ".join(f"{k} {v:.1f} s" for k, v in slow) + "). Plots also as PNG files in "
              f"{run.dir.resolve() / PLOT_DIR}.")
    doc = H.page(f"Run report: {run.dir.resolve().name}", subtitle, sections, footer, nav_sections=SECTIONS)

    plot_dir = run.dir / PLOT_DIR
    for name in PLOT_NAMES:  # a plot this report does not have must not survive from an earlier one
        if name not in rep.pngs:
            (plot_dir / name).unlink(missing_ok=True)
    for name, png in rep.pngs.items():
        atomic_write_bytes(plot_dir / name, png)
    path = Path(out) if out is not None else run.dir / "report.html"
    atomic_write_bytes(path, doc.encode("utf-8"))
    return path


__all__ = ["build_report", "iou_bar_plot", "quality_plot"]
