"""Folder, CSV and split helpers shared by the data readers (classification, segmentation, detection).

Example::

    find_sub(Path("data"), ("images", "imgs"))   # data/Images when it exists (names match case-insensitively)
    keep, held = random_split(10, 0.2, seed=0)   # 8 indices kept, 2 held out
"""
from __future__ import annotations

import csv
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS

from .errors import DataError

SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
IMAGE_EXTS = tuple(IMG_EXTENSIONS)
CSV_IMAGE_COLUMNS = ("image", "img", "path", "file", "filename")  # header names of a CSV file's image column


def note(msg: str) -> None:
    """Print one ``note:`` line about the data on stderr."""
    print(f"note: {msg}", file=sys.stderr)


def is_hidden(name: str) -> bool:
    """True for a file or folder name to pass over (``.git``, ``__MACOSX``...)."""
    return name.startswith((".", "__"))


def subdirs(folder: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``folder`` ([] when it cannot be listed)."""
    try:
        return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not is_hidden(e.name))
    except OSError:
        return []


def find_sub(folder: Path, names: Sequence[str]) -> Path | None:
    """The sub-folder of ``folder`` named by the first of ``names`` (lower case) that exists in any case, or None."""
    subs = {s.lower(): s for s in subdirs(folder)}
    return next((folder / subs[n] for n in names if n in subs), None)


def files_under(folder: Path, exts: tuple[str, ...] = IMAGE_EXTS) -> list[Path]:
    """Non-hidden files ending in ``exts`` below ``folder`` (links followed), in sorted walk order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        out += [Path(dirpath) / f for f in sorted(filenames) if not is_hidden(f) and f.lower().endswith(exts)]
    return out


def self_or_only_child(folder: Path, test: Callable[[Path], bool]) -> Path | None:
    """``folder`` when ``test(folder)``, else its only non-hidden sub-folder that passes, else None."""
    if test(folder):
        return folder
    kids = [folder / s for s in subdirs(folder) if test(folder / s)]
    return kids[0] if len(kids) == 1 else None


def voc_split_lists(sets: Path) -> dict[str, Path]:
    """{split: id list} of a VOC ``ImageSets/<task>`` folder; ``trainval.txt`` stands in for a missing train + val."""
    lists = {s: sets / f"{s}.txt" for s in ("train", "val", "test")}
    if not lists["train"].is_file() and (sets / "trainval.txt").is_file():  # train on all of it, seeded val split
        lists["train"] = sets / "trainval.txt"
        del lists["val"]
    return lists


def csv_header(path: Path) -> list[str] | None:
    """The lower-cased, stripped cells of a CSV file's first row; None when it is empty or cannot be read."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            first = next(csv.reader(f), None)
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    return [c.strip().lower() for c in first] if first else None


def read_csv_rows(path: Path, columns: str) -> list[list[str]]:
    """The non-empty rows of a UTF-8 CSV file, cells stripped; a DataError naming the ``columns`` expected if unread."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [[c.strip() for c in r] for r in csv.reader(f)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read CSV {path}: {e}; give a UTF-8 CSV with {columns} columns") from None
    return [r for r in rows if any(r)]


def random_split(n: int, frac: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded hold-out of round(n * frac) indices (at least 1 when frac > 0 and n >= 2): sorted (keep, held)."""
    if frac <= 0 or n < 2:
        return list(range(n)), []
    k = min(max(round(n * frac), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(perm[k:].tolist()), sorted(perm[:k].tolist())


def train_val_test(per_split: dict, val_split: float, seed: int) -> tuple:
    """(train, val, test) of ``per_split``: val held out of train by ``random_split`` when absent, empty ones None."""
    train, val = per_split["train"], per_split.get("val")
    if val is None:
        keep, held = random_split(len(train), val_split, seed)
        train, val = train.subset(keep), (train.subset(held) if held else None)
    elif len(val) == 0:
        val = None
    return train, val, per_split.get("test") or None


__all__ = ["CSV_IMAGE_COLUMNS", "IMAGE_EXTS", "SPLIT_DIRS", "csv_header", "files_under", "find_sub", "is_hidden",
           "note", "random_split", "read_csv_rows", "self_or_only_child", "subdirs", "train_val_test",
           "voc_split_lists"]
