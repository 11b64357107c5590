"""Learning-rate finder: Leslie Smith's LR range test, as in fastai's ``learn.lr_find()``.

A short mock training run raises the learning rate exponentially from ``start_lr`` to ``end_lr``, one batch per
step, and records the training loss. The loss first falls (the lr starts to be useful), then rises and diverges (too
large). The suggested lr sits on the falling part. Model, optimizer, gradients and the global RNGs are restored
afterwards, so the sweep can run right before training without changing it.

Example::

    res = lr_find(model, task, train_loader, optimizer)
    print(res.suggestion, res.suggestions)   # valley (default), steep, min/10
    plot_lr_find(res, "lr_find.png")
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.runtime import autocast_for
from ..data.collate import to_device
from .checkpoint import rng_state, set_rng_state

BETA = 0.98  # loss smoothing, as in fastai
MIN_STEPS = 3  # no divergence stop on the smoothed loss before this many steps
SKIP_END = 5  # suggestions ignore the last points (the blow-up) ...
# ... and the first num_steps // 10 (noise at tiny lrs), like fastai


@dataclass
class LRFindResult:
    """What the sweep saw, and the lrs it suggests (all finite, within [start_lr, end_lr])."""
    lrs: list[float]  # lr of the largest param group at each step
    losses: list[float]  # raw training loss of each step
    smoothed: list[float]  # exponentially smoothed (beta=0.98), bias-corrected
    suggestion: float  # suggestions["valley"]
    suggestions: dict[str, float]  # "valley", "steep", "min/10"
    stopped_early: bool  # the loss diverged (or became NaN/inf) before end_lr

    def to_dict(self) -> dict:
        return asdict(self)


def lr_find(model: nn.Module, task, loader, optimizer: torch.optim.Optimizer, *, start_lr: float = 1e-7,
            end_lr: float = 10.0, num_steps: int = 100, diverge: float = 4.0, amp_dtype: torch.dtype | None = None,
            device: torch.device | str | None = None) -> LRFindResult:
    """Run the LR range test: step ``i`` trains one batch at ``start_lr * (end_lr / start_lr) ** (i / (num_steps-1))``.

    Param groups with different lrs keep their ratios (the largest group follows the sweep and is the lr reported).
    Batches come from ``loader.epoch(0)``, ``loader.epoch(1)``, ... until ``num_steps`` steps are done. The sweep
    stops early when the smoothed loss exceeds ``diverge`` times its best value (from step 3 on; ``diverge=math.inf``:
    never), or the loss is NaN/inf (that step is not recorded). Afterwards the model's and optimizer's state, the
    gradients, the model's train/eval mode and the global RNG states (torch, CUDA, ``random``, numpy) are as they were.
    ``device`` (default: the model's) picks the autocast device type; batches are moved to it.

    Raises ValueError for bad arguments or an empty loader, RuntimeError when the very first loss is not finite.
    """
    if not 0 < start_lr < end_lr:
        raise ValueError(f"need 0 < start_lr < end_lr, got start_lr={start_lr}, end_lr={end_lr}")
    if num_steps < 2:
        raise ValueError(f"num_steps must be at least 2, got {num_steps}")
    if diverge <= 1:
        raise ValueError(f"diverge must be > 1, got {diverge}")
    if len(loader) == 0:
        raise ValueError("the loader yields no batches")
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)

    # everything the sweep changes, to put back afterwards
    was_training = model.training
    model_state = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(optimizer.state_dict())
    # the model's parameters and the optimizer's (a frozen layer still gets .grad from backward)
    params = list({id(p): p for p in [*model.parameters(), *(q for g in optimizer.param_groups for q in g["params"])]}
                  .values())
    grads = [p.grad.detach().clone() if p.grad is not None else None for p in params]
    rng = rng_state()

    base = [float(g["lr"]) for g in optimizer.param_groups]
    top = max(base)
    scales = [b / top if top > 0 else 1.0 for b in base]  # discriminative lrs keep their ratios

    autocast = autocast_for(device, amp_dtype)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 and device.type == "cuda" else None

    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    stopped_early = False
    try:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        avg, best, step, epoch = 0.0, math.inf, 0, 0
        while step < num_steps and not stopped_early:
            seen = 0
            batches = loader.epoch(epoch)
            for batch in batches:
                seen += 1
                lr = start_lr * (end_lr / start_lr) ** (step / (num_steps - 1))
                for g, s in zip(optimizer.param_groups, scales):
                    g["lr"] = lr * s
                batch = to_device(batch, device)
                with autocast():
                    out = task.training_step(model, batch)
                loss = out["loss"]
                (scaler.scale(loss) if scaler else loss).backward()
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                value = float(loss.detach())
                step += 1
                if not math.isfinite(value):  # the weights are ruined: nothing more to learn from this sweep
                    stopped_early = True
                    break
                avg = BETA * avg + (1 - BETA) * value
                smooth = avg / (1 - BETA ** step)
                lrs.append(lr)
                losses.append(value)
                smoothed.append(smooth)
                best = min(best, smooth)
                if step >= MIN_STEPS and smooth > diverge * best:
                    stopped_early = True
                    break
                if step >= num_steps:
                    break
            if hasattr(batches, "close"):  # a generator left mid-epoch: let the loader clean up now
                batches.close()
            if seen == 0:
                raise ValueError(f"loader.epoch({epoch}) yielded no batches")
            epoch += 1
    finally:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(opt_state)
        for p, g in zip(params, grads):
            p.grad = g
        model.train(was_training)
        set_rng_state(rng)

    if not lrs:
        raise RuntimeError(f"lr_find: the loss was not finite at the first step (lr={start_lr:g}); "
                           "check the model and data before choosing a learning rate")
    suggestions = suggest(lrs, smoothed, num_steps=num_steps, start_lr=start_lr, end_lr=end_lr)
    return LRFindResult(lrs=lrs, losses=losses, smoothed=smoothed, suggestion=suggestions["valley"],
                        suggestions=suggestions, stopped_early=stopped_early)


def valley_index(losses: list[float] | np.ndarray) -> int:
    """fastai's ``valley``: the longest decreasing subsequence of ``losses`` (O(n^2) dp) marks the longest valley;
    the suggestion is the point halfway along it (fastai's ``start + int(len/3) + int(len/6)``)."""
    n = len(losses)
    lds = [1] * n  # lds[i]: longest strictly decreasing subsequence ending at i
    max_start = max_end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    return min(max(max_start + int(sections) + int(sections / 2), 0), n - 1)


def suggest(lrs: list[float], smoothed: list[float], *, num_steps: int, start_lr: float,
            end_lr: float) -> dict[str, float]:
    """The three suggestions from the smoothed loss, without the first ``num_steps // 10`` and last 5 points."""
    lr_arr, loss_arr = np.asarray(lrs, dtype=np.float64), np.asarray(smoothed, dtype=np.float64)
    lo, hi = num_steps // 10, len(lr_arr) - SKIP_END
    if hi - lo < 3:  # too short a sweep to trim: use all of it
        lo, hi = 0, len(lr_arr)
    lr_arr, loss_arr = lr_arr[lo:hi], loss_arr[lo:hi]

    valley = lr_arr[valley_index(loss_arr)]
    if len(lr_arr) > 1:
        grads = np.diff(loss_arr) / np.diff(np.log(lr_arr))  # slope of loss vs log lr
        steep = lr_arr[int(np.argmin(grads))]
    else:
        steep = lr_arr[0]
    min_10 = lr_arr[int(np.argmin(loss_arr))] / 10

    def clamp(v: float) -> float:
        return float(min(max(v, start_lr), end_lr))

    return {"valley": clamp(valley), "steep": clamp(steep), "min/10": clamp(min_10)}


def plot_lr_find(result: LRFindResult, path: str | Path) -> Path:
    """Write a PNG of loss vs lr (log x axis): raw and smoothed loss, a marker + label at each suggestion."""
    from matplotlib.figure import Figure  # object API: renders with Agg, never touches pyplot or a display

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lrs, losses, smoothed = (np.asarray(v, dtype=np.float64) for v in (result.lrs, result.losses, result.smoothed))
    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot()
    ax.plot(lrs, losses, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
    ax.plot(lrs, smoothed, color="tab:blue", linewidth=2, label="smoothed loss")
    log_lrs = np.log(lrs)
    styles = {"valley": ("tab:red", "o"), "steep": ("tab:green", "^"), "min/10": ("tab:purple", "s")}
    for name, lr in result.suggestions.items():
        color, marker = styles.get(name, ("tab:gray", "x"))
        y = float(np.interp(math.log(lr), log_lrs, smoothed))
        ax.plot([lr], [y], marker=marker, color=color, markersize=10 if name == "valley" else 7, linestyle="none",
                label=f"{name}: {lr:.2e}")
    ax.annotate(f"suggested lr {result.suggestion:.2e}", (result.suggestion,
                float(np.interp(math.log(result.suggestion), log_lrs, smoothed))),
                xytext=(10, 15), textcoords="offset points", color="tab:red")
    # a diverged tail would squash the interesting part: cap the y axis a little above the starting loss
    finite = losses[np.isfinite(losses)]
    low, high = float(finite.min()), float(finite.max())
    cap = max(float(smoothed[0]), low) * 1.5
    if high > cap > low:
        ax.set_ylim(low - 0.05 * (cap - low), cap)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title("LR range test" + (" (stopped early: diverged)" if result.stopped_early else ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
