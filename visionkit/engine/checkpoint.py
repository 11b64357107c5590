"""Checkpoints: atomic writes, ``weights_only`` loading, and every piece of state an exact resume needs.

A checkpoint is a plain dict of tensors and Python primitives (no pickled classes), so it loads with
``torch.load(weights_only=True)``: a checkpoint file can never execute code.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.rundir import atomic_open

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, corrupt, or incompatible): one-line message."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save ``obj`` through the run directory's atomic writer, fsync'd: a crash (even SIGKILL) at any moment
    leaves either the old file or the new one, never half of one."""
    with atomic_open(path, fsync=True) as f:
        torch.save(obj, f)


def rng_state() -> dict:
    """Every RNG the training step may draw from (dropout, drop-path, MixUp/CutMix, ...)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),  # (int, tuple of ints, float | None): plain data, weights_only-safe
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | Path) -> dict:
    """Load a visionkit checkpoint safely (``weights_only=True``); a run directory means its ``last.pt``."""
    p = Path(path)
    if p.is_dir():
        p = p / "last.pt"
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- truncated, not a torch file, or a pickle weights_only refuses
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {p}: {first[:200]}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "format_version" not in ckpt:
        raise CheckpointError(f"{p} is not a visionkit checkpoint (no model/format_version entries)")
    ckpt["path"] = str(p)
    return ckpt
