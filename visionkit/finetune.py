"""Transfer learning: which layers train, at which learning rate, and when.

A model is split into ordered layer groups (:func:`visionkit.models.groups.layer_groups`: stem, stages, head).
A strategy says how many stages, counted from the top, train at each epoch; the rest are frozen, with their
BatchNorm layers kept in eval mode so their running statistics stay those of the pretraining data.

=============== =====================================================================================================
strategy        what trains
=============== =====================================================================================================
none            everything, at one lr (training from scratch)
linear-probe    the head only, on features computed once (optionally + augmented copies) and cached: seconds on CPU
full            everything, with discriminative lrs
partial         the top ``train_fraction`` of the stages and the head
staged          the head; then the last stage too; then everything (fractions ``stage_epochs`` of the epochs)
gradual         the head; then one more stage from the top every ``unfreeze_every`` epochs
auto            chosen from the data: see :func:`decide`
=============== =====================================================================================================

Discriminative lrs: for CNNs the head trains at ``optim.lr``, the late half of the body at ``lr_mult[1]`` times
that and the early half at ``lr_mult[0]`` times (the classic 1e-3 / 1e-4 / 1e-5); for transformers the lr decays
by ``layer_decay`` (0.75) per block from the head, as in BEiT/timm's layer-wise decay.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import FinetuneConfig
from .data.loaders import Loader
from .engine.events import Callback
from .models import ModelError, get_classifier

if TYPE_CHECKING:
    from .models.groups import LayerGroups

SMALL, LARGE = 2_000, 20_000  # training images: below SMALL is small, from LARGE on large
SHIFT_FAR = 1.0  # domain_shift above which the data counts as far from the pretraining data (see domain_shift)
SHIFT_IMAGES = 32  # training images domain_shift looks at (its scale was measured on 8; 64 cost ~3 s more on a CPU)


@dataclass
class Decision:
    """The strategy a run uses, and why: printed at the start and written to the run dir (finetune.json)."""
    strategy: str
    reason: str
    n_train: int = 0
    domain_shift: float | None = None
    settings: dict = field(default_factory=dict)  # finetune.* values the decision set

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ auto
@torch.no_grad()
def domain_shift(model: nn.Module, batches: list[torch.Tensor], autocast: Callable = contextlib.nullcontext
                 ) -> float | None:
    """How far ``batches`` sit from the data the model was pretrained on, read off its BatchNorm layers: the mean over
    layers and channels of |batch mean − running mean| / running std plus |log(batch var / running var)|.

    Measured on EfficientNet-Lite0 (ImageNet), 8 images each: ants/bees photos 0.45, other photos 0.50, microscopy/
    astronomy 0.89, Fashion-MNIST 1.52, digits 1.80, uniform noise 1.99. ``None`` for models without BatchNorm
    (ViT, ConvNeXt): then the decision rests on the data's size alone.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
           and m.running_mean is not None]
    if not bns or not batches:
        return None
    seen: dict[int, list[torch.Tensor]] = {id(m): [] for m in bns}

    def hook(m: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
        x = inp[0].float()
        dims = [d for d in range(x.ndim) if d != 1]
        mean, var = x.mean(dim=dims), x.var(dim=dims)
        shift = ((mean - m.running_mean) / (m.running_var + m.eps).sqrt()).abs().mean()
        spread = ((var + 1e-3) / (m.running_var + 1e-3)).log().abs().mean()
        seen[id(m)].append(shift + spread)

    handles = [m.register_forward_pre_hook(hook) for m in bns]
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            with autocast():
                model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    per_layer = [torch.stack(v).mean() for v in seen.values() if v]
    return round(float(torch.stack(per_layer).mean()), 4) if per_layer else None


def decide(n_train: int, shift: float | None) -> Decision:
    """The standard transfer-learning table (CS231n), from the training set's size and its distance from the
    pretraining domain:

    ======= ================ ===========================================================================
    size    domain           strategy
    ======= ================ ===========================================================================
    small   similar          linear-probe (a linear head on frozen features)
    small   different        partial, top third of the stages (early layers are generic, later specific)
    medium  either           partial, back half
    large   similar          full, discriminative lrs (pretrained layers need smaller steps)
    large   different        full, one lr for all
    ======= ================ ===========================================================================
    """
    size = "small" if n_train < SMALL else "large" if n_train >= LARGE else "medium"
    far = shift is not None and shift > SHIFT_FAR
    where = ("no BatchNorm statistics to compare, so taken as similar" if shift is None
             else f"BatchNorm statistics shift {shift:.2f} {'>' if far else '<='} {SHIFT_FAR}: "
                  f"{'far from' if far else 'close to'} the pretraining data")
    what = f"{n_train} training images ({size}; small < {SMALL:,}, large >= {LARGE:,}); {where}"
    if size == "small" and not far:
        return Decision("linear-probe", f"{what} → linear-probe: a linear head on frozen features", n_train, shift)
    if size == "small":
        return Decision("partial", f"{what} → partial: train the top third of the stages, keep the generic early "
                        "layers", n_train, shift, {"train_fraction": 1 / 3})
    if size == "medium":
        return Decision("partial", f"{what} → partial: fine-tune the back half", n_train, shift,
                        {"train_fraction": 0.5})
    if not far:
        return Decision("full", f"{what} → full fine-tune with smaller lrs for the pretrained layers", n_train, shift)
    return Decision("full", f"{what} → full fine-tune, one lr for all layers", n_train, shift,
                    {"lr_mult": (1.0, 1.0), "layer_decay": 1.0})


# ------------------------------------------------------------------------------------------------ lr per group
def layer_groups(model: nn.Module) -> LayerGroups:
    """Stem, stages and head of ``model`` (see :mod:`visionkit.models.groups`)."""
    from .models.groups import layer_groups as groups_of
    return groups_of(model)


def lr_multipliers(groups: LayerGroups, cfg: FinetuneConfig) -> list[tuple[str, list[str], float]]:
    """``(group name, parameter names, lr multiplier)`` from the input side to the head (multiplier 1)."""
    decay = cfg.layer_decay if cfg.layer_decay is not None else (0.75 if groups.transformer else None)
    out = []
    if decay is not None:  # layer-wise decay over blocks
        n = len(groups.blocks)
        out += [(f"block{i}", names, decay ** (n - i)) for i, names in enumerate(groups.blocks)]
    else:  # early half / late half of the stages
        n = len(groups.stages)
        half = n // 2
        out += [(groups.stage_names[i], names, cfg.lr_mult[0] if i < half else cfg.lr_mult[1])
                for i, names in enumerate(groups.stages)]
    if groups.head:
        out.append(("head", groups.head, 1.0))
    return out


def param_groups(model: nn.Module, groups: LayerGroups, cfg: FinetuneConfig, lr: float, weight_decay: float,
                 decay_norm_and_bias: bool = False, uniform: bool = False) -> list[dict]:
    """Optimizer param groups with their own ``lr`` (and no weight decay on norms and biases, as timm does)."""
    params = dict(model.named_parameters())
    out = []
    for name, names, mult in lr_multipliers(groups, cfg):
        mult = 1.0 if uniform else mult
        for nd in (False, True):
            ps = [params[n] for n in names if (params[n].ndim <= 1 or n.endswith(".bias")) == nd]
            if ps:
                out.append({"params": ps, "lr": lr * mult, "lr_mult": mult, "name": name,
                            "weight_decay": 0.0 if nd and not decay_norm_and_bias else weight_decay})
    return out


# ------------------------------------------------------------------------------------------------ freezing
def trainable_stages(strategy: str, epoch: int, epochs: int, n_stages: int, cfg: FinetuneConfig) -> int:
    """How many body stages (from the top) train in ``epoch`` (0-based); the head always trains."""
    if strategy in ("none", "full"):
        return n_stages
    if strategy == "linear-probe":
        return 0
    if strategy == "partial":
        return max(1, math.ceil(cfg.train_fraction * n_stages))
    if strategy == "staged":
        head_only = round(cfg.stage_epochs[0] * epochs)
        plus_last = head_only + round(cfg.stage_epochs[1] * epochs)
        return 0 if epoch < head_only else 1 if epoch < plus_last else n_stages
    if strategy == "gradual":
        return min(n_stages, epoch // cfg.unfreeze_every)
    raise ValueError(f"unknown strategy {strategy!r}")


def freeze(model: nn.Module, groups: LayerGroups, k: int) -> None:
    """Train the head and the top ``k`` stages; freeze the rest, with frozen BatchNorm layers in eval mode."""
    trainable = set(groups.head)
    for names in groups.stages[len(groups.stages) - k:] if k > 0 else []:
        trainable.update(names)
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


class Freezer(Callback):
    """Applies the strategy's freezing at the start of every epoch (after the loop's ``model.train()``), so a
    resumed run freezes exactly as the uninterrupted one did."""

    def __init__(self, strategy: str, groups: LayerGroups, cfg: FinetuneConfig, quiet: bool = False):
        self.strategy, self.groups, self.cfg, self.quiet = strategy, groups, cfg, quiet
        self.last: int | None = None

    def on_epoch_start(self, trainer) -> None:
        n = len(self.groups.stages)
        k = trainable_stages(self.strategy, trainer.state.epoch, trainer.epochs, n, self.cfg)
        freeze(trainer.model, self.groups, k)
        if k != self.last and not self.quiet:
            top = ", ".join(self.groups.stage_names[n - k:]) if k else ""
            what = "everything" if k == n else f"head + {top}" if k else "head only"
            print(f"finetune: epoch {trainer.state.epoch + 1}: training {what}", file=sys.stderr)
        self.last = k


def optimizer_for(model: nn.Module, strategy: str, cfg: FinetuneConfig, optim, quiet: bool = False
                  ) -> tuple[torch.optim.Optimizer, list[Callback]]:
    """The optimizer of a strategy that trains the model itself, and its callbacks: ``none`` one group at
    ``optim.lr``; full / partial / staged / gradual the layer groups' own lrs and a :class:`Freezer` that decides each
    epoch what trains. (A linear probe trains a head on cached features: see :func:`probe_loaders`.)"""
    from .engine.optim import build_optimizer
    if strategy == "none":
        return build_optimizer(model, optim), []
    groups = layer_groups(model)
    opt = build_optimizer(param_groups(model, groups, cfg, optim.lr, optim.weight_decay, optim.decay_norm_and_bias),
                          optim)
    return opt, [Freezer(strategy, groups, cfg, quiet)]


# ------------------------------------------------------------------------------------------------ linear probe
def probe_head(model: nn.Module, name: str) -> nn.Linear:
    """The Linear classifier a linear probe trains; a clear error for models without one."""
    try:
        head = get_classifier(model)
    except ModelError as e:
        raise ModelError(f"--finetune linear-probe needs a known classifier head: {e}") from None
    if not isinstance(head, nn.Linear):
        raise ModelError(f"--finetune linear-probe needs a Linear classifier head, but {name}'s is "
                         f"{type(head).__name__}; use --finetune partial or full")
    return head


@torch.no_grad()
def cache_features(model: nn.Module, head: nn.Linear, passes: list[Iterator], autocast: Callable
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's inputs (pooled features) for every batch of ``passes``, computed with the model in eval mode."""
    feats: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda m, inp: feats.append(inp[0].detach().float().flatten(1)))
    was_training = model.training
    model.eval()
    ys = []
    try:
        for batches in passes:
            for x, y in batches:
                with autocast():
                    model(x)
                ys.append(y)
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(feats), torch.cat(ys)


class FeatureLoader(Loader):
    """Batches of cached features with the engine's loader interface: ``len``, ``epoch(e, start)``, shuffled as a
    pure function of (seed, epoch) like the image loaders, and split over workers the same way."""

    ORDER_TAG = 0xFEA7

    def __init__(self, feats: torch.Tensor, targets: torch.Tensor, batch_size: int, train: bool, seed: int,
                 rank: int = 0, world: int = 1):
        super().__init__(len(feats), batch_size=batch_size, train=train, seed=seed, device=feats.device,
                         channels_last=False, drop_last=False, sampler_weights=None, rank=rank, world=world)
        self.feats, self.targets = feats, targets

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.order(epoch).to(self.feats.device)
        for b in range(start, len(self)):
            idx = order[self.part(b)]
            if len(idx):
                yield self.feats[idx], self.targets[idx]


class HeadOnly(nn.Module):
    """Runs just the model's head on cached features; its parameters are the model's own head's."""

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.head = head

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f.to(self.head.weight.dtype))


def probe_loaders(model: nn.Module, head: nn.Linear, train_aug, train_clean, val, cfg: FinetuneConfig,
                  batch_size: int, seed: int, autocast: Callable, quiet: bool = False, rank: int = 0, world: int = 1
                  ) -> tuple[FeatureLoader, FeatureLoader | None]:
    """Feature caches for a linear probe: the clean train set, ``probe_copies`` augmented passes, and val.

    With several workers every worker caches the whole set (the given loaders are unsplit) and the feature loaders
    split each global batch, as the image loaders do."""
    t0 = time.perf_counter()
    passes = [train_clean.epoch(0)] + [train_aug.epoch(e) for e in range(cfg.probe_copies)]
    f, y = cache_features(model, head, passes, autocast)
    train = FeatureLoader(f, y, batch_size, True, seed, rank, world)
    vl = None
    if val is not None:
        fv, yv = cache_features(model, head, [val.epoch(0)], autocast)
        vl = FeatureLoader(fv, yv, 4 * batch_size, False, seed, rank, world)
    if not quiet:
        n_val = vl.num_samples if vl else 0
        print(f"finetune: cached {f.shape[1]}-d features of {train_clean.num_samples} train images "
              f"(+{cfg.probe_copies} augmented copies) and {n_val} val images in {time.perf_counter() - t0:.1f}s",
              file=sys.stderr)
    return train, vl


__all__ = ["Decision", "FeatureLoader", "Freezer", "HeadOnly", "cache_features", "decide", "domain_shift", "freeze",
           "layer_groups", "lr_multipliers", "param_groups", "probe_head", "probe_loaders", "trainable_stages"]
