"""Gathering a run directory into the report: its files (config, env, data, metrics, summary) and, when a checkpoint
and the run's data are at hand, the model's predictions on the held-out split (validation, else test).

Every part renders on its own: a missing file or an unusable checkpoint becomes a note in the sections that need it.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from ..config import ConfigError
from ..core.rundir import atomic_write_bytes
from . import html as H
from . import plots

PLOT_DIR = "report"
PLOT_NAMES = ("curves_loss.png", "curves_accuracy.png", "curves_lr.png", "confusion.png", "confusion_norm.png",
              "reliability.png", "top_losses.png", "gradcam.png", "class_counts.png")
MAX_BAD_FILES = 50
MAX_PAIRS = 10
N_BINS = 15


# ------------------------------------------------------------------------------------------------ the run's files
@dataclass
class RunFiles:
    """What a run directory holds; each part None (or empty) when its file is missing or unreadable."""

    dir: Path
    config: dict
    classes: list[str] | None = None
    env: dict | None = None
    data: dict | None = None
    finetune: dict | None = None
    summary: dict | None = None
    metrics: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # files present but unreadable


def first_line(e: BaseException) -> str:
    return ((str(e).strip().splitlines() or [""])[0] or type(e).__name__)[:300]


def _read_json(path: Path, problems: list[str]):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        problems.append(f"{path.name} cannot be read ({first_line(e)})")
        return None


def _number(v: str | None) -> float | None:
    if v is None or v.strip() == "":
        return None
    try:
        x = float(v)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def read_metrics(path: Path) -> list[dict]:
    """metrics.csv as a list of rows ``{"epoch": int, column: float | None}``; [] when missing or empty.

    Example::

        rows = read_metrics(Path("runs/x/metrics.csv"))
        [r["val_acc1"] for r in rows]
    """
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row = {k: _number(v) for k, v in r.items() if k}
            if row.get("epoch") is None:
                continue
            row["epoch"] = int(row["epoch"])
            rows.append(row)
    return rows


def read_run(run_dir: str | os.PathLike) -> RunFiles:
    """Read a run directory's files; ConfigError when it is not a run directory (no config.yaml).

    Example::

        run = read_run("runs/lenet-digits-1")
        run.config["model"]["name"], len(run.metrics)
    """
    d = Path(run_dir)
    if not d.exists():
        raise ConfigError(f"run directory {d} does not exist")
    if not d.is_dir() or not (d / "config.yaml").is_file():
        raise ConfigError(f"{d} is not a run directory (no config.yaml); give a directory written by visionkit train")
    try:
        config = yaml.safe_load((d / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{d / 'config.yaml'} cannot be read: {first_line(e)}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{d / 'config.yaml'} is not a visionkit config (not a mapping)")
    run = RunFiles(d, config)
    p = run.problems
    run.classes = _read_json(d / "classes.json", p)
    run.env = _read_json(d / "env.json", p)
    run.data = _read_json(d / "data.json", p)
    run.finetune = _read_json(d / "finetune.json", p)
    run.summary = _read_json(d / "summary.json", p)
    try:
        run.metrics = read_metrics(d / "metrics.csv")
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        p.append(f"metrics.csv cannot be read ({first_line(e)})")
    return run


def cfg_value(run: RunFiles, key: str, default=None):
    """A dotted key of the run's config.yaml (``train.epochs``), or ``default``."""
    sec, _, name = key.partition(".")
    v = run.config.get(sec, {})
    return v.get(name, default) if isinstance(v, dict) else default


def _strategy(run: RunFiles) -> str | None:
    ft = run.finetune or (run.summary or {}).get("finetune") or {}
    return ft.get("strategy")


def _planned_epochs(run: RunFiles) -> int | None:
    """Epochs the run was set to train: a linear probe trains finetune.probe_epochs over cached features."""
    if _strategy(run) == "linear-probe":
        return cfg_value(run, "finetune.probe_epochs")
    return cfg_value(run, "train.epochs")


def monitor_of(run: RunFiles, task_default: str = "val_acc1") -> str:
    """The run's monitored column (``task_default`` for ``auto``), or train_loss when no row holds it."""
    mon = (run.summary or {}).get("best", {}).get("monitor") or cfg_value(run, "train.monitor", "auto")
    if mon == "auto":
        mon = task_default
    if not any(r.get(mon) is not None for r in run.metrics):
        mon = "train_loss"
    return mon


