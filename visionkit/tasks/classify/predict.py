"""Classification predictions: a checkpoint (or an ensemble of several) as a ``Predictor`` over image files.

Example::

    p = Predictor("runs/x/best.pt")
    p.predict(["cat.jpg"], topk=3)
"""
from __future__ import annotations

import os

import torch

from ...config import ConfigError
from ...data import DataError, load_rgb
from ...transforms import build_eval_transform
from .evaluate import (
    ENSEMBLES,
    TTA_MODES,
    combine,
    dataset_split,
    fit_weights,
    load_members,
    member_probs,
    tta_views,
)


class Predictor:
    """A trained model (or an ensemble of several) with its own class names and eval preprocessing.

    Example::

        p = Predictor("runs/x/best.pt")
        p.predict(["cat.jpg"], topk=3)   # [{"path": "cat.jpg", "topk": [{"label": "cat", "prob": 0.97}, ...]}]
        Predictor(["runs/x/best.pt", "runs/y/best.pt"], ensemble="mean", tta="flip").predict(["cat.jpg"])
    """

    def __init__(self, checkpoint: str | list[str], device: str = "auto", ensemble: str = "mean",
                 tta: str = "none"):
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
        try:
            _, val = dataset_split(self.members[0].config, None, "val")
        except (ConfigError, OSError) as e:
            raise ConfigError(f"--ensemble weighted fits its weights on the runs' validation split, which cannot be "
                              f"rebuilt here ({e}); use --ensemble mean or vote") from None
        runs = [member_probs(m, val, self.tta) for m in self.members]
        return fit_weights(torch.stack([r[1] for r in runs]), runs[0][2])

    @torch.no_grad()
    def probabilities(self, paths: list[str], batch_size: int = 64) -> torch.Tensor:
        """Class scores ``[N, K]``: each member's softmax (averaged over the TTA views), combined by the ensemble."""
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
