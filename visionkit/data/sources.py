"""``build_data``: turn a folder, a CSV file or a built-in name into train/val/test datasets plus metadata.

Example::

    bundle = build_data("digits", seed=0)
    bundle.summary()["splits"]["train"]["n"]
"""
from __future__ import annotations

import csv
import hashlib
import os
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .builtins import BUILTINS, builtin_is_local, data_root, fingerprint_tensors, load_builtin
from .datasets import ImageFiles, TensorImages
from .errors import DataError
from .layout import IMAGE_EXTS, SPLIT_DIRS, is_hidden
from .validate import bad_files_error, validate_images

# image types a user may expect to be read but torchvision's folder datasets (and so this one) leave out: named in a
# note, so that a folder's images are never dropped in silence (hymenoptera's ants/imageNotFound.gif is one)
_UNREAD_IMAGE_EXTS = (".gif", ".heic", ".heif", ".avif", ".jfif", ".svg", ".jp2", ".ico")
_SOURCE_HINT = (f"give a folder of class sub-folders, a CSV file of path,label rows, "
                f"or a built-in ({', '.join(BUILTINS)})")


@dataclass
class DataBundle:
    """Everything the engine needs to know about the data of one run."""

    name: str  # built-in name or the path given
    classes: list[str]
    train: Dataset
    val: Dataset | None
    test: Dataset | None
    in_chans: int  # 1 for grey built-ins, 3 for colour built-ins and all image files
    native_size: int | None  # e.g. 28 for (fashion-)mnist; None for image files
    fingerprint: str  # short sha256 of the tensor bytes (built-ins) or of (relative path, size, label) (files)
    bad_files: list[dict] = field(default_factory=list)  # [{"path", "reason"}] skipped under bad_images="skip"
    image_sizes: list[tuple[int, int]] = field(default_factory=list, repr=False)  # (w, h) of kept files

    def splits(self) -> dict[str, Dataset]:
        return {k: v for k, v in (("train", self.train), ("val", self.val), ("test", self.test)) if v is not None}

    def summary(self) -> dict:
        """Per split: n and class counts; for image files also min/median/max width and height."""
        out: dict = {"name": self.name, "num_classes": len(self.classes), "classes": list(self.classes),
                     "in_chans": self.in_chans, "native_size": self.native_size, "fingerprint": self.fingerprint,
                     "splits": {}, "bad_files": len(self.bad_files)}
        for split, ds in self.splits().items():
            counts = torch.bincount(torch.as_tensor(ds.targets, dtype=torch.long), minlength=len(self.classes))
            out["splits"][split] = {"n": len(ds), "class_counts": dict(zip(self.classes, counts.tolist()))}
        if self.image_sizes:
            out["image_sizes"] = size_stats(self.image_sizes)
        return out


def size_stats(sizes: Sequence[tuple[int, int]]) -> dict:
    """Min / median / max of the widths and of the heights of (w, h) image sizes (at least one)."""
    ws, hs = [s[0] for s in sizes], [s[1] for s in sizes]
    return {k: {"min": min(v), "median": statistics.median(v), "max": max(v)} for k, v in (("width", ws), ("height", hs))}


# ---------------------------------------------------------------- splitting

