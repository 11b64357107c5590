"""The Python API, mirrored by the CLI: ``train``, ``evaluate_checkpoint``, ``load`` (a Predictor).

Example::

    import visionkit
    run = visionkit.train(data="digits", model="lenet", epochs=2, out="runs/demo")
    pred = visionkit.load(run.dir / "best.pt")
    pred.predict(["some/image.png"])
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import random
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from .config import Config, ConfigError, resolve_config
from .engine import distributed
from .engine.checkpoint import CheckpointError, load_checkpoint
from .engine.distributed import Dist
from .engine.events import CSVLogger, EarlyStopping, Progress, TensorBoardLogger
from .engine.loop import Trainer, evaluate
from .engine.optim import build_optimizer, build_scheduler

# keys that may change when a run is resumed (everything else must match the checkpoint's config)
RESUMABLE_KEYS = {"train.epochs", "train.quiet", "train.log_every", "train.save_every", "train.device",
                  "data.workers", "train.patience", "dist.timeout", "dist.backend"}


@dataclass
class Run:
    dir: Path
    summary: dict
    config: Config


# ------------------------------------------------------------------------------------------------ set-up helpers
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for, but no CUDA GPU is available here; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None


def cpu_has_bf16() -> bool:
    """Native bf16 matrix units (AVX512-BF16 or AMX): there bf16 autocast ran a training loop 1.5x and an
    EfficientNet forward 3x faster than fp32 (benchmarks/RESULTS.md); elsewhere it is emulated and slower."""
    probe = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(f() for f in probe if f is not None)


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on CUDA when supported (else fp16); on CPU bf16 where it has native bf16 units, else off."""
    if mode == "off":
        return None
    if mode == "auto" and device.type == "cpu":
        return torch.bfloat16 if cpu_has_bf16() else None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "fp16" and device.type == "cpu":
        raise ConfigError("fp16 autocast is for CUDA; on CPU use --set train.amp=bf16")
    return torch.bfloat16 if mode == "bf16" else torch.float16


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def new_run_dir(out: str | None, name: str) -> Path:
    """A fresh run directory; never reuses one that holds anything."""
    if out:
        p = Path(out)
        if p.exists() and (not p.is_dir() or any(p.iterdir())):
            raise ConfigError(f"run directory {p} already exists and is not empty; choose another --out "
                              f"or continue it with --resume {p}")
        p.mkdir(parents=True, exist_ok=True)
        return p
    base = Path("runs")
    base.mkdir(exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"
    n = 1
    while True:
        p = base / f"{name}-{n}"
        try:
            p.mkdir()
            return p
        except FileExistsError:
            n += 1


def environment(device: torch.device, seed: int, fingerprint: str, dist: Dist | None = None) -> dict:
    import timm
    import torchvision

    from . import __version__
    return {"visionkit": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": timm.__version__, "platform": platform.platform(),
            "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "seed": seed, "data_fingerprint": fingerprint,
            "command": " ".join(sys.argv), "cwd": os.getcwd(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "world_size": dist.world if dist else 1, "backend": dist.backend if dist and dist.enabled else None}


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
    from .data import build_data
    seed = cfg.data.split_seed if cfg.data.split_seed is not None else cfg.train.seed
    return build_data(cfg.data.source, val_split=cfg.data.val_split, seed=seed, bad_images=cfg.data.bad_images,
                      root=cfg.data.root, download=cfg.data.download)


def _loader(ds, cfg: Config, pre: dict, device, train: bool, sampler_weights=None, dist: Dist | None = None):
    """A loader of ``ds`` with the run's preprocessing; ``dist``: this worker's part of every global batch."""
    from .data import make_loader
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


def _write(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(obj, sort_keys=False) if path.suffix == ".yaml" else json.dumps(obj, indent=2))
    tmp.replace(path)


@dataclass
class Setup:
    """Everything a run trains with, built from a Config (and, when resuming, its checkpoint)."""
    device: torch.device
    dtype: torch.dtype | None
    bundle: Any
    classes: list[str]
    net: torch.nn.Module
    model_cfg: dict
    pre: dict
    task: Any
    decision: Any
    train_loader: Any
    val_loader: Any
    opt: torch.optim.Optimizer
    sched: Any
    per_step: bool
    steps_per_epoch: int
    epochs: int
    ema: Any
    forward_model: torch.nn.Module | None
    callbacks: list
    probe: bool
    dist: Dist


def check_world(cfg: Config, world: int, device_type: str) -> None:
    """What a run on ``world`` workers needs of its config: one-line errors before anything is built."""
    if cfg.data.batch_size % world:
        lo = max(world, cfg.data.batch_size // world * world)
        raise ConfigError(f"data.batch_size {cfg.data.batch_size} is the global batch and must split evenly over "
                          f"{world} workers; use a multiple of {world} (e.g. {lo} or {lo + world})")
    if cfg.dist.sync_bn and world > 1 and device_type != "cuda":
        raise ConfigError("dist.sync_bn needs GPUs (torch's SyncBatchNorm runs on CUDA only); drop it on CPU workers")


def _setup(cfg: Config, ckpt: dict | None, dist: Dist | None = None, device: torch.device | None = None) -> Setup:
    """Data, model (pretrained weights and the fine-tuning strategy included), loaders, optimizer and schedule.

    ``dist``/``device``: this worker's place and device when several train (``distributed.init`` chose them)."""
    from . import finetune as ft
    from .data import class_weights
    from .models import create_model
    from .tasks import ClassificationTask

    d = dist or Dist()
    device = device or resolve_device(cfg.train.device)
    check_world(cfg, d.world, device.type)
    seed_everything(cfg.train.seed, cfg.train.deterministic)  # the same on every rank: identical set-up
    dtype = amp_dtype(cfg.train.amp, device)

    bundle = build_bundle(cfg)
    classes = list(bundle.classes)
    if ckpt is not None and list(ckpt["classes"]) != classes:
        raise CheckpointError(f"cannot resume: checkpoint has {len(ckpt['classes'])} classes "
                              f"({', '.join(ckpt['classes'][:5])}...), the data has {len(classes)}")

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
    train_loader = _loader(bundle.train, cfg, pre, device, True, sampler_weights=sampler, dist=d)
    has_val = bundle.val is not None and len(bundle.val)
    val_loader = _loader(bundle.val, cfg, pre, device, False, dist=d) if has_val else None
    quiet = cfg.train.quiet or not d.is_main

    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    decision = None
    if ckpt is not None:  # a resumed run keeps its strategy; checkpoints older than strategies trained everything
        decision = ft.Decision(**ckpt["finetune"]) if ckpt.get("finetune") else ft.Decision(
            "none", "resumed from a checkpoint written before fine-tuning strategies existed", len(bundle.train))
    clean = None  # the train set without augmentation: for the auto decision and a linear probe's feature cache
    if decision is None:
        if cfg.finetune.strategy in ("auto", "linear-probe") and source:
            clean = _loader(bundle.train, cfg, pre, device, False)  # the whole set on every rank
        # rank 0 decides for all: every rank must train the same way
        decision = distributed.on_main(d, lambda: choose_finetune(cfg, net, bundle, clean, bool(source), autocast))
    ftc = dataclasses.replace(cfg.finetune, **decision.settings)
    probe = decision.strategy == "linear-probe"
    epochs, optim_cfg, sched_cfg, forward_model, extra = cfg.train.epochs, cfg.optim, cfg.sched, None, []
    if decision.strategy == "linear-probe":  # the head alone, on cached features
        head = ft.probe_head(net, model_cfg["name"])
        clean = clean if clean is not None else _loader(bundle.train, cfg, pre, device, False)
        images = [ld for ld in (train_loader, val_loader) if ld is not None]
        if d.world > 1:  # every rank caches the whole set; the feature loaders split the batches
            train_loader = _loader(bundle.train, cfg, pre, device, True, sampler_weights=sampler)
            val_loader = _loader(bundle.val, cfg, pre, device, False) if has_val else None
            images += [ld for ld in (train_loader, val_loader) if ld is not None]
        train_loader, val_loader = ft.probe_loaders(net, head, train_loader, clean, val_loader, ftc, cfg.data.batch_size,
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
    elif decision.strategy == "none":
        opt = build_optimizer(net, cfg.optim)
    else:  # layer groups: per-group lrs, and the Freezer callback decides each epoch what trains
        groups = ft.layer_groups(net)
        opt = build_optimizer(ft.param_groups(net, groups, ftc, cfg.optim.lr, cfg.optim.weight_decay,
                                              cfg.optim.decay_norm_and_bias), cfg.optim)
        extra.append(ft.Freezer(decision.strategy, groups, ftc, quiet))
    if clean is not None:
        clean.close()
    steps_per_epoch = -(-len(train_loader) // cfg.train.grad_accum)
    sched, per_step = build_scheduler(opt, sched_cfg, epochs, steps_per_epoch, optim_cfg.lr)
    ema = None
    if cfg.train.ema and decision.strategy != "linear-probe":
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(net, decay=cfg.train.ema_decay, use_warmup=cfg.train.ema_warmup)
    if cfg.model.compile and forward_model is None:
        forward_model = torch.compile(net)
    distributed.seed_rank(cfg.train.seed, d)  # from here on, each rank its own dropout / mixing draws
    return Setup(device, dtype, bundle, classes, net, model_cfg, pre, task, decision, train_loader, val_loader, opt,
                 sched, per_step, steps_per_epoch, epochs, ema, forward_model, extra, probe, d)


SHORTCUTS = {"epochs": "train.epochs", "batch_size": "data.batch_size", "lr": "optim.lr", "seed": "train.seed",
             "device": "train.device", "quiet": "train.quiet", "deterministic": "train.deterministic",
             "save_every": "train.save_every", "val_split": "data.val_split", "bad_images": "data.bad_images"}


def _resolve(data, model, recipe, config, resume, overrides, kw) -> tuple[Config, dict | None]:
    """The run's Config (and checkpoint when resuming) from the API/CLI arguments."""
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
        cfg = resolve_config(recipe=recipe, config_file=config, overrides=flat)

    return cfg, ckpt


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

    cfg, ckpt = _resolve(data, model, recipe, config, resume, overrides, kw)
    d = distributed.from_env()  # torchrun (or `visionkit train --devices N`) started this process
    if d is None:
        return _train(cfg, ckpt, out, Dist(), None)
    check_world(cfg, d.world, "cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu")
    d, device = distributed.init(d, cfg.train.device, cfg.dist.backend, cfg.dist.timeout)
    try:
        return _train(cfg, ckpt, out, d, device)
    except RuntimeError as e:
        if not distributed.is_comm_failure(e):
            raise
        why = (str(e).splitlines() or [""])[0]
        why = why.split("] ", 1)[-1].split(". ")[0]  # "[.../pair.cc:537] Read error ...: Connection reset by peer. ..."
        raise distributed.WorkerLost(f"rank {d.rank} lost contact with the other workers ({why[:160]})") from None
    finally:
        distributed.shutdown(d)


def _train(cfg: Config, ckpt: dict | None, out: str | None, d: Dist, device: torch.device | None) -> Run:
    """One worker's part of ``train``: every rank trains; rank 0 alone writes, then scores the test split and
    writes the report once the process group is closed."""
    from .transforms import build_batch_mix

    cfg.dist.world_size, cfg.dist.batch_per_device = d.world, cfg.data.batch_size // d.world
    s = _setup(cfg, ckpt, d, device)
    bundle, classes, net, model_cfg, pre, device, dtype = s.bundle, s.classes, s.net, s.model_cfg, s.pre, s.device, s.dtype
    decision, probe, epochs, sched, per_step = s.decision, s.probe, s.epochs, s.sched, s.per_step
    train_loader, val_loader, steps_per_epoch = s.train_loader, s.val_loader, s.steps_per_epoch
    quiet = cfg.train.quiet or not d.is_main

    def make_run_dir() -> Path:
        if ckpt is not None:
            run_dir = Path(ckpt["path"]).parent
            for stale in run_dir.glob(".*.tmp"):  # temp files of a writer that was killed mid-save
                stale.unlink(missing_ok=True)
            return run_dir
        run_dir = new_run_dir(out, f"{model_cfg['name'].split(':')[-1]}-{Path(str(bundle.name)).name}")
        _write(run_dir / "config.yaml", cfg.to_dict())
        _write(run_dir / "classes.json", classes)
        _write(run_dir / "env.json", environment(device, cfg.train.seed, bundle.fingerprint, d))
        _write(run_dir / "data.json", {"name": str(bundle.name), "fingerprint": bundle.fingerprint,
                                       "summary": bundle.summary(), "bad_files": bundle.bad_files})
        _write(run_dir / "finetune.json", decision.to_dict())
        return run_dir
    run_dir = distributed.on_main(d, make_run_dir)  # rank 0 names it and writes; every rank learns where it is

    meta = {"config": cfg.to_dict(), "classes": classes, "model_cfg": model_cfg, "preprocess": pre,
            "data_fingerprint": bundle.fingerprint, "finetune": decision.to_dict()}
    monitor = cfg.train.monitor if val_loader is not None else "train_loss"
    callbacks = [EarlyStopping(cfg.train.patience), *s.callbacks]  # control: the same on every rank
    if d.is_main:  # output: rank 0 only
        callbacks = [Progress(cfg.train.quiet, cfg.train.log_every), CSVLogger(run_dir / "metrics.csv"),
                     TensorBoardLogger(run_dir / "tb"), *callbacks]
    trainer = Trainer(model=net, task=s.task, optimizer=s.opt, scheduler=sched, sched_per_step=per_step,
                      train_loader=train_loader, val_loader=val_loader, epochs=epochs, device=device,
                      amp_dtype=dtype, grad_accum=cfg.train.grad_accum, clip_grad=cfg.train.clip_grad, ema=s.ema,
                      mix_fn=None if probe else build_batch_mix(cfg.aug, len(classes)), monitor=monitor,
                      save_every=cfg.train.save_every, run_dir=run_dir, meta=meta, callbacks=callbacks,
                      tta=cfg.train.tta and not probe, forward_model=s.forward_model, epoch_checkpoints=not probe,
                      dist=d)
    if ckpt is not None:
        same_length = probe or ckpt["config"]["train"]["epochs"] == cfg.train.epochs
        trainer.load_state(ckpt if same_length else {**ckpt, "scheduler": None})
        st = trainer.state
        if not same_length and sched is not None and per_step:
            # a longer (or shorter) run: the schedule of the new length, fast-forwarded to where training stands
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(min(st.step, epochs * steps_per_epoch - 1)):
                    sched.step()
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
    summary = summarize(trainer, bundle, cfg, pre, device, wall)
    summary["finetune"] = decision.to_dict()
    summary["world_size"] = d.world
    _write(run_dir / "summary.json", summary)
    if cfg.train.report:
        _write_report(run_dir, device, cfg.train.quiet, bundle)
    return Run(run_dir, summary, cfg)


def _write_report(run_dir: Path, device: torch.device, quiet: bool, bundle) -> None:
    """The run's report.html. Training has finished and its files are safe: a report that fails is a warning
    (with the command that retries it), never a failed run."""
    t0 = time.perf_counter()
    try:
        from .report import build_report
        path = build_report(run_dir, device=str(device), bundle=bundle)
    except Exception as e:  # noqa: BLE001 - see the docstring
        print(f"warning: the report could not be written ({type(e).__name__}: {(str(e).splitlines() or [''])[0]}); "
              f"retry with: visionkit report {run_dir}", file=sys.stderr)
        return
    if not quiet:
        print(f"report: {path} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)


def choose_finetune(cfg: Config, net: torch.nn.Module, bundle, clean, pretrained: bool,
                    autocast=contextlib.nullcontext):
    """The run's fine-tuning strategy: as asked, or (auto) from the data's size and its distance from the
    pretraining domain, measured on up to 64 training images. Printed, and recorded in finetune.json."""
    from . import finetune as ft
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
            batches.append(x[:64 - have])
            have += len(batches[-1])
            if have >= 64:
                break
        gen.close()
        d = ft.decide(n, ft.domain_shift(net, batches, autocast))
    if not cfg.train.quiet or (s == "auto" and pretrained):  # an automatic decision is always shown
        print(f"finetune: {d.reason}", file=sys.stderr)
    return d


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
    cfg, _ = _resolve(data, model, recipe, config, None, overrides, kw)
    s = _setup(cfg, None)
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
    run_dir = new_run_dir(out, f"lr-find-{s.model_cfg['name'].split(':')[-1]}-{Path(str(s.bundle.name)).name}")
    plot_lr_find(res, run_dir / "lr_find.png")
    _write(run_dir / "lr_find.json", {**res.to_dict(), "strategy": s.decision.strategy, "config": cfg.to_dict()})
    return run_dir, res


def summarize(trainer: Trainer, bundle, cfg: Config, pre: dict, device, wall: float) -> dict:
    """summary.json: best and final epochs, and the test split scored with the weights kept as best."""
    st = trainer.state
    hist = st.history
    best = next((r for r in hist if r["epoch"] == st.best_epoch), hist[-1] if hist else {})
    out = {"best": {**best, "monitor": trainer.monitor}, "final": hist[-1] if hist else {},
           "epochs_run": len(hist), "stopped_early": st.stop, "wall_seconds": wall, "run_dir": str(trainer.run_dir),
           "n_train": len(bundle.train), "n_val": len(bundle.val) if bundle.val is not None else 0}
    if bundle.test is not None and len(bundle.test):  # with the full model on images (also after a linear probe)
        best_ckpt = load_checkpoint(trainer.run_dir / "best.pt")
        model = trainer.ema.module if trainer.ema is not None else trainer.model
        model.load_state_dict(best_ckpt["ema"] if best_ckpt.get("ema") is not None else best_ckpt["model"])
        loader = _loader(bundle.test, cfg, pre, device, False)
        res = evaluate(model, trainer.task, loader, trainer.autocast, tta=cfg.train.tta)
        loader.close()
        out["test"] = {k: res[k] for k in ("acc1", "acc5", "loss", "n")}
    return out


# ------------------------------------------------------------------------------------------------ eval / predict
def _model_from_checkpoint(ckpt: dict, device: torch.device) -> torch.nn.Module:
    from .models import create_model
    cfg, pre = ckpt["config"], ckpt["preprocess"]
    net = create_model(ckpt["model_cfg"]["name"], num_classes=len(ckpt["classes"]), in_chans=pre["input_size"][0],
                       drop_rate=cfg["model"]["drop_rate"], drop_path_rate=cfg["model"]["drop_path_rate"],
                       **cfg["model"]["kwargs"])
    net.load_state_dict(ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"])
    return net.to(device).eval()


def _autocast(cfg: Config, device: torch.device):
    """The run's autocast, for eval and predict: the numbers they give match those training reported."""
    dtype = amp_dtype(cfg.train.amp, device) if not (cfg.train.amp == "fp16" and device.type == "cpu") else None
    return (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext


def evaluate_checkpoint(checkpoint: str | list[str], data: str | None = None, split: str = "val",
                        device: str = "auto", batch_size: int | None = None, ensemble: str = "mean",
                        tta: str = "none") -> dict:
    """Score a checkpoint, or an ensemble of several, on a split of ``data`` (rebuilt with the first run's own
    hold-out seed and fraction; default data: that run's own).

    Returns loss, acc1, acc5, ece, n, the confusion matrix and per-class precision/recall/F1 of the final
    predictions, plus each member's scores (``members``), the ensemble's (``ensemble``) and ``tta_gain`` with TTA.

    Example::

        evaluate_checkpoint(["a/best.pt", "b/best.pt"], "fashion-mnist", split="test", tta="flip")
    """
    from .evaluation import evaluate_checkpoints
    paths = [checkpoint] if isinstance(checkpoint, (str, os.PathLike)) else list(checkpoint)
    return evaluate_checkpoints(paths, data, split=split, ensemble=ensemble, tta=tta, device=device,
                                batch_size=batch_size)


class Predictor:
    """A trained model (or an ensemble of several) with its own class names and eval preprocessing.

    Example::

        p = Predictor("runs/x/best.pt")
        p.predict(["cat.jpg"], topk=3)   # [{"path": "cat.jpg", "topk": [{"label": "cat", "prob": 0.97}, ...]}]
        Predictor(["runs/x/best.pt", "runs/y/best.pt"], ensemble="mean", tta="flip").predict(["cat.jpg"])
    """

    def __init__(self, checkpoint: str | list[str], device: str = "auto", ensemble: str = "mean",
                 tta: str = "none"):
        from .evaluation import ENSEMBLES, TTA_MODES, load_members
        from .transforms import build_eval_transform
        if ensemble not in ENSEMBLES:
            raise ConfigError(f"unknown ensemble {ensemble!r}; choose from {', '.join(ENSEMBLES)}")
        if tta not in TTA_MODES:
            raise ConfigError(f"unknown tta {tta!r}; choose from {', '.join(TTA_MODES)}")
        paths = [checkpoint] if isinstance(checkpoint, (str, os.PathLike)) else list(checkpoint)
        self.members = load_members(paths, device)
        first = self.members[0]
        self.device, self.classes, self.preprocess = first.device, first.classes, first.preprocess
        self.model, self.autocast = first.model, first.autocast
        self.ensemble, self.tta, self.weights = ensemble, tta, None
        self.transforms = []
        for m in self.members:
            pre = m.preprocess
            self.transforms.append(build_eval_transform(tuple(pre["input_size"]), pre["mean"], pre["std"],
                                                        crop_pct=pre["crop_pct"], interpolation=pre["interpolation"]))
        self.transform = self.transforms[0]
        if len(self.members) > 1 and ensemble == "weighted":
            self.weights = self._fit_weights()

    def _fit_weights(self) -> torch.Tensor:
        """Weights fitted on the first member's validation split (rebuilt from its run's data)."""
        from .evaluation import _dataset, fit_weights, member_probs
        try:
            _, val = _dataset(self.members[0].config, None, "val")
        except (ConfigError, OSError) as e:
            raise ConfigError(f"--ensemble weighted fits its weights on the runs' validation split, which cannot be "
                              f"rebuilt here ({e}); use --ensemble mean or vote") from None
        runs = [member_probs(m, val, self.tta) for m in self.members]
        return fit_weights(torch.stack([r[1] for r in runs]), runs[0][2])

    @torch.no_grad()
    def probabilities(self, paths: list[str], batch_size: int = 64) -> torch.Tensor:
        """Class scores ``[N, K]``: each member's softmax (averaged over the TTA views), combined by the ensemble."""
        from .data import DataError, load_rgb
        chunks, bad = [], []
        for i in range(0, len(paths), batch_size):  # decoded a batch at a time; every unreadable file is listed
            images = []
            for p in paths[i:i + batch_size]:
                try:
                    images.append(load_rgb(p))
                except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for missing/corrupt/non-images
                    why = "not found" if isinstance(e, FileNotFoundError) else (str(e).splitlines() or ["unreadable"])[0]
                    bad.append(f"{p} ({why[:120]})")
            if not bad:
                chunks.append(self._scores(images))
        if bad:
            raise DataError(f"{len(bad)} of {len(paths)} inputs cannot be read: " + "; ".join(bad[:5]))
        return torch.cat(chunks)

    def _scores(self, images: list) -> torch.Tensor:
        from .evaluation import combine, tta_views
        per_member = []
        for m, transform in zip(self.members, self.transforms):
            x = torch.stack([transform(im) for im in images]).to(m.device)
            views = []
            for v in tta_views(x, self.tta):
                with m.autocast():
                    views.append(m.model(v).float().softmax(1))
            per_member.append(torch.stack(views).mean(0).cpu())
        return combine(torch.stack(per_member), self.ensemble, self.weights)

    def predict(self, paths: list[str], topk: int = 5, batch_size: int = 64) -> list[dict]:
        probs = self.probabilities(paths, batch_size)
        p, idx = probs.topk(min(topk, len(self.classes)), dim=1)
        return [{"path": str(path), "topk": [{"label": self.classes[c], "prob": float(v)}
                                             for v, c in zip(p[j].tolist(), idx[j].tolist())]}
                for j, path in enumerate(paths)]


def load(checkpoint: str | list[str], device: str = "auto", ensemble: str = "mean", tta: str = "none") -> Predictor:
    """Load a checkpoint (file or run directory), or several as an ensemble, as a Predictor."""
    return Predictor(checkpoint, device, ensemble=ensemble, tta=tta)
