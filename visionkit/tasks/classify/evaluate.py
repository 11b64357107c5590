"""Scoring checkpoints: one model or an ensemble of several, with or without test-time augmentation (TTA).

Every member keeps its own preprocessing (size, mean/std, crop) and autocast; members must share one class list.
A pass over the data gives each member's probabilities for every TTA view, so the plain score, the TTA score and
every ensemble come from one forward pass per view.

Example::

    from visionkit.tasks.classify.evaluate import evaluate_checkpoints
    res = evaluate_checkpoints(["a/best.pt", "b/best.pt"], "fashion-mnist", split="test", ensemble="mean",
                               tta="flip")
    res["acc1"], [m["acc1"] for m in res["members"]]
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from ...config import Config, ConfigError, resolve_config
from ...core.runtime import resolve_device, run_autocast
from ...engine.checkpoint import load_checkpoint
from .data import build_bundle, loader_for
from .metrics import ClassificationMetrics
from .models import model_from_checkpoint

ENSEMBLES = ("mean", "vote", "weighted")
TTA_MODES = ("none", "flip", "flip+crops")
CROP_SHIFT = 0.0625  # flip+crops: corner crops shifted by this fraction of the side (16 px at 256, as TenCrop)


@dataclass
class Member:
    """One checkpoint ready to score: its model, classes, preprocessing and the run's autocast."""

    path: str
    classes: list[str]
    preprocess: dict
    config: Config
    model: nn.Module
    autocast: Callable
    device: torch.device


def load_member(checkpoint: str | Path, device: str | torch.device = "auto") -> Member:
    """Load a checkpoint in eval mode on ``device``; a run directory means its ``best.pt`` (else ``last.pt``)."""
    if Path(checkpoint).is_dir() and (Path(checkpoint) / "best.pt").is_file():
        checkpoint = Path(checkpoint) / "best.pt"
    ckpt = load_checkpoint(checkpoint)
    cfg = resolve_config(base=ckpt["config"])
    if cfg.task != "classify":  # explain, features and the classification report reach here for any checkpoint
        raise ConfigError(f"{ckpt['path']} is a {cfg.task} model; this command is for classification models")
    dev = resolve_device(device) if isinstance(device, str) else device
    return Member(str(ckpt["path"]), list(ckpt["classes"]), ckpt["preprocess"], cfg,
                  model_from_checkpoint(ckpt, dev), run_autocast(cfg.train.amp, dev), dev)


def load_members(checkpoints: Sequence[str | Path], device: str = "auto") -> list[Member]:
    """Load several checkpoints; refuse a set whose class lists differ (their outputs cannot be combined)."""
    if not checkpoints:
        raise ConfigError("no checkpoint given")
    members = [load_member(c, device) for c in checkpoints]
    first = members[0]
    for m in members[1:]:
        if m.classes != first.classes:
            raise ConfigError(f"cannot ensemble {first.path} and {m.path}: their classes differ "
                              f"({_describe(first.classes)} vs {_describe(m.classes)})")
    return members


def _describe(classes: list[str]) -> str:
    shown = ", ".join(classes[:4]) + (", ..." if len(classes) > 4 else "")
    return f"{len(classes)} classes: {shown}"


# ------------------------------------------------------------------------------------------------ TTA
def tta_views(x: Tensor, mode: str) -> list[Tensor]:
    """The batch as the model sees it under ``mode``, the unchanged batch first.

    flip: + the mirror image (2 views). flip+crops: the ten-crop of classic ImageNet evaluation at the same scale as
    the plain view: the image shifted by 1/16 of its side towards each corner (torchvision's ``five_crop`` of the
    edge-padded batch; its centre crop is the image itself), each also mirrored: 10 views. Zooming in instead
    (crops resized back up) cost Fashion-MNIST models 5 points: they never saw that scale in training.
    """
    if mode not in TTA_MODES:
        raise ConfigError(f"unknown --tta {mode!r}; choose from {', '.join(TTA_MODES)}")
    views = [x]
    if mode == "none":
        return views
    views.append(TF.horizontal_flip(x))
    if mode == "flip+crops":
        h, w = x.shape[-2:]
        s = max(1, round(min(h, w) * CROP_SHIFT))
        padded = F.pad(x, (s, s, s, s), mode="replicate")
        for c in TF.five_crop(padded, [h, w])[:4]:  # the four corners; the centre crop is x
            views += [c, TF.horizontal_flip(c)]
    return views