def stratified_split(targets: Sequence[int] | Tensor, frac: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded per-class hold-out: returns sorted (keep, held_out) index lists, disjoint and covering all indices.

    Every class with at least 2 samples keeps at least one sample on each side when ``frac > 0``.

    Example::

        tr, va = stratified_split([0, 0, 1, 1, 1], 0.4, seed=0)
    """
    t = np.asarray(torch.as_tensor(targets, dtype=torch.long).cpu())
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    held: list[int] = []
    for c in np.unique(t):
        idx = np.flatnonzero(t == c)
        idx = idx[rng.permutation(len(idx))]
        n_out = round(len(idx) * frac)
        if frac > 0 and len(idx) >= 2:
            n_out = min(max(n_out, 1), len(idx) - 1)
        elif len(idx) < 2:
            n_out = 0
        held += idx[:n_out].tolist()
        keep += idx[n_out:].tolist()
    return sorted(keep), sorted(held)


def _split(ds, frac: float, seed: int):
    if frac <= 0:
        return ds, None
    keep, held = stratified_split(ds.targets, frac, seed)
    return ds.subset(keep), (ds.subset(held) if held else None)


# ---------------------------------------------------------------- built-ins

def _from_builtin(name: str, val_split: float, seed: int, root: str | None, download: bool) -> DataBundle:
    raw = load_builtin(name, seed=seed, root=root, download=download)
    parts = [*raw.train] + ([*raw.test] if raw.test is not None else [])
    fp = fingerprint_tensors(*parts)
    full = TensorImages(raw.train[0], raw.train[1], raw.classes)
    if raw.test is not None:
        test = TensorImages(raw.test[0], raw.test[1], raw.classes)
        train, val = _split(full, val_split, seed)
    else:  # no official test set (digits): hold out 20% as test, then val_split of the whole as val
        train_val, test = _split(full, 0.2, seed)
        train, val = _split(train_val, min(val_split / 0.8, 0.9), seed + 1)
    return DataBundle(name, list(raw.classes), train, val, test, raw.in_chans, raw.native_size, fp)


# ---------------------------------------------------------------- files

def _images_under(folder: Path) -> list[str]:
    out, unread = [], []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        for f in sorted(filenames):
            if is_hidden(f):
                continue
            if f.lower().endswith(IMAGE_EXTS):
                out.append(os.path.join(dirpath, f))
            elif f.lower().endswith(_UNREAD_IMAGE_EXTS):
                unread.append(os.path.join(dirpath, f))
    if unread:
        shown = ", ".join(unread[:3]) + (f" and {len(unread) - 3} more" if len(unread) > 3 else "")
        print(f"note: left out {len(unread)} file{'s' if len(unread) > 1 else ''} of an image type that is not "
              f"read ({shown}); convert to .jpg, .png, .webp to use "
              f"{'them' if len(unread) > 1 else 'it'}", file=sys.stderr)
    return out


def _subdirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not is_hidden(e.name))


def _scan_classes(folder: Path) -> dict[str, list[str]]:
    """Class name -> image paths for a folder of class sub-folders (images may be nested deeper)."""
    classes = _subdirs(folder)
    if not classes:
        loose = [f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS)]
        if loose:
            raise DataError(f"{folder} holds images but no class sub-folders; put each class's images in "
                            f"{folder}/<class name>/")
        raise DataError(f"no class sub-folders in {folder}; expected {folder}/<class name>/<image files>")
    found = {c: _images_under(folder / c) for c in classes}
    empty = [c for c, files in found.items() if not files]
    if len(empty) == len(found):
        raise DataError(f"no images found under {folder} (looked for {', '.join(IMAGE_EXTS)}); add images to the class "
                        f"sub-folders")
    if empty:
        names = ", ".join(str(folder / c) for c in empty)
        raise DataError(f"empty class folder{'s' if len(empty) > 1 else ''}: {names}; add images or remove "
                        f"{'them' if len(empty) > 1 else 'it'}")
    return found


def _check_classes(classes: list[str], where: str) -> None:
    if len(classes) < 2:
        raise DataError(f"only one class ({classes[0]}) in {where}; classification needs at least 2 classes")


def _folder_splits(folder: Path) -> dict[str, list[tuple[str, str]]]:
    """{split: [(path, class name)]} for a train/[val/][test/] layout or a plain folder of class sub-folders."""
    subs = _subdirs(folder)
    if "train" in subs and all(s in SPLIT_DIRS for s in subs):
        out: dict[str, list[tuple[str, str]]] = {}
        for s in subs:
            split = SPLIT_DIRS[s]
            if split in out:
                raise DataError(f"{folder} has more than one {split} folder ({', '.join(subs)}); keep one")
            out[split] = [(p, c) for c, files in _scan_classes(folder / s).items() for p in files]
        return out
    return {"train": [(p, c) for c, files in _scan_classes(folder).items() for p in files]}


def _sort_labels(labels: set[str]) -> list[str]:
    """Numeric labels sort as numbers (2 before 10); anything else sorts as text."""
    try:
        return sorted(labels, key=lambda s: (float(s), s))
    except ValueError:
        return sorted(labels)


def _read_csv(path: Path) -> list[tuple[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [[c.strip() for c in r] for r in csv.reader(f)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read CSV {path}: {e}; give a UTF-8 CSV of path,label rows") from None
    rows = [(i + 1, r) for i, r in enumerate(rows) if any(r)]
    if not rows:
        raise DataError(f"CSV {path} is empty; give one path,label row per image")
    pi, li = 0, 1
    head = [c.lower() for c in rows[0][1]]
    path_names, label_names = {"path", "file", "filename", "filepath", "image", "img"}, {"label", "class", "target"}
    if any(h in path_names for h in head) or any(h in label_names for h in head):
        pi = next((i for i, h in enumerate(head) if h in path_names), None)
        li = next((i for i, h in enumerate(head) if h in label_names), None)
        if pi is None or li is None:
            raise DataError(f"CSV {path} header {','.join(rows[0][1])} lacks a "
                            f"{'path' if pi is None else 'label'} column; use a header of path,label")
        rows = rows[1:]
    out = []
    for line, r in rows:
        if len(r) <= max(pi, li) or not r[pi] or not r[li]:
            raise DataError(f"CSV {path} line {line}: expected path,label, got {','.join(r)!r}; give both columns "
                            f"on every row")
        out.append((r[pi], r[li]))
    if not out:
        raise DataError(f"CSV {path} has a header but no rows; give one path,label row per image")
    return out


def _csv_samples(path: Path) -> list[tuple[str, str]]:
    base = path.parent
    rows = [(str(p if os.path.isabs(p) else base / p), lab) for p, lab in _read_csv(path)]
    missing = [p for p, _ in rows if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise DataError(f"{len(missing)} file{'s' if len(missing) > 1 else ''} listed in {path} not found: {shown}; "
                        f"fix the paths (relative paths are relative to the CSV's folder)")
    return rows


def _fingerprint_files(samples: list[tuple[str, str]], base: Path) -> str:
    h = hashlib.sha256()
    for p, label in sorted((os.path.relpath(p, base), label) for p, label in samples):
        h.update(f"{p}\t{os.path.getsize(base / p)}\t{label}\n".encode())
    return h.hexdigest()[:16]


def _from_files(source: str, path: Path, val_split: float, seed: int, bad_images: str) -> DataBundle:
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DataError(f"{path} is a file but not a .csv; {_SOURCE_HINT}")
        splits, base = {"train": _csv_samples(path)}, path.parent
    else:
        splits, base = _folder_splits(path), path
    train_classes = {c for _, c in splits["train"]}
    for split in ("val", "test"):
        unknown = sorted({c for _, c in splits.get(split, [])} - train_classes)
        if unknown:
            raise DataError(f"{split} classes not in train: {', '.join(unknown)}; add them to {path / 'train'} "
                            f"or remove them from {split}")
    classes = _sort_labels(train_classes)
    _check_classes(classes, str(path))

    # Validate every file once (all splits together so the thread pool stays busy).
    flat = [(s, p, c) for s, items in splits.items() for p, c in items]
    sizes, bad = validate_images([p for _, p, _ in flat])
    if bad and bad_images == "fail":
        raise bad_files_error(bad, str(path))
    kept = [(s, p, c, sz) for (s, p, c), sz in zip(flat, sizes) if sz is not None]
    index = {c: i for i, c in enumerate(classes)}
    per_split = {s: ImageFiles([(p, index[c]) for s2, p, c, _ in kept if s2 == s], classes) for s in splits}
    if len(per_split["train"]) == 0:
        raise DataError(f"every training image in {path} is bad; fix the files listed with --bad-images fail")
    fp = _fingerprint_files([(p, c) for _, p, c, _ in kept], base)
    train, val = per_split["train"], per_split.get("val")
    if val is None:
        train, val = _split(train, val_split, seed)
    elif len(val) == 0:
        val = None
    test = per_split.get("test") or None
    return DataBundle(str(source), classes, train, val, test, 3, None, fp, bad, [sz for *_, sz in kept])


# ---------------------------------------------------------------- entry points

def check_build_options(bad_images: str, val_split: float) -> None:
    """DataError unless ``bad_images`` is fail or skip and ``val_split`` lies in [0, 1)."""
    if bad_images not in ("fail", "skip"):
        raise DataError(f"bad_images must be fail or skip, got {bad_images!r}")
    if not 0 <= val_split < 1:
        raise DataError(f"val_split must be in [0, 1), got {val_split}")


def build_data(source: str | os.PathLike, *, val_split: float = 0.2, seed: int = 0, bad_images: str = "fail",
               root: str | None = None, download: bool = True) -> DataBundle:
    """Build train/val/test datasets from a folder, a CSV file or a built-in name.

    A built-in name wins over a same-named folder in the current directory; write ``./mnist`` for the folder.
    ``val_split`` applies only when the source has no val split of its own (a ``val/`` folder wins).

    Example::

        b = build_data("digits")                       # 60/20/20 stratified split of scikit-learn's digits
        b = build_data("photos/", val_split=0.1, bad_images="skip")
    """
    check_build_options(bad_images, val_split)
    src = str(source)
    if src.lower() in BUILTINS and not any(ch in src for ch in "/\\"):
        return _from_builtin(src.lower(), val_split, seed, root, download)
    path = Path(src).expanduser()
    if not path.exists():
        raise DataError(f"data not found: {src!r} is neither an existing path nor a built-in; {_SOURCE_HINT}")
    try:
        return _from_files(src, path, val_split, seed, bad_images)
    except PermissionError as e:
        raise DataError(f"cannot read {e.filename}: permission denied; fix its permissions") from None


def list_datasets(root: str | None = None) -> list[dict]:
    """Built-in data sets for ``visionkit datasets``: name, classes, size, splits, local (no download needed), note.

    Example::

        [d["name"] for d in list_datasets() if d["local"]]
    """
    out = []
    for info in BUILTINS.values():
        local = builtin_is_local(info.name, root)
        note = info.note if local or info.name in ("digits", "fake") else f"{info.note} (to {data_root(root)})"
        out.append({"name": info.name, "classes": info.num_classes, "size": info.size, "splits": info.splits,
                    "local": local, "note": note})
    return out
