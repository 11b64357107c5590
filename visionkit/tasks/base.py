"""The contract between the engine and a task, and the task registry.

A task is a folder under ``visionkit/tasks/`` with the same file names in every task (a newcomer who knows one task
knows where everything of another lives)::

    data.py        its data sources, datasets and loaders (a loader yields ``(inputs, targets)``; either may be a tree)
    transforms.py  train / eval preprocessing (torchvision v2; tv_tensors move targets with the image)
    models.py      its models by name
    task.py        the Task object the engine calls, and ``setup``: a Config -> everything a run trains with
    metrics.py     ONE evaluator (update / sync / compute) used by the loop, ``eval``, the report and ensembles
    predict.py     a trained model as a predictor (files in, results out)
    report.py      the task's sections of the HTML report

Tasks are composed from shared parts (the engine, ``data.loaders.Loader``, ``models``), never derived from each
other (Ultralytics' SegmentationTrainer(DetectionTrainer) is what this avoids).

Example::

    plugin = get_task("segment")
    plugin.setup(cfg, ckpt=None, dist=Dist(), device=None)  # -> Setup
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol

import torch

from ..config import TASK_ALIASES, ConfigError


class Task(Protocol):
    """What the engine (``engine/loop.py``) calls. Nothing in it names labels, classes or masks."""

    name: str
    monitor: tuple[str, str]  # the default monitored column and its direction, e.g. ("val_miou", "max")
    log_names: tuple[str, ...]  # sums ``training_step`` logs: each becomes a train_<name> column (sum / n)
    metric_names: tuple[str, ...]  # scalars ``new_metrics().compute()`` returns: each becomes a val_<name> column
    show: tuple[str, ...]  # further columns for the progress line

    def training_step(self, model: torch.nn.Module, batch: Any) -> dict:
        """``{"loss": scalar tensor (mean over the batch), "n": batch size, "logs": {name: sum over the batch}}``."""

    def predict(self, model: torch.nn.Module, x: Any, tta: bool = False) -> Any:
        """Model outputs for evaluation (what the task's metrics take)."""

    def new_metrics(self) -> Any:
        """A fresh evaluator: ``update(outputs, targets)``, ``sync(dist, lists)``, ``compute(full) -> dict``."""


@dataclass
class Setup:
    """Everything a run trains with, built by a task's ``setup`` from a Config (and its checkpoint when resuming)."""
    device: torch.device
    dtype: torch.dtype | None
    bundle: Any  # the data: name, classes, train/val/test, fingerprint, summary(), bad_files
    classes: list[str]
    net: torch.nn.Module
    model_cfg: dict
    pre: dict  # the preprocessing stored in checkpoints (input size, mean, std, ...)
    task: Task
    train_loader: Any
    val_loader: Any
    opt: torch.optim.Optimizer
    sched: Any
    per_step: bool
    steps_per_epoch: int
    epochs: int
    ema: Any
    dist: Any
    loader_for: Callable[[Any], Any]  # an eval loader of a split (the test split after training)
    forward_model: torch.nn.Module | None = None
    callbacks: list = field(default_factory=list)
    batch_transform: Callable | None = None  # MixUp/CutMix and the like, applied by the loop outside autocast
    decision: Any = None  # classification's fine-tuning strategy (finetune.json)
    probe: bool = False  # classification's linear probe (the head alone on cached features)
    meta: dict = field(default_factory=dict)  # task-specific entries for every checkpoint
    monitor: str | None = None  # this run's monitored column when train.monitor is auto (None: the task's default)


def start_run(cfg, dist=None, device: torch.device | None = None) -> tuple[Any, torch.device, torch.dtype | None]:
    """What every task's ``setup`` starts with: this worker's ``Dist``, its device and autocast dtype, and every RNG
    seeded the same on every rank (identical set-up)."""
    from ..core.runtime import amp_dtype, resolve_device, seed_everything
    from ..engine.distributed import Dist
    d = dist or Dist()
    device = device or resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    return d, device, amp_dtype(cfg.train.amp, device, warn=d.is_main)


def check_resume_classes(ckpt: dict | None, classes: list[str]) -> None:
    """A resumed run must see the classes its checkpoint was trained on."""
    from ..engine.checkpoint import CheckpointError
    if ckpt is not None and list(ckpt["classes"]) != list(classes):
        raise CheckpointError(f"cannot resume: checkpoint has {len(ckpt['classes'])} classes "
                              f"({', '.join(ckpt['classes'][:5])}...), the data has {len(classes)}")


def trains_everything(cfg, net: torch.nn.Module, ckpt: dict | None, d, n_train: int, train_loader,
                      monitor_mode: str, what: str, announce: bool) -> dict:
    """The training parts a task that fine-tunes a whole network shares (segmentation, detection): optimizer and
    fine-tuning callbacks, schedule, EMA, compiled forward; as ``Setup`` keyword arguments.

    The backbone (encoder) is the "body" of classification's layer groups, so partial / staged / gradual freezing and
    discriminative lrs apply to it; auto and none train everything at optim.lr (a linear probe is classification's).
    ``what``: the task in words, for messages; ``announce``: print the strategy (the model starts from weights).
    """
    from .. import finetune as ft
    from ..engine import distributed
    from ..engine.optim import build_scheduler
    strategy = cfg.finetune.strategy
    if strategy == "linear-probe":
        raise ConfigError(f"finetune linear-probe is for classification (a head on frozen features); for "
                          f"{what} use staged, partial, gradual, full or none")
    quiet = cfg.train.quiet or not d.is_main
    if ckpt is not None and ckpt.get("finetune"):
        strategy = ckpt["finetune"]["strategy"]
    if strategy not in ("full", "partial", "staged", "gradual"):
        strategy = "none"
    opt, callbacks = ft.optimizer_for(net, strategy, cfg.finetune, cfg.optim, quiet)
    decision = ft.Decision(strategy, f"--finetune {cfg.finetune.strategy}" if strategy != "none"
                           else f"{what} trains everything unless a strategy is asked for", n_train)
    if not quiet and announce:
        print(f"finetune: {decision.reason}", file=sys.stderr)
    epochs = cfg.train.epochs
    steps_per_epoch = -(-len(train_loader) // cfg.train.grad_accum)
    sched, per_step = build_scheduler(opt, cfg.sched, epochs, steps_per_epoch, cfg.optim.lr, monitor_mode)
    ema = None
    if cfg.train.ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(net, decay=cfg.train.ema_decay, use_warmup=cfg.train.ema_warmup)
    forward_model = torch.compile(net) if cfg.model.compile else None
    distributed.seed_rank(cfg.train.seed, d)
    return {"opt": opt, "callbacks": callbacks, "decision": decision, "sched": sched, "per_step": per_step,
            "steps_per_epoch": steps_per_epoch, "epochs": epochs, "ema": ema, "forward_model": forward_model}


# canonical name -> module; each module has setup(), looks_like(source), summary_metrics(res), report(...), ...
TASKS = {"classify": "visionkit.tasks.classify", "segment": "visionkit.tasks.segment",
         "detect": "visionkit.tasks.detect"}


def task_name(name: str) -> str:
    """The canonical name of a task (``classification`` -> ``classify``); a one-line error for an unknown one."""
    name = TASK_ALIASES.get(name, name)
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return name


def get_task(name: str) -> ModuleType:
    """The task's package (imported on first use: a classification run never imports segmentation code)."""
    return importlib.import_module(TASKS[task_name(name)])


def infer_task(source: str) -> str:
    """The task a data source's layout implies: a detection layout (boxes) means detect, a segmentation layout
    segment, anything else classify. Detection is asked first: its check is the stricter one (YOLO's labels/ of
    .txt files and COCO's annotations/ of JSON would otherwise pass for mask folders)."""
    for name in ("detect", "segment"):
        if get_task(name).looks_like(str(source)):
            return name
    return "classify"


def monitor_for(task: Task, asked: str, mode: str, has_val: bool) -> tuple[str, str]:
    """The monitored column and its direction: the task's default (``auto``) or the one asked for, which must be a
    column this run logs. Checked before training, so a typo cannot make every epoch "the best"."""
    columns = ["epoch", "train_loss", *(f"train_{k}" for k in task.log_names)]  # epoch: keep the latest
    if has_val:
        columns += ["val_loss", *(f"val_{k}" for k in task.metric_names)]
    if asked == "auto":
        name, default_mode = task.monitor if has_val else ("train_loss", "min")
    else:
        name, default_mode = asked, ("min" if "loss" in asked else "max")  # epoch: max, every epoch is the best
        if name not in columns:
            why = "" if has_val or not name.startswith("val_") else " (this run has no validation split)"
            raise ConfigError(f"train.monitor {name!r} is not a metric of this {task.name} run{why}; "
                              f"choose from {', '.join(columns)}")
    return name, default_mode if mode == "auto" else mode


def read_images(paths: list) -> list:
    """Every input of a ``predict`` as an RGB PIL image, or one DataError naming the unreadable ones (all are read
    before anything is written)."""
    from ..data import DataError, load_rgb
    images, bad = [], []
    for p in paths:
        try:
            images.append(load_rgb(p))
        except (OSError, ValueError, SyntaxError) as e:
            why = "not found" if isinstance(e, FileNotFoundError) else (str(e).splitlines() or ["unreadable"])[0]
            bad.append(f"{p} ({why[:120]})")
    if bad:
        raise DataError(f"{len(bad)} of {len(paths)} inputs cannot be read: " + "; ".join(bad[:5]))
    return images


def output_files(out, paths: list, suffixes: tuple[str, ...]) -> list[tuple]:
    """Per input, the files a ``predict --out`` writes (``<stem><suffix>`` in ``out``; stems numbered when two
    inputs share one); a DataError when any exists already (never overwritten), else ``out`` is created."""
    from pathlib import Path

    from ..data import DataError
    out = Path(out)
    stems = [Path(p).stem for p in paths]
    if len(set(stems)) != len(stems):  # two inputs named a.jpg in different folders
        stems = [f"{i:04d}_{s}" for i, s in enumerate(stems)]
    files = [tuple(out / f"{s}{suf}" for suf in suffixes) for s in stems]
    taken = [str(f) for group in files for f in group if f.exists()]
    if taken:
        raise DataError(f"{taken[0]} already exists (and {len(taken) - 1} more); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return files


def split_to_score(config, classes: list[str], build_bundle: Callable, data: str | None, split: str,
                   batch_size: int | None) -> tuple:
    """``(cfg, dataset)`` that ``eval`` scores a checkpoint on: the run's config with ``data`` (default: the run's
    own source) rebuilt by the task's ``build_bundle`` with the run's hold-out seed and fraction; one DataError when
    the data has other classes than the model or no such split."""
    from ..config import resolve_config
    from ..data import DataError
    cfg = resolve_config(base=config.to_dict(), overrides={"data.source": data} if data else None)
    if batch_size:
        cfg.data.eval_batch_size = batch_size
    bundle = build_bundle(cfg)
    if list(bundle.classes) != list(classes):
        raise DataError(f"{cfg.data.source} has classes {bundle.classes[:6]}, the model {list(classes)[:6]}: "
                        f"not the data this model was trained for")
    ds = bundle.splits().get(split)
    if ds is None or not len(ds):
        raise DataError(f"{cfg.data.source} has no {split} split; choose from {', '.join(bundle.splits())}")
    return cfg, ds
