"""The Python API, mirrored by the CLI: ``train``, ``evaluate_checkpoint``, ``load`` (a Predictor).

Example::

    import visionkit
    run = visionkit.train(data="digits", model="lenet", epochs=2, out="runs/demo")
    pred = visionkit.load(run.dir / "best.pt")
    pred.predict(["some/image.png"])
"""
from __future__ import annotations

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
from .engine.checkpoint import CheckpointError, load_checkpoint
from .engine.events import CSVLogger, EarlyStopping, Progress, TensorBoardLogger
from .engine.loop import Trainer, evaluate
from .engine.optim import build_optimizer, build_scheduler

# keys that may change when a run is resumed (everything else must match the checkpoint's config)
RESUMABLE_KEYS = {"train.epochs", "train.quiet", "train.log_every", "train.save_every", "train.device",
                  "data.workers", "train.patience"}


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


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on CUDA when supported (else fp16), off on CPU (bf16 autocast on CPU is opt-in: --set train.amp=bf16)."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
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


def environment(device: torch.device, seed: int, fingerprint: str) -> dict:
    import timm
    import torchvision

    from . import __version__
    return {"visionkit": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": timm.__version__, "platform": platform.platform(),
            "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "seed": seed, "data_fingerprint": fingerprint,
            "command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


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
    return {"input_size": [c, size, size], "mean": mean, "std": std,
            "interpolation": model_cfg.get("interpolation", "bilinear"), "crop_pct": model_cfg.get("crop_pct", 0.875)}


def _loader(ds, cfg: Config, pre: dict, device, train: bool, sampler_weights=None):
    from .data import make_loader
    bs = cfg.data.batch_size if train else (cfg.data.eval_batch_size or 2 * cfg.data.batch_size)
    return make_loader(ds, batch_size=bs, train=train, seed=cfg.train.seed, device=device,
                       input_size=tuple(pre["input_size"]), mean=pre["mean"], std=pre["std"],
                       aug=cfg.aug if train else None, channels_last=cfg.model.channels_last,
                       workers=cfg.data.workers, sampler_weights=sampler_weights)


def _write(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(obj, sort_keys=False) if path.suffix == ".yaml" else json.dumps(obj, indent=2))
    tmp.replace(path)


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
    from .data import build_data, class_weights
    from .models import create_model
    from .tasks import ClassificationTask
    from .transforms import build_batch_mix

    shortcuts = {"epochs": "train.epochs", "batch_size": "data.batch_size", "lr": "optim.lr", "seed": "train.seed",
                 "device": "train.device", "quiet": "train.quiet", "deterministic": "train.deterministic",
                 "save_every": "train.save_every", "val_split": "data.val_split", "bad_images": "data.bad_images"}
    unknown = set(kw) - set(shortcuts)
    if unknown:
        raise ConfigError(f"unknown argument(s) {', '.join(sorted(unknown))}; use overrides={{'section.key': value}}")
    flat = dict(overrides or {})
    flat.update({shortcuts[k]: v for k, v in kw.items() if v is not None})
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

    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    dtype = amp_dtype(cfg.train.amp, device)

    bundle = build_data(cfg.data.source, val_split=cfg.data.val_split, seed=cfg.train.seed,
                        bad_images=cfg.data.bad_images, root=cfg.data.root, download=cfg.data.download)
    classes = list(bundle.classes)
    if ckpt is not None and list(ckpt["classes"]) != classes:
        raise CheckpointError(f"cannot resume: checkpoint has {len(ckpt['classes'])} classes "
                              f"({', '.join(ckpt['classes'][:5])}...), the data has {len(classes)}")

    net = create_model(cfg.model.name, num_classes=len(classes), in_chans=bundle.in_chans,
                       pretrained=cfg.model.pretrained and ckpt is None, drop_rate=cfg.model.drop_rate,
                       drop_path_rate=cfg.model.drop_path_rate, **cfg.model.kwargs)
    model_cfg = dict(net.visionkit_cfg)
    pre = ckpt["preprocess"] if ckpt is not None else preprocess_for(cfg, bundle, model_cfg)
    net.to(device)
    if cfg.model.channels_last:
        net.to(memory_format=torch.channels_last)

    weights = None
    if cfg.data.balance != "none":
        cw = class_weights(bundle.train.targets, len(classes))
        weights = cw if cfg.data.balance == "loss" else cw[torch.as_tensor(bundle.train.targets)]
    task = ClassificationTask(len(classes), cfg.train.label_smoothing,
                              class_weights=weights if cfg.data.balance == "loss" else None)
    train_loader = _loader(bundle.train, cfg, pre, device, True,
                           sampler_weights=weights if cfg.data.balance == "sampler" else None)
    val_loader = _loader(bundle.val, cfg, pre, device, False) if bundle.val is not None and len(bundle.val) else None

    opt = build_optimizer(net, cfg.optim)
    steps_per_epoch = -(-len(train_loader) // cfg.train.grad_accum)
    sched, per_step = build_scheduler(opt, cfg.sched, cfg.train.epochs, steps_per_epoch, cfg.optim.lr)
    ema = None
    if cfg.train.ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(net, decay=cfg.train.ema_decay, use_warmup=cfg.train.ema_warmup)
    compiled = torch.compile(net) if cfg.model.compile else None

    run_dir = Path(ckpt["path"]).parent if ckpt is not None else new_run_dir(
        out, f"{model_cfg['name'].split(':')[-1]}-{Path(str(bundle.name)).name}")
    if ckpt is None:
        _write(run_dir / "config.yaml", cfg.to_dict())
        _write(run_dir / "classes.json", classes)
        _write(run_dir / "env.json", environment(device, cfg.train.seed, bundle.fingerprint))
        _write(run_dir / "data.json", {"name": str(bundle.name), "fingerprint": bundle.fingerprint,
                                       "summary": bundle.summary(), "bad_files": bundle.bad_files})
    meta = {"config": cfg.to_dict(), "classes": classes, "model_cfg": model_cfg, "preprocess": pre,
            "data_fingerprint": bundle.fingerprint}
    monitor = cfg.train.monitor if val_loader is not None else "train_loss"
    callbacks = [Progress(cfg.train.quiet, cfg.train.log_every), CSVLogger(run_dir / "metrics.csv"),
                 TensorBoardLogger(run_dir / "tb"), EarlyStopping(cfg.train.patience)]
    trainer = Trainer(model=net, task=task, optimizer=opt, scheduler=sched, sched_per_step=per_step,
                      train_loader=train_loader, val_loader=val_loader, epochs=cfg.train.epochs, device=device,
                      amp_dtype=dtype, grad_accum=cfg.train.grad_accum, clip_grad=cfg.train.clip_grad, ema=ema,
                      mix_fn=build_batch_mix(cfg.aug, len(classes)), monitor=monitor,
                      save_every=cfg.train.save_every, run_dir=run_dir, meta=meta, callbacks=callbacks,
                      tta=cfg.train.tta, compiled=compiled)
    if ckpt is not None:
        same_length = ckpt["config"]["train"]["epochs"] == cfg.train.epochs
        trainer.load_state(ckpt if same_length else {**ckpt, "scheduler": None})
        st = trainer.state
        if not same_length and sched is not None and per_step:
            # a longer (or shorter) run: the schedule of the new length, fast-forwarded to where training stands
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(min(st.step, cfg.train.epochs * steps_per_epoch - 1)):
                    sched.step()
        print(f"resuming {run_dir} at epoch {st.epoch + 1}, batch {st.batch} (step {st.step})", file=sys.stderr)
    elif not cfg.train.quiet:
        print(f"run directory: {run_dir}", file=sys.stderr)

    t0 = time.perf_counter()
    trainer.fit()
    summary = summarize(trainer, bundle, cfg, pre, device, time.perf_counter() - t0)
    _write(run_dir / "summary.json", summary)
    return Run(run_dir, summary, cfg)


def summarize(trainer: Trainer, bundle, cfg: Config, pre: dict, device, wall: float) -> dict:
    """summary.json: best and final epochs, and the test split scored with the weights kept as best."""
    st = trainer.state
    hist = st.history
    best = next((r for r in hist if r["epoch"] == st.best_epoch), hist[-1] if hist else {})
    out = {"best": {**best, "monitor": trainer.monitor}, "final": hist[-1] if hist else {},
           "epochs_run": len(hist), "stopped_early": st.stop, "wall_seconds": wall, "run_dir": str(trainer.run_dir),
           "n_train": trainer.train_loader.num_samples, "n_val": trainer.val_loader.num_samples if trainer.val_loader
           else 0}
    if bundle.test is not None and len(bundle.test):
        best_ckpt = load_checkpoint(trainer.run_dir / "best.pt")
        model = trainer.ema.module if trainer.ema is not None else trainer.model
        model.load_state_dict(best_ckpt["ema"] if best_ckpt.get("ema") is not None else best_ckpt["model"])
        res = evaluate(model, trainer.task, _loader(bundle.test, cfg, pre, device, False), trainer.autocast,
                       tta=cfg.train.tta)
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


def evaluate_checkpoint(checkpoint: str, data: str, split: str = "val", device: str = "auto",
                        batch_size: int | None = None) -> dict:
    """Score a checkpoint on a split of ``data`` (the split is rebuilt with the run's own seed and val fraction).

    Returns loss, acc1, acc5, n, the confusion matrix and per-class precision/recall/F1.
    """
    from .data import build_data
    from .tasks import ClassificationTask

    ckpt = load_checkpoint(checkpoint)
    cfg = resolve_config(base=ckpt["config"], overrides={"data.source": data})
    if batch_size:
        cfg.data.eval_batch_size = batch_size
    dev = resolve_device(device)
    bundle = build_data(data, val_split=cfg.data.val_split, seed=cfg.train.seed, bad_images=cfg.data.bad_images,
                        root=cfg.data.root, download=cfg.data.download)
    if list(bundle.classes) != list(ckpt["classes"]):
        raise ConfigError(f"the data's classes ({', '.join(bundle.classes[:6])}...) differ from the checkpoint's "
                          f"({', '.join(ckpt['classes'][:6])}...)")
    ds = getattr(bundle, split, None)
    if ds is None or not len(ds):
        have = [s for s in ("train", "val", "test") if getattr(bundle, s, None) is not None and len(getattr(bundle, s))]
        raise ConfigError(f"{data} has no {split!r} split; it has: {', '.join(have)}")
    net = _model_from_checkpoint(ckpt, dev)
    task = ClassificationTask(len(bundle.classes))
    res = evaluate(net, task, _loader(ds, cfg, ckpt["preprocess"], dev, False), full=True)
    res.update(split=split, checkpoint=ckpt["path"], classes=list(bundle.classes))
    return res


class Predictor:
    """A trained model with its own class names and eval preprocessing.

    Example::

        p = Predictor("runs/x/best.pt")
        p.predict(["cat.jpg"], topk=3)   # [{"path": "cat.jpg", "topk": [{"label": "cat", "prob": 0.97}, ...]}]
    """

    def __init__(self, checkpoint: str, device: str = "auto"):
        from .transforms import build_eval_transform
        ckpt = load_checkpoint(checkpoint)
        self.device = resolve_device(device)
        self.classes: list[str] = list(ckpt["classes"])
        self.preprocess: dict = ckpt["preprocess"]
        self.model = _model_from_checkpoint(ckpt, self.device)
        pre = self.preprocess
        self.transform = build_eval_transform(tuple(pre["input_size"]), pre["mean"], pre["std"],
                                              crop_pct=pre["crop_pct"], interpolation=pre["interpolation"])

    @torch.no_grad()
    def predict(self, paths: list[str], topk: int = 5, batch_size: int = 64) -> list[dict]:
        from .data import DataError, load_rgb
        images, bad = [], []
        for p in paths:
            try:
                images.append(self.transform(load_rgb(p)))
            except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for missing/corrupt/non-image files
                reason = "not found" if isinstance(e, FileNotFoundError) else (str(e).splitlines() or ["unreadable"])[0]
                bad.append(f"{p} ({reason[:120]})")
        if bad:
            raise DataError(f"{len(bad)} of {len(paths)} inputs cannot be read: " + "; ".join(bad[:5]))
        k = min(topk, len(self.classes))
        out = []
        for i in range(0, len(images), batch_size):
            x = torch.stack(images[i:i + batch_size]).to(self.device)
            probs = self.model(x).float().softmax(1)
            p, idx = probs.topk(k, dim=1)
            for j in range(len(x)):
                out.append({"path": str(paths[i + j]), "topk": [{"label": self.classes[c], "prob": float(v)}
                                                                for v, c in zip(p[j].tolist(), idx[j].tolist())]})
        return out


def load(checkpoint: str, device: str = "auto") -> Predictor:
    """Load a checkpoint (file or run directory) as a Predictor."""
    return Predictor(checkpoint, device)
