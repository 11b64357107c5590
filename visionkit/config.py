"""Typed configuration: defaults -> recipe YAML -> config file -> CLI flags -> ``--set key=value``.

One dataclass per concern (data, aug, model, optim, sched, train) instead of one flat bag of keys shared by every
mode: a key lives where it is used, and an unknown key is an error, not a silent no-op.

Example::

    cfg = resolve_config(recipe="fast-cpu", overrides={"train.epochs": 3, "data.source": "digits"})
    cfg.optim.lr
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

RECIPE_DIR = Path(__file__).parent / "recipes"
FP32_CPU_SECTION = "cpu_without_bf16"  # a recipe section applied on CPUs without native bf16 (see resolve_config)


class ConfigError(ValueError):
    """A user mistake in the configuration: the message says what and how to fix it."""


@dataclass
class DataConfig:
    source: str = "digits"  # folder, CSV file or built-in name (fashion-mnist, mnist, cifar10, cifar100, digits, fake)
    val_split: float = 0.2  # held-out fraction of train when the data has no val split (0 allowed)
    split_seed: int | None = None  # seed of that hold-out; None: train.seed. Fix it to ensemble differently seeded runs
    img_size: int | None = None  # None: native size for built-ins, the model's input size for image files
    crop_pct: float | None = None  # eval: resize to img_size / crop_pct, centre-crop img_size. None: the model's own
    bad_images: str = "fail"  # fail | skip
    batch_size: int = 128
    eval_batch_size: int | None = None  # None: 2 x batch_size
    workers: int | None = None  # DataLoader workers for image files; None: min(4, cpus)
    balance: str = "none"  # none | loss (class-weighted loss) | sampler (weighted sampler)
    root: str | None = None  # where built-ins look for local copies (default: $VISIONKIT_DATA, then ~/.cache)
    download: bool = True  # built-ins: download when no local copy is found


@dataclass
class AugConfig:
    preset: str = "basic"  # none | basic | standard | randaugment | autoaugment | trivialaugment
    hflip: float = 0.5  # flip probability (basic and up)
    crop_pad: int = 4  # basic, tensor path / small images: random translation by up to this many pixels
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop scale (standard and up, image files)
    color_jitter: float = 0.4  # standard
    ra_n: int = 2  # RandAugment ops
    ra_m: int = 9  # RandAugment magnitude
    erasing: float = 0.0  # RandomErasing probability
    mixup: float = 0.0  # MixUp alpha (0: off)
    cutmix: float = 0.0  # CutMix alpha (0: off)
    mix_prob: float = 1.0  # probability that a batch is mixed at all
    switch_prob: float = 0.5  # with both on: probability of CutMix rather than MixUp
    backend: str = "torchvision"  # torchvision | albumentations (image files only)
    interpolation: str = "model"  # resize interpolation: model (the model's own, e.g. bicubic for timm) or a mode


@dataclass
class ModelConfig:
    # own name, tv:NAME, timm:NAME or a bare name resolved own -> torchvision -> timm; auto: the task's default
    # (resnet18 to classify, unet to segment); `visionkit models --task segment` lists segmentation models
    name: str = "auto"
    pretrained: bool = False
    weights: str | None = None  # local weights: state dict, safetensors or visionkit checkpoint (instead of pretrained)
    weights_strict: bool = True  # refuse a weights file with missing/unexpected/mis-shaped tensors (a head is adapted)
    drop_rate: float = 0.0  # dropout before the classifier
    drop_path_rate: float = 0.0  # stochastic depth (models that support it)
    channels_last: bool = True
    compile: bool = False  # torch.compile the model
    kwargs: dict = field(default_factory=dict)  # extra keyword arguments for the model factory


@dataclass
class FinetuneConfig:
    # auto: chosen from the data (size, distance from the pretraining domain) when the model starts from pretrained
    # weights, else none. none: everything trains at optim.lr. linear-probe: frozen backbone, head trained on cached
    # features. full: everything trains, discriminative lrs. partial: the top train_fraction of the stages trains.
    # staged: head, then + last stage, then all. gradual: one more stage from the top every unfreeze_every epochs.
    strategy: str = "auto"
    lr_mult: tuple[float, float] = (0.01, 0.1)  # CNNs: lr multipliers of the early and late half of the body (head 1)
    layer_decay: float | None = None  # lr multiplier per block from the head; None: 0.75 for transformers, else off
    train_fraction: float = 0.5  # partial: fraction of the body's stages that train, from the top
    stage_epochs: tuple[float, float] = (0.2, 0.2)  # staged: fractions of the epochs with the head only, then + last
    unfreeze_every: int = 1  # gradual: epochs between unfreezing one more stage
    probe_copies: int = 0  # linear-probe: augmented copies of the train set in the cache besides the clean one (on
    # ants/bees 2 copies with the finetune recipe's crops cost 1.4 points of held-out accuracy: benchmarks/RESULTS.md)
    probe_epochs: int = 30  # linear-probe: epochs over the cached features (each takes milliseconds)
    probe_batch_size: int = 32  # linear-probe: the global batch of cached features (on 8 splits of ants/bees, 32
    # vs 128: +0.35 points held-out when training on 80% of the photos, -0.17 on all of them: benchmarks/RESULTS.md)
    probe_lr: float = 0.003  # linear-probe: head lr (AdamW, cosine)
    probe_weight_decay: float = 0.0001  # linear-probe: head weight decay


@dataclass
class OptimConfig:
    name: str = "adamw"  # sgd | adamw | adam
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9  # sgd
    nesterov: bool = True  # sgd
    betas: tuple[float, float] = (0.9, 0.999)  # adam / adamw
    decay_norm_and_bias: bool = False  # False: no weight decay on norm layers and biases (the usual choice)


@dataclass
class SchedConfig:
    name: str = "cosine"  # constant | cosine | linear | onecycle | step | multistep | cosine_restarts | plateau
    warmup_epochs: float = 0.0  # linear warmup (every schedule but onecycle, which has its own, and plateau)
    warmup_factor: float = 0.01  # warmup starts at lr * warmup_factor
    min_lr: float = 0.0  # where cosine / linear schedules end, as a fraction of lr
    step_epochs: int = 30  # step
    milestones: list[int] = field(default_factory=lambda: [30, 60, 90])  # multistep (epochs)
    gamma: float = 0.1  # step / multistep / plateau factor
    restart_epochs: int = 10  # cosine_restarts: first cycle length (epochs)
    restart_mult: int = 1  # cosine_restarts: cycle length multiplier
    pct_start: float = 0.25  # onecycle: fraction of steps spent rising
    patience: int = 3  # plateau: epochs without improvement before the lr drops


@dataclass
class TrainConfig:
    epochs: int = 10
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16/fp16 on CUDA; bf16 on CPUs with native bf16, else off) | off | bf16 | fp16
    grad_accum: int = 1
    clip_grad: float = 0.0  # max gradient norm (0: off)
    label_smoothing: float = 0.0
    ema: bool = False
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay ramps up over the first steps (timm's ModelEmaV3 warmup)
    monitor: str = "auto"  # metric for best.pt, early stopping and plateau: auto (the task's: val_acc1, val_miou;
    # a linear probe keeps its last epoch), a column of metrics.csv (train_loss, train_<log>, val_loss, val_<metric>)
    # or epoch (keep the latest); checked before training starts
    monitor_mode: str = "auto"  # auto (min for *loss*, else max) | min | max
    budget_min: float = 0.0  # > 0: a time budget in minutes (whole run, evaluation included) instead of train.epochs
    patience: int = 0  # early stopping: epochs without improvement (0: off)
    save_every: int = 0  # also checkpoint every N optimizer steps, for mid-epoch resume (0: epoch ends only)
    tta: bool = False  # flip TTA for val/test evaluation
    report: bool = True  # write report.html (visionkit report) when training ends
    quiet: bool = False
    log_every: int = 20  # progress refresh, in steps


@dataclass
class DistConfig:
    # data.batch_size is the global batch: W workers take batch_size / W each, so a recipe trains the same way on
    # any number of devices and the lr needs no scaling. world_size and batch_per_device are filled in by the run.
    backend: str = "auto"  # auto (nccl on GPUs, gloo on CPUs) | nccl | gloo
    sync_bn: bool = False  # BatchNorm statistics over the global batch (SyncBatchNorm; GPUs only)
    timeout: float = 600.0  # seconds the start-up handshake or a collective may wait before the job fails
    world_size: int = 1  # set by the run: worker processes in all
    batch_per_device: int | None = None  # set by the run: data.batch_size / world_size


@dataclass
class SegmentConfig:
    """Keys of the segment task (refused by other tasks)."""
    loss: str = "ce"  # ce | dice | focal | ce+dice
    aux_weight: float = 0.4  # weight of an aux head's loss (torchvision FCN/DeepLab with aux heads)
    ignore_index: int = 255  # mask value that is no class (VOC's object boundaries; padding of crops)
    tile: int = 0  # predict: sliding-window tile size for large images (0: resize the whole image)


@dataclass
class DetectConfig:
    """Keys of the detect task (refused by other tasks). Post-processing for evaluation (mAP wants low-confidence
    detections too, as COCOeval ranks them); ``visionkit predict`` has its own --conf/--iou/--max-det."""
    eval_conf: float = 0.01  # detections below this score are dropped before NMS when scoring mAP
    nms_iou: float = 0.5  # per-class NMS IoU threshold
    max_det: int = 100  # detections kept per image (COCO scores up to 100)


@dataclass
class Config:
    task: str = "auto"  # auto (from the data's layout) | classify | segment | detect
    recipe: str = ""  # name of the recipe this config came from (informational)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))


# keys older checkpoints may hold that no longer exist (data.backend: never read; the data source decides the path)
RETIRED_KEYS = {"data.backend"}

CHOICES = {
    "data.bad_images": ("fail", "skip"),
    "data.balance": ("none", "loss", "sampler"),
    "aug.preset": ("none", "basic", "standard", "randaugment", "autoaugment", "trivialaugment"),
    "aug.backend": ("torchvision", "albumentations"),
    "aug.interpolation": ("model", "nearest", "bilinear", "bicubic"),
    "optim.name": ("sgd", "adamw", "adam"),
    "finetune.strategy": ("auto", "none", "linear-probe", "full", "partial", "staged", "gradual"),
    "sched.name": ("constant", "cosine", "linear", "onecycle", "step", "multistep", "cosine_restarts", "plateau"),
    "train.amp": ("auto", "off", "bf16", "fp16"),
    "dist.backend": ("auto", "nccl", "gloo"),
    "task": ("auto", "classify", "segment", "detect"),
    "train.monitor_mode": ("auto", "min", "max"),
    "segment.loss": ("ce", "dice", "focal", "ce+dice"),
}


TASK_ALIASES = {"classification": "classify", "segmentation": "segment", "seg": "segment", "cls": "classify",
                "detection": "detect", "det": "detect"}

# keys that belong to one task: a run of another task refuses them (set away from their default) by name
TASK_KEYS = {
    "classify": ("train.label_smoothing", "aug.mixup", "aug.cutmix", "data.balance"),
    "segment": tuple(f"segment.{f.name}" for f in fields(SegmentConfig)),
    "detect": tuple(f"detect.{f.name}" for f in fields(DetectConfig)),
}


def check_task_keys(cfg: Config) -> None:
    """One line naming the key and its task when a config sets a key that belongs to another task."""
    default = Config()
    for task, keys in TASK_KEYS.items():
        if task == cfg.task:
            continue
        for key in keys:
            sec, name = key.split(".")
            if getattr(getattr(cfg, sec), name) != getattr(getattr(default, sec), name):
                raise ConfigError(f"config key {key} belongs to the {task} task, and this run is task {cfg.task}; "
                                  f"drop it (or train with --task {task})")


def _to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def _coerce(key: str, value: Any, default: Any, typ: Any) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise ConfigError naming the key."""
    tname = str(typ)
    if value is None:
        if "None" in tname:
            return None
        raise ConfigError(f"config key {key!r} cannot be empty")
    try:
        if isinstance(default, bool) or tname == "bool":
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
                return value.lower() in ("true", "yes", "1", "on")
            if isinstance(value, bool):
                return value
            raise ValueError
        if tname.startswith("tuple"):
            seq = value if isinstance(value, (list, tuple)) else yaml.safe_load(f"[{value}]")
            return tuple(float(v) for v in seq)
        if tname.startswith("list"):
            seq = value if isinstance(value, (list, tuple)) else yaml.safe_load(f"[{value}]")
            return [int(v) for v in seq]
        if tname.startswith("dict"):
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
        if "int" in tname and "float" not in tname:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        if "float" in tname:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if "str" in tname:
            if isinstance(value, bool):  # YAML reads off/on/no/yes as booleans: `--set train.amp=off`
                return "on" if value else "off"
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key {key!r} expects {tname.replace(' ', '')}, got {value!r}") from None
    return value


