"""The Python API, mirrored by the CLI: ``train``, ``evaluate_checkpoint``, ``load`` (a predictor), ``lr_find``.

It orchestrates and owns no task: ``cfg.task`` (given, or inferred from the data's layout) picks a task package under
``visionkit/tasks/`` whose ``setup`` builds the run; the engine trains it; the task scores the test split and writes
its report.

Example::

    import visionkit
    run = visionkit.train(data="digits", model="lenet", epochs=2, out="runs/demo")
    pred = visionkit.load(run.dir / "best.pt")
    pred.predict(["some/image.png"])
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import Config, ConfigError, check_task_keys, resolve_config
from .core import rundir
from .core.runtime import environment
from .engine import distributed
from .engine.checkpoint import CheckpointError, load_checkpoint
from .engine.distributed import Dist
from .engine.events import CSVLogger, EarlyStopping, Progress, TensorBoardLogger
from .engine.loop import Trainer, evaluate
from .engine.optim import build_scheduler, fast_forward
from .tasks import Setup, get_task, infer_task, monitor_for, task_name
from .tasks.classify.predict import Predictor  # noqa: F401 - classification's predictor, as before; load() picks any task's

# keys that may change when a run is resumed (everything else must match the checkpoint's config)
RESUMABLE_KEYS = {"train.epochs", "train.quiet", "train.log_every", "train.save_every", "train.device",
                  "data.workers", "train.patience", "dist.timeout", "dist.backend"}


DEFAULT_MODELS = {"classify": "resnet18", "segment": "unet", "detect": "tinyssd"}  # model.name auto


@dataclass
class Run:
    dir: Path
    summary: dict
    config: Config


def check_world(cfg: Config, world: int, device_type: str) -> None:
    """What a run on ``world`` workers needs of its config: one-line errors before anything is built."""
    if cfg.data.batch_size % world:
        lo = max(world, cfg.data.batch_size // world * world)
        raise ConfigError(f"data.batch_size {cfg.data.batch_size} is the global batch and must split evenly over "
                          f"{world} workers; use a multiple of {world} (e.g. {lo} or {lo + world})")
    if cfg.dist.sync_bn and world > 1 and device_type != "cuda":
        raise ConfigError("dist.sync_bn needs GPUs (torch's SyncBatchNorm runs on CUDA only); drop it on CPU workers")


SHORTCUTS = {"epochs": "train.epochs", "batch_size": "data.batch_size", "lr": "optim.lr", "seed": "train.seed",
             "device": "train.device", "quiet": "train.quiet", "deterministic": "train.deterministic",
             "save_every": "train.save_every", "val_split": "data.val_split", "bad_images": "data.bad_images"}


def resolve_run(data, model, recipe, config, resume, overrides, kw) -> tuple[Config, dict | None]:
    """The run's Config (and checkpoint when resuming) from the API/CLI arguments; ``task: auto`` becomes the task
    the data's layout implies, and a task named explicitly must fit the data."""
    unknown = set(kw) - set(SHORTCUTS)
    if unknown:
        raise ConfigError(f"unknown argument(s) {', '.join(sorted(unknown))}; use overrides={{'section.key': value}}")
    flat = dict(overrides or {})
    flat.update({SHORTCUTS[k]: v for k, v in kw.items() if v is not None})
    if data is not None:
        flat["data.source"] = data
    if model is not None:
        flat["model.name"] = model

    ckpt = None
    if resume:
        ckpt = load_checkpoint(resume)
        if recipe or config:
            raise ConfigError("--resume continues a run with its own config; drop --recipe/--config")
        saved = ckpt["config"]

        def old(key: str) -> Any:
            sec, _, name = key.partition(".")
            return saved.get(sec, {}).get(name) if name else saved.get(sec)
        if "model.name" in flat and flat["model.name"] != old("model.name"):
            raise CheckpointError(f"cannot resume: the checkpoint was trained as model {old('model.name')!r}, "
                                  f"not {flat['model.name']!r}")
        for key, v in flat.items():
            if key not in RESUMABLE_KEYS | {"model.name", "data.source"} and v != old(key):
                raise ConfigError(f"cannot change {key} when resuming (the checkpoint has {old(key)!r}); "
                                  f"start a new run instead")
        cfg = resolve_config(base=saved, overrides={k: v for k, v in flat.items() if k in RESUMABLE_KEYS})
        if data is not None:
            cfg.data.source = data
    else:
        if "train.epochs" in flat and "train.budget_min" not in flat:
            flat["train.budget_min"] = 0  # an epoch count asked for replaces a recipe's time budget
        cfg = resolve_config(recipe=recipe, config_file=config, overrides=flat)
    resolve_task(cfg)
    return cfg, ckpt