def best_epoch(run: RunFiles, task_default: str = "val_acc1") -> int | None:
    """The epoch kept as best.pt: summary.json's, else the best metrics row by the run's monitor."""
    ep = (run.summary or {}).get("best", {}).get("epoch")
    if ep is not None:
        return int(ep)
    mon = monitor_of(run, task_default)
    rows = [r for r in run.metrics if r.get(mon) is not None]
    if not rows:
        return None
    pick = min if "loss" in mon else max
    return pick(rows, key=lambda r: r[mon])["epoch"]


# ------------------------------------------------------------------------------------------------ predictions
@dataclass
class Predictions:
    """The checkpoint's probabilities on the held-out split, with what the gallery and Grad-CAM need."""

    split: str
    checkpoint: Path
    classes: list[str]
    probs: np.ndarray  # [N, K]
    targets: np.ndarray  # [N]
    scores: dict  # evaluation.score(full=True)
    member: object
    ds: object

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(1)

    @property
    def confidence(self) -> np.ndarray:
        return self.probs.max(1)

    @property
    def p_true(self) -> np.ndarray:
        return self.probs[np.arange(len(self.targets)), self.targets]


def run_notes(run: RunFiles) -> list:
    """Notes on what a run directory lacks (no metrics yet, no summary yet, unreadable files), for a report's top."""
    out = []
    if not run.metrics:
        out.append(H.note("No metrics yet: metrics.csv is missing or has no rows (the run has not finished an "
                          "epoch). This report shows what exists so far."))
    elif run.summary is None:
        out.append(H.note("summary.json is missing: the run is still training or was interrupted. The numbers "
                          "below come from metrics.csv."))
    return out + [H.note(p) for p in run.problems]


def report_checkpoint(run: RunFiles) -> tuple[Path | None, str]:
    """(the checkpoint a report scores: best.pt, else last.pt, "") or (None, why not)."""
    ckpt = next((run.dir / n for n in ("best.pt", "last.pt") if (run.dir / n).is_file()), None)
    return ckpt, "" if ckpt else "no checkpoint yet (neither best.pt nor last.pt is in the run directory)"


def eval_split(run: RunFiles, config, classes: list[str], build_bundle, bundle=None) -> tuple:
    """(bundle, split name, dataset, "") of the split a report scores — validation, else test — rebuilt exactly as
    training made it (a relative --data path from where train ran; never a download), or (None, None, None, why)."""
    from ..config import resolve_config
    source = config.data.source
    try:
        if bundle is None:
            over: dict = {"data.download": False}
            cwd = (run.env or {}).get("cwd")  # a relative --data path is relative to where train ran
            if cwd and not Path(source).is_absolute() and not Path(source).exists() and (Path(cwd) / source).exists():
                over["data.source"] = str(Path(cwd) / source)
            bundle = build_bundle(resolve_config(base=config.to_dict(), overrides=over))
    except (ValueError, OSError, RuntimeError) as e:
        return None, None, None, f"the run's data ({source}) cannot be loaded here: {first_line(e)}"
    split, ds = next(((s, d) for s in ("val", "test") if (d := getattr(bundle, s, None)) is not None and len(d)),
                     (None, None))
    if ds is None:
        return None, None, None, f"{source} has no validation or test split (val_split is 0 and there is no test set)"
    if list(bundle.classes) != list(classes):
        return None, None, None, (f"the data at {source} no longer has the checkpoint's classes "
                                  f"({len(bundle.classes)} vs {len(classes)} classes): it changed since training")
    return bundle, split, ds, ""


def _predict_split(run: RunFiles, device, bundle=None) -> tuple[Predictions | None, str]:
    """(Predictions, "") or (None, why not): best.pt (else last.pt) on the run's validation split (else test)."""
    from ..tasks.classify.data import build_bundle
    from ..tasks.classify.evaluate import load_member, member_probs, score

    ckpt, why = report_checkpoint(run)
    if ckpt is None:
        return None, why
    try:
        member = load_member(ckpt, device)
    except (ValueError, OSError, RuntimeError) as e:
        return None, f"the checkpoint {ckpt.name} cannot be used: {first_line(e)}"
    bundle, split, ds, why = eval_split(run, member.config, member.classes, build_bundle, bundle)
    if ds is None:
        return None, why
    try:
        probs, _, targets = member_probs(member, ds)
    except (ValueError, OSError, RuntimeError) as e:
        return None, f"the model could not be run on the {split} split: {first_line(e)}"
    res = score(probs, targets, full=True)
    return Predictions(split, ckpt, member.classes, probs.numpy(), targets.numpy(), res, member, ds), ""


