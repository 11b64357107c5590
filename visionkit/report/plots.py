"""The report's plots as PNG bytes: matplotlib ``Figure`` objects drawn with the Agg canvas, never pyplot (no global
figure registry, no backend switching, nothing left open between calls).

Example::

    png = confusion_plot([[5, 1], [2, 7]], ["cat", "dog"])
    Path("confusion.png").write_bytes(png)
"""
from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

DPI = 110
TRAIN, VAL, BEST, BAD = "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes (no "Software" text chunk: the bytes depend on the data only)."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def shorten(name: str, n: int = 18) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def _finite(xs: Sequence[float | None]) -> bool:
    return any(x is not None and math.isfinite(x) for x in xs)


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def curve_plots(rows: list[dict], best_epoch: int | None = None) -> dict[str, bytes]:
    """Learning curves from metrics rows (dicts with ``epoch`` and float columns, None where absent):
    ``{"loss": png, "accuracy": png, "lr": png}``, each only when its columns hold numbers.

    Example::

        curve_plots([{"epoch": 1, "train_loss": 1.0, "val_loss": 1.1, "lr": 0.1}], best_epoch=1)["loss"]
    """
    panels = {
        "loss": ("Loss", [("train_loss", "train", TRAIN, "-"), ("val_loss", "val", VAL, "-")], False),
        "accuracy": ("Accuracy", [("train_acc", "train", TRAIN, "-"), ("val_acc1", "val top-1", VAL, "-"),
                                  ("val_acc5", "val top-5", VAL, ":")], False),
        "lr": ("Learning rate (end of epoch)", [("lr", "lr", "#555555", "-")], True),
    }
    out = {}
    marker = "o" if len(rows) <= 30 else None
    for name, (title, keys, is_lr) in panels.items():
        series = [(_series(rows, k), label, c, ls) for k, label, c, ls in keys]
        if not any(ys for (_, ys), *_ in series):
            continue
        fig = Figure(figsize=(5.2, 3.4), layout="constrained")
        ax = fig.add_subplot()
        for (xs, ys), label, color, ls in series:
            if ys:
                ax.plot(xs, ys, ls, color=color, label=label, marker=marker, markersize=3.5)
        if best_epoch is not None:
            ax.axvline(best_epoch, color=BEST, ls="--", lw=1.2, label=f"best epoch ({best_epoch})")
        if is_lr:
            pos = [y for (_, ys), *_ in series for y in ys if y > 0]
            if pos and max(pos) / min(pos) > 50:
                ax.set_yscale("log")
            else:
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
        out[name] = png(fig)
    return out


def confusion_plot(cm: Sequence[Sequence[float]], classes: Sequence[str], normalize: bool = False) -> bytes:
    """The confusion matrix (rows: true class, columns: predicted), as counts or row-normalised.

    The figure grows with the number of classes; cell numbers are drawn up to 25 classes, tick labels thinned
    only when they no longer fit (past ~150 classes).

    Example::

        confusion_plot([[5, 1], [2, 7]], ["cat", "dog"], normalize=True)
    """
    m = np.asarray(cm, dtype=np.float64)
    k = len(classes)
    if normalize:
        rows = m.sum(1, keepdims=True)
        m = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    side = float(min(max(4.6, 0.42 * k + 2.2), 22.0))
    fig = Figure(figsize=(side + (0.9 if k > 25 else 0.0), side), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap="Blues", vmin=0, vmax=1 if normalize else max(1.0, m.max()), interpolation="nearest")
    if k > 25:  # no numbers in the cells: the colour scale is the only key
        fig.colorbar(im, ax=ax, shrink=0.8)
    cell = side * 72 * 0.75 / max(k, 1)  # points per class along an axis (about 75% of the side is the matrix)
    fs = max(4.5, min(10.0, cell * 0.7))
    step = max(1, math.ceil(6.0 / cell))  # every label while a cell is at least 6 points tall
    ticks = list(range(0, k, step))
    names = [shorten(classes[i]) for i in ticks]
    ax.set_xticks(ticks, names, rotation=90 if k > 6 else 30, ha="center" if k > 6 else "right", fontsize=fs)
    ax.set_yticks(ticks, names, fontsize=fs)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix, row-normalised" if normalize else "Confusion matrix, counts")
    if k <= 25:
        hi = (1.0 if normalize else max(1.0, m.max())) * 0.55
        cell_fs = max(5.0, min(10.0, 200.0 / k))
        for i in range(k):
            for j in range(k):
                v = m[i, j]
                if v == 0 and i != j:
                    continue
                txt = f"{v * 100:.0f}" if normalize else f"{int(v)}"
                ax.text(j, i, txt, ha="center", va="center", fontsize=cell_fs, color="white" if v > hi else "black")
    return png(fig)


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> list[dict]:
    """Equal-width confidence bins over [0, 1]: ``[{"lo", "hi", "count", "confidence", "accuracy"}]``
    (mean confidence and accuracy are None in empty bins). Bins are [lo, hi), the last one closed, as in
    torchmetrics' calibration error.

    Example::

        reliability_bins(np.array([0.9, 0.6]), np.array([True, False]), n_bins=2)
    """
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, n_bins - 1)
    out = []
    for b in range(n_bins):
        sel = idx == b
        n = int(sel.sum())
        out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": n,
                    "confidence": float(confidence[sel].mean()) if n else None,
                    "accuracy": float(correct[sel].mean()) if n else None})
    return out