def _apply(obj: Any, updates: dict, prefix: str = "") -> None:
    known = {f.name: f for f in fields(obj)}
    for k, v in updates.items():
        key = f"{prefix}{k}"
        if k not in known:
            hint = ", ".join(sorted(known))
            raise ConfigError(f"unknown config key {key!r} (known under {prefix.rstrip('.') or 'top level'}: {hint})")
        cur = getattr(obj, k)
        if is_dataclass(cur):
            if not isinstance(v, dict):
                raise ConfigError(f"config key {key!r} is a section; give keys under it, e.g. {key}.<name>=value")
            _apply(cur, v, key + ".")
            continue
        v = _coerce(key, v, cur, known[k].type)
        if isinstance(cur, dict):  # model.kwargs: a later layer adds to (or replaces) keys, it does not drop others
            v = {**cur, **v}
        if key == "task":  # checkpoints before the task plug-ins say "classification"
            v = TASK_ALIASES.get(v, v)
        if key in CHOICES and v not in CHOICES[key]:
            raise ConfigError(f"config key {key!r} must be one of {', '.join(CHOICES[key])}; got {v!r}")
        setattr(obj, k, v)


def nest(flat: dict[str, Any]) -> dict:
    """{'optim.lr': 0.1} -> {'optim': {'lr': 0.1}}."""
    out: dict = {}
    for key, v in flat.items():
        parts = key.split(".")
        d = out
        for p in parts[:-1]:
            d = d.setdefault(p, {})
            if not isinstance(d, dict):
                raise ConfigError(f"config key {key!r} conflicts with another value")
        d[parts[-1]] = v
    return out