def resolve_task(cfg: Config) -> None:
    """``cfg.task`` from the data when ``auto``; a task that does not fit the data, or a key of another task, is a
    one-line error before anything is built. ``model.name: auto`` becomes the task's default model."""
    found = infer_task(cfg.data.source)
    if cfg.task == "auto":
        cfg.task = found
    elif cfg.task != found:
        kinds = {"classify": "a classification data set (class folders, a path,label CSV or a built-in)",
                 "segment": "a segmentation data set (images + masks)",
                 "detect": "a detection data set (images + boxes)"}
        raise ConfigError(f"--task {cfg.task} does not fit {cfg.data.source}: it is {kinds[found]}; "
                          f"use --task {found} (or leave --task out)")
    if cfg.model.name == "auto":
        cfg.model.name = DEFAULT_MODELS[cfg.task]
    check_task_keys(cfg)


# ------------------------------------------------------------------------------------------------ train
def train(data: str | None = None, model: str | None = None, *, recipe: str | None = None,
          config: str | None = None, out: str | None = None, resume: str | None = None,
          overrides: dict[str, Any] | None = None, **kw: Any) -> Run:
    """Train a model; returns the Run (its directory and summary).

    Keyword shortcuts map onto config keys: ``epochs``, ``batch_size``, ``lr``, ``seed``, ``device``, ``quiet``;
    any other key goes in ``overrides`` with its dotted name (``{"optim.name": "sgd"}``).

    Example::

        run = train(data="digits", model="lenet", epochs=1, overrides={"data.img_size": 32})
    """

    t_start = time.perf_counter()  # a time budget counts from here
    cfg, ckpt = resolve_run(data, model, recipe, config, resume, overrides, kw)
    d = distributed.from_env()  # torchrun (or `visionkit train --devices N`) started this process
    if d is None:
        return _train(cfg, ckpt, out, Dist(), None, t_start)
    check_world(cfg, d.world, "cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu")
    d, device = distributed.init(d, cfg.train.device, cfg.dist.backend, cfg.dist.timeout)
    try:
        return _train(cfg, ckpt, out, d, device, t_start)
    except RuntimeError as e:
        if not distributed.is_comm_failure(e):
            raise
        why = (str(e).splitlines() or [""])[0]
        why = why.split("] ", 1)[-1].split(". ")[0]  # "[.../pair.cc:537] Read error ...: Connection reset by peer. ..."
        raise distributed.WorkerLost(f"rank {d.rank} lost contact with the other workers ({why[:160]})") from None
    finally:
        distributed.shutdown(d)