def _across_classes(idx: np.ndarray, labels: np.ndarray, conf: np.ndarray, n: int) -> list[int]:
    """Up to ``n`` of ``idx``, the most confident of each class in turn (ants, bees, ants, ...), not the ``n`` most
    confident overall, which are often all of one class."""
    by_class: dict[int, list[int]] = {}
    for i in idx[np.argsort(-conf[idx], kind="stable")].tolist():
        by_class.setdefault(int(labels[i]), []).append(i)
    queues = sorted(by_class.values(), key=lambda q: -conf[q[0]])
    out: list[int] = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def _model_inputs(pred: Predictions, indices: list[int]):
    """The images at ``indices`` of the split as the model sees them: a float tensor [n, C, H, W] on its device."""
    import torch

    from ..tasks.classify.data import loader_for
    m = pred.member
    cfg = copy.deepcopy(m.config)
    cfg.data.workers = 0  # a handful of images: worker processes would cost more than they save
    cfg.data.eval_batch_size = max(1, len(indices))
    loader = loader_for(pred.ds.subset(indices), cfg, m.preprocess, m.device, False)
    try:
        xs = [x.float() for x, _ in loader.epoch(0)]
    finally:
        loader.close()
    return torch.cat(xs).contiguous()


def _to_rgb(x, mean, std) -> np.ndarray:
    """Normalised model inputs [n, C, H, W] back to uint8 [n, H, W, 3] images (grey repeated to RGB)."""
    import torch
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    a = (x.detach().float().cpu() * s + m).clamp(0, 1)
    if a.shape[1] == 1:
        a = a.repeat(1, 3, 1, 1)
    return (a[:, :3].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


# ------------------------------------------------------------------------------------------------ formatting
def _n(k: int, noun: str) -> str:
    return f"{k} {noun}{'' if k == 1 else 's'}"


def pct(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x * 100:.{digits}f}%"


def _fnum(x: float | None, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"


def duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    s = round(seconds)
    h, m = divmod(s // 60, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s % 60:02d} s" if m else f"{seconds:.1f} s"


def _metric(key: str, v: float | None) -> str:
    if v is None:
        return "—"
    if "acc" in key:
        return pct(v, 2)
    if key == "epoch":
        return str(int(v))
    if key == "lr":
        return f"{v:.3g}"
    if key == "time":
        return duration(v) or "—"
    return _fnum(v)


# ------------------------------------------------------------------------------------------------ sections
class Report:
    """Builds the sections; PNG copies of the plots are collected in ``self.pngs`` (file name -> bytes)."""

    def __init__(self, run: RunFiles, pred: Predictions | None, why: str, max_gallery: int, cam_images: int):
        self.run, self.pred, self.why = run, pred, why
        self.max_gallery, self.cam_images = max_gallery, cam_images
        self.pngs: dict[str, bytes] = {}
        self.best = best_epoch(run)
        self.inputs: dict[int, np.ndarray] = {}  # split index -> uint8 RGB as the model sees it
        self.cam_note: str | None = None

    def _plot(self, name: str, png: bytes, alt: str, caption: object = None) -> H.Html:
        self.pngs[name] = png
        return H.plot(png, alt, caption)

    def _no_predictions(self) -> H.Html:
        return H.note(f"Needs the model's predictions, which are not available: {self.why}.")

    # -------------------------------------------------------------------------------- summary
    def summary(self) -> H.Html:
        run, env, summ = self.run, self.run.env or {}, self.run.summary or {}
        out = run_notes(run)
        best_row = next((r for r in run.metrics if r["epoch"] == self.best), None)
        if best_row is None and summ.get("best"):
            best_row = summ["best"]
        planned = _planned_epochs(run)
        epochs_run = summ.get("epochs_run", len(run.metrics))
        mon = monitor_of(run)
        test = summ.get("test") or {}
        out.append(H.cards([
            ("model", cfg_value(run, "model.name")),
            ("data", (run.data or {}).get("name") or cfg_value(run, "data.source")),
            ("best epoch", f"{self.best} of {epochs_run}" if self.best is not None else "—"),
            (f"best {mon}", _metric(mon, best_row.get(mon)) if best_row else "—"),
            ("test top-1", pct(test.get("acc1"), 2) if test else None),
            ("wall time", duration(summ.get("wall_seconds"))),
            ("device", env.get("device")),
        ]))
        out.append(H.tag("h3", "Run"))
        started = env.get("started")
        out.append(H.kv_table([
            ("directory", str(run.dir.resolve())),
            ("started", started),
            ("epochs", f"{epochs_run} of {planned} planned" + (" (stopped early)" if summ.get("stopped_early") else "")
             if planned is not None else epochs_run),
            ("wall time", duration(summ.get("wall_seconds"))),
            ("device", " — ".join(str(x) for x in (env.get("device"), env.get("device_name")) if x)),
            ("CPUs / torch threads", f"{env.get('cpu_count')} / {env.get('torch_threads')}" if env else None),
            ("seed", env.get("seed", cfg_value(run, "train.seed"))),
            ("command", env.get("command")),
            ("training images", summ.get("n_train")),
            ("validation images", summ.get("n_val")),
        ]))
        out.append(H.tag("h3", "Recipe"))
        out.append(H.kv_table(self._recipe()))
        if best_row:
            keys = [k for k in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc1", "val_acc5", "lr", "time")
                    if best_row.get(k) is not None]
            out.append(H.tag("h3", f"Best epoch (by {mon})"))
            out.append(H.table(keys, [[H.num(_metric(k, best_row.get(k))) for k in keys]]))
        if test:
            out.append(H.tag("h3", "Test split (best weights)"))
            out.append(H.table(["top-1", "top-5", "loss", "images"],
                               [[H.num(pct(test.get("acc1"), 2)), H.num(pct(test.get("acc5"), 2)),
                                 H.num(_fnum(test.get("loss"))), H.num(test.get("n", "—"))]]))
        if self.pred is not None:
            s, p = self.pred.scores, self.pred
            out.append(H.tag("h3", f"This report's predictions: {p.checkpoint.name} on the {self._split()} split"))
            out.append(H.table(["top-1", "top-5", "loss", "ECE", "macro F1", "images"],
                               [[H.num(pct(s["acc1"], 2)), H.num(pct(s["acc5"], 2)), H.num(_fnum(s["loss"])),
                                 H.num(pct(s["ece"], 2)), H.num(_fnum(s["macro_f1"], 3)), H.num(s["n"])]]))
        else:
            out.append(H.note(f"No predictions in this report: {self.why}."))
        versions = [(k, env.get(k)) for k in ("visionkit", "python", "torch", "torchvision", "timm", "platform")]
        if any(v for _, v in versions):
            out.append(H.tag("h3", "Versions"))
            out.append(H.kv_table(versions))
        return H.join(out)

    def _recipe(self) -> list[tuple[str, object]]:
        run, c = self.run, self._cfg_section
        ft = run.finetune or (run.summary or {}).get("finetune") or {}
        model = c("model")
        weights = model.get("weights") or ("pretrained" if model.get("pretrained") else "random init")
        optim, sched, train, data, aug = c("optim"), c("sched"), c("train"), c("data"), c("aug")
        opt = f"{optim.get('name')}, lr {optim.get('lr')}, weight decay {optim.get('weight_decay')}" if optim else None
        sch = None
        if sched:
            sch = str(sched.get("name")) + (f", warmup {sched.get('warmup_epochs')} epochs"
                                            if sched.get("warmup_epochs") else "")
        augs = None
        if aug:
            extra = [f"{k} {aug[k]}" for k in ("mixup", "cutmix", "erasing") if aug.get(k)]
            augs = str(aug.get("preset")) + (f" ({', '.join(extra)})" if extra else "")
        size = data.get("img_size") or "native / model default"
        return [
            ("recipe", run.config.get("recipe") or "(none: defaults and overrides)"),
            ("model", f"{model.get('name')} ({weights})" if model else None),
            ("data", data.get("source")),
            ("epochs", f"{_planned_epochs(run)} (a linear probe trains finetune.probe_epochs over cached features)"
             if _strategy(run) == "linear-probe" else train.get("epochs")),
            ("batch size", data.get("batch_size")),
            ("image size", size),
            ("optimizer", opt),
            ("schedule", sch),
            ("mixed precision", train.get("amp")),
            ("augmentation", augs),
            ("label smoothing", train.get("label_smoothing") or None),
            ("EMA", f"on (decay {train.get('ema_decay')})" if train.get("ema") else None),
            ("fine-tuning", f"{ft.get('strategy')}: {ft.get('reason')}" if ft else c("finetune").get("strategy")),
            ("held-out fraction", data.get("val_split")),
        ]

    def _cfg_section(self, name: str) -> dict:
        v = self.run.config.get(name)
        return v if isinstance(v, dict) else {}

    def _split(self) -> str:
        return {"val": "validation", "test": "test"}.get(self.pred.split, self.pred.split) if self.pred else ""

    # -------------------------------------------------------------------------------- curves
    def curves(self) -> H.Html:
        if not self.run.metrics:
            return H.note("No metrics yet: no epoch has finished, so there are no learning curves to draw.")
        figs = plots.curve_plots(self.run.metrics, self.best)
        items = [self._plot(f"curves_{k}.png", png, f"{k} per epoch") for k, png in figs.items()]
        text = f"{len(self.run.metrics)} epoch{'s' if len(self.run.metrics) != 1 else ''} from metrics.csv"
        if self.best is not None:
            text += f"; the dashed green line marks the best epoch ({self.best}), the one kept as best.pt"
        return H.join([H.para(text + ".", "muted"), H.plots(items)])

    # -------------------------------------------------------------------------------- predictions sections
    def confusion(self) -> H.Html:
        if self.pred is None:
            return self._no_predictions()
        cm, classes = self.pred.scores["confusion_matrix"], self.pred.classes
        a = self._plot("confusion.png", plots.confusion_plot(cm, classes), "confusion matrix, counts")
        b = self._plot("confusion_norm.png", plots.confusion_plot(cm, classes, normalize=True),
                       "confusion matrix, row-normalised")
        text = (f"{self._split().capitalize()} split, {self.pred.scores['n']} images; rows are the true class, columns "
                "the prediction. Row-normalised: each row sums to 100% (its diagonal is the class's recall).")
        if len(classes) > 25:
            text += " Cell numbers are left out with this many classes."
        return H.join([H.para(text, "muted"), H.plots([a, b], wide=True)])

    def per_class(self) -> H.Html:
        if self.pred is None:
            return self._no_predictions()
        rows, classes = self.pred.scores["per_class"], self.pred.classes
        present = [i for i, r in enumerate(rows) if r["support"] > 0]
        n_worst = max(1, min(5, len(present) // 5)) if len(present) > 1 else 0
        ranked = sorted(present, key=lambda i: rows[i]["f1"])
        cut = rows[ranked[n_worst - 1]]["f1"] if n_worst else -1.0
        top = max((rows[i]["f1"] for i in present), default=0.0)
        worst = [i for i in ranked if rows[i]["f1"] <= cut and rows[i]["f1"] < top]  # ties included; none if all tie
        body = [[c, H.num(_fnum(r["precision"], 3)), H.num(_fnum(r["recall"], 3)), H.num(_fnum(r["f1"], 3)),
                 H.num(r["support"])] for c, r in zip(classes, rows)]
        macro = _fnum(self.pred.scores["macro_f1"], 3)
        out = [H.para(f"{self._split().capitalize()} split; macro F1 {macro}.", "muted")]
        if worst:
            names = ", ".join(f"{classes[i]} (F1 {rows[i]['f1']:.3f})" for i in worst[:10])
            more = f" and {len(worst) - 10} more" if len(worst) > 10 else ""
            which = "class" if len(worst) == 1 else f"{len(worst)} classes"
            out.append(H.para(f"Weakest {which} (highlighted): {names}{more}."))
        out.append(H.table(["class", H.num("precision"), H.num("recall"), H.num("F1"), H.num("support")], body,
                           ["worst" if i in worst else None for i in range(len(classes))]))
        return H.join(out)

    def confused_pairs(self) -> H.Html:
        if self.pred is None:
            return self._no_predictions()
        cm = np.asarray(self.pred.scores["confusion_matrix"])
        classes = self.pred.classes
        off = cm.copy()
        np.fill_diagonal(off, 0)
        order = np.argsort(-off, axis=None, kind="stable")[:MAX_PAIRS]
        pairs = [divmod(int(i), len(classes)) for i in order if off.flat[int(i)] > 0]
        if not pairs:
            return H.para("No mistakes on this split: nothing is confused.")
        total = int(off.sum())
        body = [[classes[t], classes[p], H.num(int(cm[t, p])), H.num(pct(cm[t, p] / max(cm[t].sum(), 1))),
                 H.num(pct(cm[t, p] / total))] for t, p in pairs]
        return H.join([
            H.para(f"The {len(pairs)} most frequent confusions among the {_n(total, 'mistake')} on the "
                   f"{self._split()} split.", "muted"),
            H.table(["true", "predicted as", H.num("images"), H.num("% of true class"), H.num("% of mistakes")], body)])

    def _load_inputs(self, indices: list[int]) -> None:
        need = [i for i in dict.fromkeys(indices) if i not in self.inputs]
        if need:
            x = _model_inputs(self.pred, need)
            pre = self.pred.member.preprocess
            for i, im in zip(need, _to_rgb(x, pre["mean"], pre["std"])):
                self.inputs[i] = im

    def top_losses(self) -> H.Html:
        if self.pred is None:
            return self._no_predictions()
        p = self.pred
        wrong = np.nonzero(p.preds != p.targets)[0]
        if not len(wrong):
            return H.para(f"No mistakes on the {self._split()} split.")
        if self.max_gallery <= 0:
            return H.para("Gallery switched off (max_gallery=0).", "muted")
        loss = -np.log(np.clip(p.p_true, 1e-12, None))
        pick = wrong[np.argsort(-loss[wrong], kind="stable")][: self.max_gallery].tolist()
        self._load_inputs(pick)
        tiles, titles = [], []
        for i in pick:
            t, q = int(p.targets[i]), int(p.preds[i])
            tc, pc = p.classes[t], p.classes[q]
            cap = H.join([H.Html("true "), H.tag("b", tc), f" ({pct(p.p_true[i], 0)})", H.Html("<br>"),
                          H.Html("pred "), H.tag("b", pc, "bad"), f" {pct(p.probs[i, q], 0)}", H.Html("<br>"),
                          H.tag("span", f"loss {loss[i]:.2f}", "muted")])
            tiles.append(H.tile([(plots.thumbnail(self.inputs[i]), f"true {tc}, predicted {pc}")], cap))
            titles.append(f"true {plots.shorten(tc, 14)}\npred {plots.shorten(pc, 14)} {pct(p.probs[i, q], 0)}")
        self.pngs["top_losses.png"] = plots.image_grid([self.inputs[i] for i in pick], titles, [False] * len(pick))
        return H.join([
            H.para(f"The {_n(len(pick), 'mistake')} with the highest loss of the {len(wrong)} on the "
                   f"{self._split()} split: the model's most confident wrong answers. Each image is shown as the "
                   "model sees it (resized, "
                   "normalisation undone); percentages are the probabilities of the true and the predicted class.",
                   "muted"),
            H.gallery(tiles)])

    def calibration(self) -> H.Html:
        if self.pred is None:
            return self._no_predictions()
        p, s = self.pred, self.pred.scores
        correct = p.preds == p.targets
        bins = plots.reliability_bins(p.confidence, correct, N_BINS)
        fig = self._plot("reliability.png", plots.reliability_plot(bins, s["ece"]), "reliability diagram")
        conf, acc = float(p.confidence.mean()), float(correct.mean())
        gap = conf - acc
        verdict = ("over-confident" if gap > 0.01 else "under-confident" if gap < -0.01 else "well calibrated")
        text = (f"Expected calibration error (ECE, {N_BINS} equal-width bins, torchmetrics): {pct(s['ece'], 2)}. "
                f"Mean confidence {pct(conf)} against accuracy {pct(acc)}: the model is {verdict} on average "
                f"on the {self._split()} split.")
        rows = [[f"{b['lo']:.2f}–{b['hi']:.2f}", H.num(b["count"]), H.num(pct(b["confidence"])),
                 H.num(pct(b["accuracy"]))] for b in bins if b["count"]]
        table = H.table(["confidence", H.num("images"), H.num("mean confidence"), H.num("accuracy")], rows)
        details = H.Html(f"<details><summary>Bins</summary>{table}</details>")
        return H.join([H.para(text), H.plots([fig]), details])

    def gradcam(self) -> H.Html:
        if self.pred is None:
            return self._no_predictions()
        if self.cam_images <= 0:
            return H.para("Grad-CAM switched off (cam_images=0).", "muted")
        p, n = self.pred, self.cam_images
        conf = p.confidence
        right = np.nonzero(p.preds == p.targets)[0]
        wrong = np.nonzero(p.preds != p.targets)[0]
        pick = _across_classes(right, p.targets, conf, n) + wrong[np.argsort(-conf[wrong], kind="stable")][:n].tolist()
        try:
            from ..explain.cam import compute_cams, denormalize, overlay
            x = _model_inputs(p, pick)
            pre = p.member.preprocess
            cams = compute_cams(p.member.model, x, targets=[int(p.preds[i]) for i in pick])
            rgb = denormalize(x.cpu(), pre["mean"], pre["std"])
            over = [np.asarray(overlay(rgb[j], cams[j])) for j in range(len(pick))]
        except Exception as e:  # noqa: BLE001 -- any failure here (a model the CAM code cannot handle) is a note
            return H.note(f"Grad-CAM could not be computed for this model: {type(e).__name__}: {first_line(e)}")
        tiles, images, titles, oks = [], [], [], []
        for j, i in enumerate(pick):
            t, q = int(p.targets[i]), int(p.preds[i])
            ok = t == q
            src = (np.asarray(rgb[j]) * 255).round().clip(0, 255).astype(np.uint8)
            if ok:
                cap = H.join([H.tag("span", "correct", "good"), H.Html(" "), H.tag("b", p.classes[q]),
                              f" {pct(p.probs[i, q], 0)}"])
                title = f"{plots.shorten(p.classes[q], 14)} {pct(p.probs[i, q], 0)}"
            else:
                cap = H.join([H.tag("span", "wrong", "bad"), H.Html(" pred "), H.tag("b", p.classes[q]),
                              f" {pct(p.probs[i, q], 0)}", H.Html("<br>true "), H.tag("b", p.classes[t])])
                title = (f"pred {plots.shorten(p.classes[q], 12)} {pct(p.probs[i, q], 0)}\n"
                         f"true {plots.shorten(p.classes[t], 12)}")
            tiles.append(H.tile([(plots.thumbnail(src, 160), "input"),
                                 (plots.thumbnail(over[j], 160), f"Grad-CAM for {p.classes[q]}")], cap))
            images += [src, over[j]]
            titles += [title, "Grad-CAM"]
            oks += [ok, ok]
        self.pngs["gradcam.png"] = plots.image_grid(images, titles, oks, cols=4)
        which = " and ".join(f"the {k} most confident {kind}" for k, kind in ((len(right[:n]), "correct"),
                                                                             (len(wrong[:n]), "wrong")) if k)
        return H.join([
            H.para(f"Where the model looks: Grad-CAM of the predicted class for {which} {self._split()} images "
                   "(input left, heat map right; red is where the evidence for the class is).", "muted"),
            H.gallery(tiles, pairs=True)])

    # -------------------------------------------------------------------------------- data
    def data(self) -> H.Html:
        d = self.run.data
        if not d:
            return H.note("data.json is missing: the run stopped before its data was recorded.")
        s = d.get("summary") or {}
        classes = list(s.get("classes") or self.run.classes or [])
        splits = s.get("splits") or {}
        sizes = s.get("image_sizes")
        bad = d.get("bad_files") or []
        out = [H.kv_table([
            ("source", d.get("name")),
            ("fingerprint", d.get("fingerprint")),
            ("classes", s.get("num_classes", len(classes))),
            ("channels", s.get("in_chans")),
            ("native size", f"{s['native_size']} px" if s.get("native_size") else None),
            *[(f"{split} images", v.get("n")) for split, v in splits.items()],
            *[(f"image {k} (min / median / max)", f"{v['min']} / {v['median']:g} / {v['max']} px")
              for k, v in (sizes or {}).items()],
            ("bad files skipped", s.get("bad_files", len(bad))),
        ])]
        if classes and splits:
            counts = {sp: v.get("class_counts", {}) for sp, v in splits.items()}
            rows = [[c, *[H.num(counts[sp].get(c, 0)) for sp in counts], H.num(sum(counts[sp].get(c, 0)
                                                                                   for sp in counts))]
                    for c in classes]
            out.append(H.tag("h3", "Images per class"))
            if len(classes) <= 60:
                out.append(H.plots([self._plot("class_counts.png", plots.class_count_plot(counts, classes),
                                               "images per class and split")]))
            out.append(H.table(["class", *[H.num(sp) for sp in counts], H.num("total")], rows))
        if bad:
            out.append(H.tag("h3", f"Bad files skipped ({len(bad)})"))
            more = len(bad) - MAX_BAD_FILES
            out.append(H.table(["file", "reason"], [[H.tag("code", b.get("path", "")), b.get("reason", "")]
                                                    for b in bad[:MAX_BAD_FILES]]))
            if more > 0:
                out.append(H.para(f"… and {more} more (all listed in data.json).", "muted"))
        return H.join(out)


# ------------------------------------------------------------------------------------------------ entry point
def build_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, device: str = "auto",
                 max_gallery: int = 12, cam_images: int = 4, bundle=None) -> Path:
    """Write one self-contained HTML report for a run directory; returns its path (default ``RUN_DIR/report.html``).

    Sections: run summary, learning curves, confusion matrix, per-class metrics, most-confused pairs, top-loss
    gallery, calibration, Grad-CAM and data. The prediction sections score ``best.pt`` (else ``last.pt``) on the
    run's validation split (else test); when that is impossible they say why and the rest still renders. PNG copies
    of the plots go to ``RUN_DIR/report/``. ``bundle``: the run's DataBundle when the caller holds it (``train``
    does), instead of rebuilding the split.

    Example::

        from visionkit.report import build_report
        build_report("runs/lenet-digits-1")   # runs/lenet-digits-1/report.html
    """
    for name, v in (("max_gallery", max_gallery), ("cam_images", cam_images)):
        if not isinstance(v, int) or v < 0:
            raise ConfigError(f"{name} must be a whole number >= 0, got {v!r}")
    from ..core.runtime import resolve_device
    t0 = time.perf_counter()
    run = read_run(run_dir)
    dev = resolve_device(device)  # a device that is not here is the caller's mistake, not a note in the report
    timings: dict[str, float] = {}
    pred, why = _predict_split(run, dev, bundle)
    timings["predictions"] = time.perf_counter() - t0
    rep = Report(run, pred, why, max_gallery, cam_images)
    sections = []
    for sid, fn in (("summary", rep.summary), ("curves", rep.curves), ("confusion", rep.confusion),
                    ("per-class", rep.per_class), ("confused-pairs", rep.confused_pairs),
                    ("top-losses", rep.top_losses), ("calibration", rep.calibration), ("gradcam", rep.gradcam),
                    ("data", rep.data)):
        t = time.perf_counter()
        sections.append(H.section(sid, fn()))
        timings[sid] = time.perf_counter() - t
    model = cfg_value(run, "model.name") or "?"
    data = (run.data or {}).get("name") or cfg_value(run, "data.source") or "?"
    started = (run.env or {}).get("started")
    subtitle = f"{model} on {data}" + (f" · started {started}" if started else "") + f" · {run.dir.resolve()}"
    total = time.perf_counter() - t0
    slow = sorted(timings.items(), key=lambda kv: -kv[1])[:3]
    footer = (f"visionkit report, written {time.strftime('%Y-%m-%d %H:%M:%S')} in {total:.1f} s ("
              + ", ".join(f"{k} {v:.1f} s" for k, v in slow) + "). Plots also as PNG files in "
              f"{run.dir.resolve() / PLOT_DIR}.")
    doc = H.page(f"Run report: {run.dir.resolve().name}", subtitle, sections, footer)

    plot_dir = run.dir / PLOT_DIR
    for name in PLOT_NAMES:  # a plot this report does not have must not survive from an earlier one
        if name not in rep.pngs:
            (plot_dir / name).unlink(missing_ok=True)
    for name, png in rep.pngs.items():
        atomic_write_bytes(plot_dir / name, png)
    path = Path(out) if out is not None else run.dir / "report.html"
    atomic_write_bytes(path, doc.encode("utf-8"))
    return path