def parse_set(items: list[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings (values read as YAML scalars: 0.1, true, [1, 2])."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v) if v.strip() else None
        except yaml.YAMLError:
            out[k.strip()] = v
    return out


def list_recipes() -> dict[str, str]:
    """Recipe name -> first comment line (its one-line description)."""
    out = {}
    for p in sorted(RECIPE_DIR.glob("*.yaml")):
        first = next((ln[1:].strip() for ln in p.read_text().splitlines() if ln.startswith("#")), "")
        out[p.stem] = first
    return out


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections (data:, model:, ...)")
    return data


def recipe_path(name: str) -> Path:
    p = RECIPE_DIR / f"{name}.yaml"
    if not p.is_file():
        raise ConfigError(f"unknown recipe {name!r}; available: {', '.join(list_recipes())}")
    return p


def resolve_config(recipe: str | None = None, config_file: str | None = None,
                   overrides: dict[str, Any] | None = None, base: dict | None = None) -> Config:
    """Build a Config: defaults, then a recipe, then a YAML file, then dotted overrides (CLI flags, --set).

    ``base`` (a resolved config dict, e.g. from a checkpoint) replaces the defaults when given.
    """
    cfg = Config()
    if base:  # a checkpoint's config: keys retired since it was written are dropped
        base = {sec: ({k: v for k, v in val.items() if f"{sec}.{k}" not in RETIRED_KEYS} if isinstance(val, dict)
                      else val) for sec, val in base.items()}
        _apply(cfg, base)
    fp32_cpu: dict = {}
    if recipe:
        data = load_yaml(recipe_path(recipe))
        fp32_cpu = data.pop(FP32_CPU_SECTION, None) or {}
        _apply(cfg, data)
        cfg.recipe = recipe
    user = load_yaml(config_file) if config_file else {}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    for layer in (user, nest(given)):
        model = layer.get("model")
        name = model.get("name") if isinstance(model, dict) else None
        if name is not None and name != cfg.model.name:  # another model: the earlier model's kwargs are not its own
            cfg.model.kwargs = {}
        if layer:
            _apply(cfg, layer)
    if fp32_cpu:
        _apply_fp32_cpu(cfg, recipe, fp32_cpu, set(flatten(user)) | set(given))
    validate(cfg)
    return cfg


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 0.1}} -> {'optim.lr': 0.1} (the inverse of :func:`nest`)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _apply_fp32_cpu(cfg: Config, recipe: str, section: dict, user_keys: set[str]) -> None:
    """A recipe's ``cpu_without_bf16:`` section: dotted keys used instead of the recipe's own when the run trains on a
    CPU without native bf16 (AVX2-only CPUs such as AMD Zen 3, where ``amp: auto`` means fp32 and a step costs ~3x
    what it costs with bf16), unless the user set the same key. A time budget then buys a model whose epochs fit."""
    from .core.runtime import cpu_has_bf16, resolve_device  # runtime imports this module
    if resolve_device(cfg.train.device).type != "cpu" or cpu_has_bf16():
        return
    if not isinstance(section, dict):
        raise ConfigError(f"recipe {recipe}: {FP32_CPU_SECTION} must hold dotted keys, e.g. model.kwargs.width: 24")
    # the user's own keys win; a model of the user's choosing takes none of the recipe's model.* keys
    keys = {k: v for k, v in section.items()
            if k not in user_keys and not (k.startswith("model.") and "model.name" in user_keys)}
    if not keys:
        return
    _apply(cfg, nest(keys))
    if not cfg.train.quiet:
        print(f"recipe {recipe}: this CPU has no native bf16 (fp32 is the fast path), so the recipe uses "
              + ", ".join(f"{k}={v}" for k, v in keys.items()), file=sys.stderr)