def _train(cfg: Config, ckpt: dict | None, out: str | None, d: Dist, device: torch.device | None,
           t_start: float | None = None) -> Run:
    """One worker's part of ``train``: every rank trains; rank 0 alone writes, then scores the test split and
    writes the report once the process group is closed."""
    cfg.dist.world_size, cfg.dist.batch_per_device = d.world, cfg.data.batch_size // d.world
    check_world(cfg, d.world, (device or torch.device("cuda" if cfg.train.device != "cpu" and
                                                      torch.cuda.is_available() else "cpu")).type)
    plugin = get_task(cfg.task)
    s: Setup = plugin.setup(cfg, ckpt, d, device)
    bundle, classes, model_cfg, pre, device, dtype = s.bundle, s.classes, s.model_cfg, s.pre, s.device, s.dtype
    probe, epochs, sched, per_step = s.probe, s.epochs, s.sched, s.per_step
    train_loader, val_loader, steps_per_epoch = s.train_loader, s.val_loader, s.steps_per_epoch
    quiet = cfg.train.quiet or not d.is_main

    def make_run_dir() -> Path:
        if ckpt is not None:
            run_dir = Path(ckpt["path"]).parent
            rundir.remove_stale_temps(run_dir)
            return run_dir
        run_dir = rundir.new_run_dir(out, f"{model_cfg['name'].split(':')[-1]}-{Path(str(bundle.name)).name}")
        rundir.write(run_dir / rundir.CONFIG, cfg.to_dict())
        rundir.write(run_dir / rundir.CLASSES, classes)
        rundir.write(run_dir / rundir.ENV, environment(device, cfg.train.seed, bundle.fingerprint, d))
        rundir.write(run_dir / rundir.DATA, {"name": str(bundle.name), "fingerprint": bundle.fingerprint,
                                             "summary": bundle.summary(), "bad_files": bundle.bad_files})
        if s.decision is not None:
            rundir.write(run_dir / rundir.FINETUNE, s.decision.to_dict())
        return run_dir
    run_dir = distributed.on_main(d, make_run_dir)  # rank 0 names it and writes; every rank learns where it is

    meta = {"config": cfg.to_dict(), "classes": classes, "model_cfg": model_cfg, "preprocess": pre,
            "data_fingerprint": bundle.fingerprint, **s.meta}
    asked = s.monitor if cfg.train.monitor == "auto" and s.monitor else cfg.train.monitor
    monitor, mode = monitor_for(s.task, asked, cfg.train.monitor_mode, val_loader is not None)
    callbacks = [EarlyStopping(cfg.train.patience), *s.callbacks]  # control: the same on every rank
    if d.is_main:  # output: rank 0 only
        callbacks = [Progress(cfg.train.quiet, cfg.train.log_every), CSVLogger(run_dir / "metrics.csv"),
                     TensorBoardLogger(run_dir / "tb"), *callbacks]
    trainer = Trainer(model=s.net, task=s.task, optimizer=s.opt, scheduler=sched, sched_per_step=per_step,
                      train_loader=train_loader, val_loader=val_loader, epochs=epochs, device=device,
                      amp_dtype=dtype, grad_accum=cfg.train.grad_accum, clip_grad=cfg.train.clip_grad, ema=s.ema,
                      batch_transform=s.batch_transform, monitor=monitor, monitor_mode=mode,
                      save_every=cfg.train.save_every, run_dir=run_dir, meta=meta, callbacks=callbacks,
                      tta=cfg.train.tta and not probe, forward_model=s.forward_model, epoch_checkpoints=not probe,
                      dist=d)
    if cfg.train.budget_min > 0 and ckpt is None and not probe:
        fit_budget(trainer, s, cfg, run_dir, t_start)
    if ckpt is not None:
        same_length = probe or ckpt["config"]["train"]["epochs"] == cfg.train.epochs
        trainer.load_state(ckpt if same_length else {**ckpt, "scheduler": None})
        st = trainer.state
        if not same_length and sched is not None and per_step:
            # a longer (or shorter) run: the schedule of the new length, fast-forwarded to where training stands
            fast_forward(sched, st.step, epochs * steps_per_epoch)
        if d.is_main:
            was = (ckpt["config"].get("dist") or {}).get("world_size", 1)
            moved = f", on {d.world} worker{'s' * (d.world > 1)} (it was written by {was})" if was != d.world else ""
            print(f"resuming {run_dir} at epoch {st.epoch + 1}, batch {st.batch} (step {st.step}){moved}",
                  file=sys.stderr)
    elif not quiet:
        print(f"run directory: {run_dir}", file=sys.stderr)
    if d.enabled and not quiet:
        print(f"distributed: {d.world} worker{'s' * (d.world > 1)} ({d.backend} on {device.type}); global batch "
              f"{cfg.data.batch_size} = {d.world} x {cfg.dist.batch_per_device}, lr {cfg.optim.lr:g} as configured "
              f"(the global batch does not change with the number of workers, so neither does the lr)",
              file=sys.stderr)

    t0 = time.perf_counter()
    try:
        trainer.fit()
    finally:  # worker processes end with the run, not at some later garbage collection
        for ld in (train_loader, val_loader):
            if ld is not None:
                ld.close()
    wall = time.perf_counter() - t0
    if not d.is_main:
        return Run(run_dir, {}, cfg)
    distributed.shutdown(d)  # the rest is rank 0's alone: no rank waits on it
    summary = summarize(trainer, s, plugin, cfg, wall)
    if s.decision is not None:
        summary["finetune"] = s.decision.to_dict()
    summary["world_size"] = d.world
    rundir.write(run_dir / rundir.SUMMARY, summary)
    if cfg.train.report:
        write_report(plugin, run_dir, device, cfg.train.quiet, bundle)
    return Run(run_dir, summary, cfg)