@torch.no_grad()
def member_probs(member: Member, ds, tta: str = "none", batch_size: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(plain probabilities [N, K], TTA probabilities [N, K], targets [N]) of ``member`` on dataset ``ds``.

    Without TTA both probability tensors are the same. Probabilities are float32 on the CPU.
    """
    cfg = member.config
    if batch_size:  # a copy: the member's own config stays as its run wrote it
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_batch_size=batch_size))
    loader = loader_for(ds, cfg, member.preprocess, member.device, False)
    plain, mean, targets = [], [], []
    try:
        for x, y in loader.epoch(0):
            probs = []
            for v in tta_views(x, tta):
                with member.autocast():
                    probs.append(member.model(v).float().softmax(1))
            plain.append(probs[0].cpu())
            mean.append(torch.stack(probs).mean(0).cpu())
            targets.append(y.cpu())
    finally:
        loader.close()
    return torch.cat(plain), torch.cat(mean), torch.cat(targets).long()


# ------------------------------------------------------------------------------------------------ ensembles
def combine(probs: Tensor, method: str = "mean", weights: Tensor | None = None) -> Tensor:
    """Combine members' probabilities ``[M, N, K]`` into ``[N, K]`` scores.

    mean: the average probability. weighted: the ``weights``-weighted average. vote: the fraction of members voting
    for each class, ties broken by the mean probability (the result ranks classes; it is not a calibrated
    probability).

    Example::

        combine(torch.tensor([[[0.6, 0.4]], [[0.2, 0.8]]]), "mean")  # tensor([[0.4, 0.6]])
    """
    if method == "mean":
        return probs.mean(0)
    if method == "weighted":
        if weights is None:
            raise ValueError("weighted ensembles need weights (fit_weights)")
        return torch.einsum("m,mnk->nk", weights.to(probs), probs)
    if method == "vote":
        m, _, k = probs.shape
        votes = F.one_hot(probs.argmax(2), k).sum(0).float() / m
        return votes + probs.mean(0) / (2 * m)  # a tie-break smaller than one vote
    raise ConfigError(f"unknown --ensemble {method!r}; choose from {', '.join(ENSEMBLES)}")


def fit_weights(probs: Tensor, targets: Tensor, steps: int = 100) -> Tensor:
    """Member weights on the simplex minimising the log loss of the weighted average on held-out data.

    Example::

        w = fit_weights(val_probs, val_targets)   # [M], non-negative, sums to 1
    """
    logits = torch.zeros(probs.shape[0], dtype=torch.float64, requires_grad=True)
    p = probs.double()
    opt = torch.optim.LBFGS([logits], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        mix = torch.einsum("m,mnk->nk", logits.softmax(0), p)
        loss = -mix.gather(1, targets[:, None]).clamp_min(1e-12).log().mean()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    return logits.detach().softmax(0).float()


def cross_fit(probs: Tensor, targets: Tensor, seed: int = 0) -> Tensor:
    """Weighted-ensemble scores on data that is also the fitting data, without scoring a sample with weights fitted
    on it: two halves, each combined with the weights fitted on the other."""
    n = probs.shape[1]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    halves = perm[: n // 2], perm[n // 2:]
    out = torch.empty(probs.shape[1:])
    for a, b in (halves, halves[::-1]):
        out[b] = combine(probs[:, b], "weighted", fit_weights(probs[:, a], targets[a]))
    return out


# ------------------------------------------------------------------------------------------------ metrics
def score(scores: Tensor, targets: Tensor, full: bool = False, probabilities: bool = True) -> dict:
    """acc1, acc5, loss (log loss) and ece (expected calibration error, 15 bins) of ``[N, K]`` scores, through the
    same :class:`ClassificationMetrics` the training loop validates with (log-probabilities are its logits: their
    cross-entropy is the log loss).

    ``probabilities=False`` (votes) leaves loss and ece out: they need calibrated probabilities.
    """
    from torchmetrics.functional.classification import multiclass_calibration_error
    k = scores.shape[1]
    m = ClassificationMetrics(k)
    m.update(scores.clamp_min(1e-12).log() if probabilities else scores, targets)
    out = m.compute(full)
    if probabilities:
        out["ece"] = multiclass_calibration_error(scores, targets, num_classes=k, n_bins=15, norm="l1").item()
    else:
        del out["loss"]
    return out


def dataset_split(cfg: Config, data: str | None, split: str):
    if data is not None:
        cfg = resolve_config(base=cfg.to_dict(), overrides={"data.source": data})
    bundle = build_bundle(cfg)
    ds = getattr(bundle, split, None)
    if ds is None or not len(ds):
        have = [s for s, d in bundle.splits().items() if len(d)]
        raise ConfigError(f"{cfg.data.source} has no {split!r} split; it has: {', '.join(have)}")
    return bundle, ds


def _split_key(m: Member) -> tuple:
    d = m.config.data
    return d.split_seed if d.split_seed is not None else m.config.train.seed, d.val_split


def evaluate_checkpoints(checkpoints: Sequence[str | Path], data: str | None = None, split: str = "val",
                         ensemble: str = "mean", tta: str = "none", device: str = "auto",
                         batch_size: int | None = None) -> dict:
    """Score one checkpoint or an ensemble on a split of ``data`` (rebuilt as the first member's run split it).

    Returns the final predictions' loss/acc1/acc5/ece/n, confusion matrix and per-class report at the top level,
    and side by side: ``members`` (each plain, and with TTA), ``ensemble`` (plain and with TTA) and ``tta_gain``.
    """
    if ensemble not in ENSEMBLES:
        raise ConfigError(f"unknown --ensemble {ensemble!r}; choose from {', '.join(ENSEMBLES)}")
    if tta not in TTA_MODES:
        raise ConfigError(f"unknown --tta {tta!r}; choose from {', '.join(TTA_MODES)}")
    members = load_members(checkpoints, device)
    bundle, ds = dataset_split(members[0].config, data, split)
    if list(bundle.classes) != members[0].classes:
        raise ConfigError(f"the data's classes ({_describe(list(bundle.classes))}) differ from the checkpoint's "
                          f"({_describe(members[0].classes)})")
    if split in ("train", "val") and len({_split_key(m) for m in members}) > 1:
        print(f"note: the members held out different {split} images (split seeds/fractions "
              f"{sorted({_split_key(m) for m in members})}); this split was rebuilt as {members[0].path}'s run made it, "
              "so other members may have trained on some of it. Use --split test, or train with the same "
              "--set data.split_seed=N", file=sys.stderr)

    plain, with_tta, targets = [], [], None
    for m in members:
        p, t, y = member_probs(m, ds, tta, batch_size)
        plain.append(p)
        with_tta.append(t)
        targets = y
    plain_t, tta_t = torch.stack(plain), torch.stack(with_tta)

    rows = []
    for m, p, t in zip(members, plain_t, tta_t):
        row = {"checkpoint": m.path, **score(p, targets)}
        if tta != "none":
            row["tta"] = score(t, targets)
        rows.append(row)
    out: dict = {"split": split, "classes": members[0].classes, "tta_mode": tta, "members": rows}

    final = tta_t[0]
    if len(members) > 1:
        weights, how, fold = None, None, False
        if ensemble == "weighted":
            weights, how, fold = _weights(members, data, split, tta, batch_size, tta_t, targets)
        ens: dict = {"method": ensemble}
        for key, probs in (("plain", plain_t), ("tta", tta_t)):
            if key == "tta" and tta == "none":
                continue
            if fold:  # weights fitted on this very split: each half scored with the other half's weights
                scores = cross_fit(probs, targets)
            else:
                scores = combine(probs, ensemble, weights)
            ens[key] = score(scores, targets, probabilities=ensemble != "vote")
            final = scores
        if weights is not None:
            ens.update(weights=[round(w, 4) for w in weights.tolist()], weights_fitted_on=how)
        out["ensemble"] = ens
    res = score(final, targets, full=True, probabilities=not (len(members) > 1 and ensemble == "vote"))
    out.update(res)
    if tta != "none":
        base = out["ensemble"]["plain"]["acc1"] if len(members) > 1 else rows[0]["acc1"]
        out["tta_gain"] = res["acc1"] - base
    out["checkpoint"] = members[0].path if len(members) == 1 else [m.path for m in members]
    return out


def _weights(members, data, split, tta, batch_size, eval_probs, eval_targets) -> tuple[Tensor, str, bool]:
    """Weights fitted on the validation split (TTA probabilities when TTA is on)."""
    if split == "val":
        return fit_weights(eval_probs, eval_targets), "val (scored out of fold)", True
    try:
        _, val = dataset_split(members[0].config, data, "val")
    except ConfigError:
        return fit_weights(eval_probs, eval_targets), f"{split} (no val split; scores out of fold)", True
    probs, ys = [], None
    for m in members:
        _, t, ys = member_probs(m, val, tta, batch_size)
        probs.append(t)
    return fit_weights(torch.stack(probs), ys), "val", False