def validate(cfg: Config) -> None:
    checks = [
        (0 <= cfg.data.val_split < 1, "data.val_split must be in [0, 1)"),
        (cfg.data.batch_size > 0, "data.batch_size must be positive"),
        (cfg.train.epochs > 0, "train.epochs must be positive"),
        (cfg.train.grad_accum >= 1, "train.grad_accum must be >= 1"),
        (cfg.optim.lr > 0, "optim.lr must be positive"),
        (0 <= cfg.train.label_smoothing < 1, "train.label_smoothing must be in [0, 1)"),
        (0 < cfg.train.ema_decay < 1, "train.ema_decay must be in (0, 1)"),
        (cfg.train.save_every >= 0, "train.save_every must be >= 0"),
        (cfg.train.budget_min >= 0, "train.budget_min must be >= 0 (minutes; 0: off)"),
        (cfg.segment.aux_weight >= 0, "segment.aux_weight must be >= 0"),
        (cfg.segment.tile >= 0, "segment.tile must be >= 0 (pixels; 0: resize whole images)"),
        (0 <= cfg.detect.eval_conf < 1 and 0 < cfg.detect.nms_iou <= 1 and cfg.detect.max_det >= 1,
         "detect.eval_conf must be in [0, 1), detect.nms_iou in (0, 1], detect.max_det >= 1"),
        (cfg.dist.timeout > 0, "dist.timeout must be positive (seconds)"),
        (cfg.data.crop_pct is None or 0 < cfg.data.crop_pct <= 1, "data.crop_pct must be in (0, 1]"),
        (0 < cfg.finetune.train_fraction <= 1, "finetune.train_fraction must be in (0, 1]"),
        (cfg.finetune.unfreeze_every >= 1, "finetune.unfreeze_every must be >= 1"),
        (cfg.finetune.probe_copies >= 0 and cfg.finetune.probe_epochs >= 1 and cfg.finetune.probe_batch_size >= 1,
         "finetune.probe_copies must be >= 0, finetune.probe_epochs and finetune.probe_batch_size >= 1"),
        (cfg.finetune.layer_decay is None or 0 < cfg.finetune.layer_decay <= 1, "finetune.layer_decay must be in (0, 1]"),
        (all(0 < m <= 1 for m in cfg.finetune.lr_mult) and len(cfg.finetune.lr_mult) == 2,
         "finetune.lr_mult must be two multipliers in (0, 1] (early half, late half of the body)"),
        (len(cfg.finetune.stage_epochs) == 2 and sum(cfg.finetune.stage_epochs) < 1 and min(cfg.finetune.stage_epochs) >= 0,
         "finetune.stage_epochs must be two fractions >= 0 that sum to less than 1"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
