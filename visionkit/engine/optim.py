"""Optimizer and learning-rate schedule factories (pure functions of the config).

The optimizer comes from timm's ``create_optimizer_v2``, which already keeps norm layers and biases out of weight
decay (``filter_bias_and_bn``). Schedules are torch's own classes, all stepped once per optimizer step (epoch-based
ones are converted to steps) except reduce-on-plateau, which by nature steps once per epoch on a metric.
"""
from __future__ import annotations

import math
import warnings

import torch
from timm.optim import create_optimizer_v2
from torch.optim import lr_scheduler as S

from ..config import OptimConfig, SchedConfig


def build_optimizer(model_or_groups, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Optimizer over ``model_or_groups`` (a module, or param-group dicts with their own ``lr``).

    Example::

        opt = build_optimizer(torch.nn.Linear(2, 2), OptimConfig(name="sgd", lr=0.1))
    """
    if cfg.name == "sgd":
        # timm: "sgd" is Nesterov momentum SGD, "momentum" is classic momentum SGD
        opt, kw = ("sgd" if cfg.nesterov else "momentum"), {"momentum": cfg.momentum}
    else:
        opt, kw = cfg.name, {"betas": tuple(cfg.betas)}
    return create_optimizer_v2(model_or_groups, opt=opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               filter_bias_and_bn=not cfg.decay_norm_and_bias, **kw)


def build_scheduler(opt: torch.optim.Optimizer, cfg: SchedConfig, epochs: int, steps_per_epoch: int, lr: float,
                    monitor_mode: str = "max"):
    """LR schedule for ``epochs`` x ``steps_per_epoch`` optimizer steps. Returns (scheduler, per_step: bool).
    ``monitor_mode``: whether the run's monitored metric, on which reduce-on-plateau steps, is maximised."""
    total = max(1, epochs * steps_per_epoch)
    warm = min(round(cfg.warmup_epochs * steps_per_epoch), total - 1)
    spe = max(1, steps_per_epoch)
    if cfg.name == "plateau":
        return S.ReduceLROnPlateau(opt, mode=monitor_mode, factor=cfg.gamma, patience=cfg.patience), False
    if cfg.name == "onecycle":  # its own warmup (pct_start) and annealing; also cycles momentum
        max_lrs = [g["lr"] for g in opt.param_groups]
        return S.OneCycleLR(opt, max_lr=max_lrs, total_steps=total, pct_start=cfg.pct_start), True
    if cfg.name == "cosine":  # relative to each group's own lr (CosineAnnealingLR's eta_min is one absolute value)
        span, floor = max(1, total - warm), cfg.min_lr
        main = S.LambdaLR(opt, lambda s: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(s, span) / span)))
    elif cfg.name == "linear":  # straight down to min_lr (airbench-style triangle with the warmup)
        main = S.LinearLR(opt, start_factor=1.0, end_factor=cfg.min_lr, total_iters=max(1, total - warm))
    elif cfg.name in ("step", "multistep"):
        # milestones in epochs from the start of training, shifted because the main schedule starts after warmup
        epochs_at = range(cfg.step_epochs, epochs + 1, cfg.step_epochs) if cfg.name == "step" else cfg.milestones
        main = S.MultiStepLR(opt, milestones=[max(1, m * spe - warm) for m in epochs_at], gamma=cfg.gamma)
    elif cfg.name == "cosine_restarts":
        main = S.CosineAnnealingWarmRestarts(opt, T_0=cfg.restart_epochs * spe, T_mult=cfg.restart_mult,
                                             eta_min=cfg.min_lr * min(g["lr"] for g in opt.param_groups))
    else:  # constant
        main = S.ConstantLR(opt, factor=1.0, total_iters=0)
    if warm <= 0:
        return main, True
    warmup = S.LinearLR(opt, start_factor=cfg.warmup_factor, end_factor=1.0, total_iters=warm)
    return S.SequentialLR(opt, [warmup, main], milestones=[warm]), True


def fast_forward(sched, steps: int, total: int) -> None:
    """Step a per-step schedule built for ``total`` steps to where a run stands after ``steps`` (a resumed run of
    another length, a time budget that re-laid the schedule); never past its last step."""
    with warnings.catch_warnings():  # stepping a scheduler without an optimizer step warns
        warnings.simplefilter("ignore")
        for _ in range(min(steps, total - 1)):
            sched.step()