def fit_budget(trainer: Trainer, s: Setup, cfg: Config, run_dir: Path, t_start: float | None) -> None:
    """``train.budget_min``: rank 0 measures steps and evaluation, every rank takes its epoch count, the schedule
    is laid out again over those epochs (warmup as the same fraction of the run), and config.yaml and the
    checkpoints record the epochs chosen. A :class:`budget.Keeper` plans again after every epoch."""
    from .engine import budget
    d = s.dist
    test_batches = len(s.bundle.test) // (cfg.data.eval_batch_size or 2 * cfg.data.batch_size) + 1 \
        if s.bundle.test is not None else 0
    t_start = t_start if t_start is not None else time.perf_counter()
    elapsed = time.perf_counter() - t_start
    p = distributed.on_main(d, lambda: budget.plan(trainer, cfg.train.budget_min * 60, elapsed, test_batches,
                                                   report_s=15.0 if cfg.train.report else 0.0))
    nominal, warmup = cfg.train.epochs, cfg.sched.warmup_epochs

    def relayout(epochs: int) -> None:
        """The run becomes ``epochs`` long: the schedule is built for that length (warmup the recipe's fraction of
        it) and fast-forwarded to the steps already taken; config.yaml and the checkpoints' config say so (epochs
        and warmup both, so that a resume builds the same schedule)."""
        cfg.train.epochs = trainer.epochs = epochs
        cfg.sched.warmup_epochs = warmup * epochs / nominal
        if s.sched is not None and trainer.sched_per_step:
            for g in s.opt.param_groups:  # undo the first schedule's start before laying out the new one (one-cycle
                g["lr"] = g.get("max_lr", g.get("initial_lr", g["lr"]))  # keeps its peak apart: initial_lr = peak / 25)
            trainer.sched, _ = build_scheduler(s.opt, cfg.sched, epochs, s.steps_per_epoch, cfg.optim.lr,
                                               trainer.monitor_mode)
            fast_forward(trainer.sched, trainer.state.step, epochs * s.steps_per_epoch)
        trainer.meta["config"] = cfg.to_dict()
        if d.is_main:
            rundir.write(run_dir / rundir.CONFIG, cfg.to_dict())

    relayout(p.epochs)
    trainer.meta["budget"] = p.to_dict()
    trainer.callbacks.append(budget.Keeper(p, t_start, relayout, quiet=cfg.train.quiet or not d.is_main))
    if d.is_main and not cfg.train.quiet:
        print(f"budget {cfg.train.budget_min:g} min: {p.step_s * 1000:.0f} ms/step, {p.epoch_s:.1f} s/epoch "
              f"with validation, {p.elapsed_s:.0f} s spent before training, ~{p.final_s:.0f} s kept for the test "
              f"pass and report -> {p.epochs} epochs (recipe: {nominal})", file=sys.stderr)


def write_report(plugin, run_dir: Path, device: torch.device, quiet: bool, bundle) -> None:
    """The run's report.html. Training has finished and its files are safe: a report that fails is a warning
    (with the command that retries it), never a failed run."""
    t0 = time.perf_counter()
    try:
        path = plugin.report(run_dir, device=str(device), bundle=bundle)
    except Exception as e:  # noqa: BLE001 - see the docstring
        print(f"warning: the report could not be written ({type(e).__name__}: {(str(e).splitlines() or [''])[0]}); "
              f"retry with: visionkit report {run_dir}", file=sys.stderr)
        return
    if not quiet:
        print(f"report: {path} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)


def lr_find(data: str | None = None, model: str | None = None, *, recipe: str | None = None,
            config: str | None = None, out: str | None = None, overrides: dict[str, Any] | None = None,
            start_lr: float = 1e-7, end_lr: float = 10.0, num_steps: int = 100, **kw: Any) -> tuple[Path, Any]:
    """LR range test with the run's own set-up (data, model, fine-tuning strategy and its param groups, at the
    strategy's first epoch); writes lr_find.png and lr_find.json in a fresh directory and returns (dir, result).

    Example::

        d, res = lr_find("digits", "lenet", num_steps=50)
        res.suggestion
    """
    from . import finetune as ft
    from .engine.lr_find import lr_find as sweep
    from .engine.lr_find import plot_lr_find

    d = distributed.from_env()
    if d is not None and d.world > 1:
        raise ConfigError("lr-find runs as one process; start it without torchrun")
    cfg, _ = resolve_run(data, model, recipe, config, None, overrides, kw)
    s = get_task(cfg.task).setup(cfg, None)
    for cb in s.callbacks:  # the strategy's freezing for the first epoch
        if isinstance(cb, ft.Freezer):
            ft.freeze(s.net, cb.groups, ft.trainable_stages(cb.strategy, 0, s.epochs, len(cb.groups.stages), cb.cfg))
    try:
        res = sweep(s.forward_model or s.net, s.task, s.train_loader, s.opt, start_lr=start_lr, end_lr=end_lr,
                    num_steps=num_steps, amp_dtype=s.dtype, device=s.device)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"lr-find could not run: {(str(e).splitlines() or [''])[0]}") from None
    finally:
        for ld in (s.train_loader, s.val_loader):
            if ld is not None and hasattr(ld, "close"):
                ld.close()
    run_dir = rundir.new_run_dir(out, f"lr-find-{s.model_cfg['name'].split(':')[-1]}-{Path(str(s.bundle.name)).name}")
    plot_lr_find(res, run_dir / "lr_find.png")
    strategy = s.decision.strategy if s.decision is not None else "none"
    rundir.write(run_dir / "lr_find.json", {**res.to_dict(), "strategy": strategy, "config": cfg.to_dict()})
    return run_dir, res