def reliability_plot(bins: list[dict], ece: float | None) -> bytes:
    """Reliability diagram: accuracy against confidence per bin (the diagonal is perfect calibration), with the
    number of samples per bin below.

    Example::

        reliability_plot(reliability_bins(np.array([0.9, 0.6]), np.array([True, False])), ece=0.25)
    """
    fig = Figure(figsize=(5.2, 5.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    lo = np.array([b["lo"] for b in bins])
    width = bins[0]["hi"] - bins[0]["lo"]
    acc = np.array([b["accuracy"] if b["count"] else 0.0 for b in bins])
    conf = np.array([b["confidence"] if b["count"] else np.nan for b in bins])
    counts = np.array([b["count"] for b in bins])
    top.plot([0, 1], [0, 1], "--", color="#888888", lw=1, label="perfect calibration")
    top.bar(lo, acc, width=width, align="edge", color=TRAIN, edgecolor="white", alpha=0.85, label="accuracy")
    filled = counts > 0
    top.bar(lo[filled], (conf - acc)[filled], bottom=acc[filled], width=width, align="edge", color=BAD, alpha=0.25,
            edgecolor=BAD, hatch="//", lw=0.5, label="gap to confidence")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title("Reliability diagram" + (f" — ECE {ece * 100:.2f}%" if ece is not None else ""))
    top.legend(fontsize=8, loc="upper left")
    top.grid(alpha=0.3)
    bottom.bar(lo, counts, width=width, align="edge", color="#555555", edgecolor="white")
    bottom.set_xlabel("confidence (top-1 probability)")
    bottom.set_ylabel("images")
    bottom.grid(alpha=0.3)
    return png(fig)


def class_count_plot(counts: dict[str, dict[str, int]], classes: Sequence[str]) -> bytes:
    """Horizontal stacked bars of images per class, one colour per split (``counts[split][class]``).

    Example::

        class_count_plot({"train": {"cat": 40, "dog": 30}, "val": {"cat": 10, "dog": 8}}, ["cat", "dog"])
    """
    k = len(classes)
    fig = Figure(figsize=(5.6, max(2.4, 0.24 * k + 1.3)), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(k)
    left = np.zeros(k)
    colors = {"train": TRAIN, "val": VAL, "test": BEST}
    for split, per in counts.items():
        v = np.array([per.get(c, 0) for c in classes], dtype=float)
        ax.barh(y, v, left=left, color=colors.get(split), label=split, height=0.75)
        left += v
    ax.set_yticks(y, [shorten(c, 24) for c in classes], fontsize=max(5.0, min(9.0, 300.0 / max(k, 1))))
    ax.invert_yaxis()
    ax.set_xlabel("images")
    ax.set_title("Images per class", loc="left")
    fig.legend(fontsize=8, loc="outside upper right", ncol=len(counts), frameon=False)  # never over a bar
    ax.grid(axis="x", alpha=0.3)
    return png(fig)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font (needs FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _fit(text: str, font, width: int) -> str:
    """``text`` cut (with an ellipsis) to ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _resized(rgb: np.ndarray, size: int) -> Image.Image:
    im = Image.fromarray(rgb)
    w, h = im.size
    scale = size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return im.resize(new, Image.Resampling.NEAREST if max(w, h) <= 64 else Image.Resampling.LANCZOS)


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str], ok: Sequence[bool] | None = None,
               cols: int = 6, size: int = 128) -> bytes:
    """A grid of uint8 ``[H, W, 3]`` images with a caption of one or more lines each (green when ``ok``, red when
    not), drawn with Pillow: a fraction of matplotlib's cost for the same picture.

    Example::

        image_grid([np.zeros((8, 8, 3), np.uint8)], ["true cat\npred dog 97%"], ok=[False])
    """
    n = len(images)
    cols = max(1, min(cols, n))
    rows = max(1, math.ceil(n / cols))
    font = _font(12)
    lines = max([len(t.split("\n")) for t in titles] or [1])
    pad, line_h = 6, 15
    cw, ch = size + 2 * pad, size + 2 * pad + lines * line_h
    canvas = Image.new("RGB", (cols * cw, rows * ch), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (rgb, title) in enumerate(zip(images, titles)):
        x0, y0 = (i % cols) * cw, (i // cols) * ch
        im = _resized(rgb, size)
        canvas.paste(im, (x0 + pad + (size - im.width) // 2, y0 + pad + (size - im.height) // 2))
        color = "black" if ok is None else (BEST if ok[i] else BAD)
        for k, line in enumerate(title.split("\n")):
            draw.text((x0 + pad, y0 + pad + size + 2 + k * line_h), _fit(line, font, size), fill=color, font=font)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def thumbnail(rgb: np.ndarray, size: int = 128) -> bytes:
    """A uint8 ``[H, W, 3]`` image as PNG bytes, its longer side scaled to ``size`` (pixel-sharp for small images).

    Example::

        thumbnail(np.zeros((28, 28, 3), np.uint8))
    """
    buf = io.BytesIO()
    _resized(rgb, size).save(buf, format="PNG")
    return buf.getvalue()