def summarize(trainer: Trainer, s: Setup, plugin, cfg: Config, wall: float) -> dict:
    """summary.json: best and final epochs, and the test split scored with the weights kept as best (the task picks
    what of its evaluator's output goes under ``test``)."""
    st, bundle = trainer.state, s.bundle
    hist = st.history
    best = next((r for r in hist if r["epoch"] == st.best_epoch), hist[-1] if hist else {})
    out = {"task": cfg.task, "best": {**best, "monitor": trainer.monitor, "monitor_mode": trainer.monitor_mode},
           "final": hist[-1] if hist else {}, "epochs_run": len(hist), "stopped_early": st.stop, "wall_seconds": wall,
           "run_dir": str(trainer.run_dir), "n_train": len(bundle.train),
           "n_val": len(bundle.val) if bundle.val is not None else 0}
    if bundle.test is not None and len(bundle.test):  # with the full model on images (also after a linear probe)
        best_ckpt = load_checkpoint(trainer.run_dir / rundir.BEST)
        model = trainer.ema.module if trainer.ema is not None else trainer.model
        model.load_state_dict(best_ckpt["ema"] if best_ckpt.get("ema") is not None else best_ckpt["model"])
        loader = s.loader_for(bundle.test)
        res = evaluate(model, trainer.task, loader, trainer.autocast, tta=cfg.train.tta, full=True)
        loader.close()
        out["test"] = plugin.summary_metrics(res)
    return out


def build_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, device: str = "auto") -> Path:
    """The HTML report of a run directory, by its task (``RUN_DIR/report.html`` unless ``out``)."""
    import yaml
    cfg_file = Path(run_dir) / rundir.CONFIG
    task = "classify"
    if cfg_file.is_file():
        try:
            task = task_name((yaml.safe_load(cfg_file.read_text()) or {}).get("task", "classify"))
        except (yaml.YAMLError, AttributeError, ConfigError):
            pass  # the classification report reads the file itself and says what is wrong with it
    return get_task(task).report(run_dir, out=out, device=device)


# ------------------------------------------------------------------------------------------------ eval / predict
def _task_of(checkpoint: str | list[str]) -> str:
    """The task a checkpoint (or the first of several; a run directory means its best.pt) was trained for."""
    first = checkpoint if isinstance(checkpoint, (str, os.PathLike)) else checkpoint[0]
    p = Path(first)
    if p.is_dir() and (p / rundir.BEST).is_file():
        p = p / rundir.BEST
    return task_name(load_checkpoint(p)["config"].get("task", "classify"))


def evaluate_checkpoint(checkpoint: str | list[str], data: str | None = None, split: str = "val",
                        device: str = "auto", batch_size: int | None = None, ensemble: str = "mean",
                        tta: str = "none") -> dict:
    """Score a checkpoint, or an ensemble of several, on a split of ``data`` (rebuilt with the first run's own
    hold-out seed and fraction; default data: that run's own).

    The checkpoint's task scores it. Classification returns loss, acc1, acc5, ece, n, the confusion matrix and per-class precision/recall/F1 of the final
    predictions, plus each member's scores (``members``), the ensemble's (``ensemble``) and ``tta_gain`` with TTA.

    Example::

        evaluate_checkpoint(["a/best.pt", "b/best.pt"], "fashion-mnist", split="test", tta="flip")
    """
    paths = [checkpoint] if isinstance(checkpoint, (str, os.PathLike)) else list(checkpoint)
    return get_task(_task_of(paths)).evaluate_checkpoints(paths, data, split=split, ensemble=ensemble, tta=tta,
                                                          device=device, batch_size=batch_size)


def load(checkpoint: str | list[str], device: str = "auto", ensemble: str = "mean", tta: str = "none"):
    """Load a checkpoint (file or run directory), or several as an ensemble, as its task's Predictor."""
    return get_task(_task_of(checkpoint)).Predictor(checkpoint, device, ensemble=ensemble, tta=tta)
