"""Built-in data sets as uint8 tensors: local copies first, download only when allowed and needed.

Lookup order for a local copy: the ``root`` argument, else ``$VISIONKIT_DATA``, else ``~/.cache/visionkit/data``
(torchvision's layout under it, e.g. ``FashionMNIST/raw/*.gz``, ``cifar-10-batches-py/``); Fashion-MNIST also
reads the Debian package files in ``/usr/share/datasets/fashion-mnist``.
"""
from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from .errors import DataError

_Part = TypeVar("_Part")

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
DIGIT_CLASSES = [str(i) for i in range(10)]
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


@dataclass
class RawSplits:
    """Official splits of a built-in as tensors: images uint8 [N,C,H,W], targets long [N]."""

    classes: list[str]
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor] | None
    in_chans: int
    native_size: int


@dataclass(frozen=True)
class BuiltinInfo:
    name: str
    num_classes: int
    size: str
    splits: str
    note: str


BUILTINS: dict[str, BuiltinInfo] = {
    "fashion-mnist": BuiltinInfo("fashion-mnist", 10, "28x28 grey", "train 60000 / test 10000",
                                 "Zalando clothing; Debian package dataset-fashion-mnist or download"),
    "mnist": BuiltinInfo("mnist", 10, "28x28 grey", "train 60000 / test 10000", "handwritten digits; download"),
    "cifar10": BuiltinInfo("cifar10", 10, "32x32 colour", "train 50000 / test 10000", "download"),
    "cifar100": BuiltinInfo("cifar100", 100, "32x32 colour", "train 50000 / test 10000", "download"),
    "digits": BuiltinInfo("digits", 10, "8x8 grey", "1797 images, split 60/20/20",
                          "scikit-learn's bundled digits; always offline"),
    "fake": BuiltinInfo("fake", 10, "32x32 colour", "train 3000 / test 1000",
                        "generated coloured shapes and patterns; offline, deterministic from the seed"),
}


def data_root(root: str | os.PathLike | None = None) -> Path:
    """Where built-ins look for (and download to) local copies."""
    if root:
        return Path(root).expanduser()
    env = os.environ.get("VISIONKIT_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "visionkit" / "data"


# ---------------------------------------------------------------- IDX (MNIST family)

def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip'd) into a numpy array, e.g. MNIST ``train-images-idx3-ubyte.gz``."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file; delete it so a fresh copy is used")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    start = 4 + 4 * ndim
    n = int(np.prod(dims))
    if len(data) - start < n:
        raise DataError(f"{path} is truncated ({len(data) - start} of {n} bytes); delete it so a fresh copy is used")
    return np.frombuffer(data, dtype=np.uint8, count=n, offset=start).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _idx_folder_complete(folder: Path) -> bool:
    return all(_find_idx(folder, s) for pair in IDX_FILES.values() for s in pair)


def _idx_candidates(name: str, root: Path) -> list[Path]:
    tv = "FashionMNIST" if name == "fashion-mnist" else "MNIST"
    out = [root / tv / "raw", root / name]
    if name == "fashion-mnist":
        out.append(DEBIAN_FASHION_MNIST)
    return out


def _load_idx_folder(folder: Path) -> dict[str, tuple[Tensor, Tensor]]:
    out = {}
    for split, (img_stem, lbl_stem) in IDX_FILES.items():
        x = read_idx(_find_idx(folder, img_stem))
        y = read_idx(_find_idx(folder, lbl_stem))
        if len(x) != len(y):
            raise DataError(f"{folder}: {len(x)} {split} images but {len(y)} labels; replace the files")
        out[split] = (torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64)))
    return out


def _mnist_family(name: str, root: Path, download: bool) -> RawSplits:
    classes = FASHION_CLASSES if name == "fashion-mnist" else DIGIT_CLASSES
    for folder in _idx_candidates(name, root):
        if _idx_folder_complete(folder):
            s = _load_idx_folder(folder)
            return RawSplits(classes, s["train"], s["test"], 1, 28)
    where = root / ("FashionMNIST" if name == "fashion-mnist" else "MNIST") / "raw"
    hint = (f"put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
            f"t10k-labels-idx1-ubyte.gz in {where}")
    if name == "fashion-mnist":
        hint += " (or: apt-get install dataset-fashion-mnist)"
    if not download:
        raise DataError(f"no local copy of {name} and downloads are off: {hint}")
    import torchvision.datasets as tvd

    cls = tvd.FashionMNIST if name == "fashion-mnist" else tvd.MNIST
    try:
        tr, te = cls(str(root), train=True, download=True), cls(str(root), train=False, download=True)
    except Exception as e:  # noqa: BLE001 - any network/IO failure becomes one actionable line
        raise DataError(f"could not download {name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        f"{hint}") from None
    return RawSplits(classes, (tr.data.unsqueeze(1).contiguous(), tr.targets.long()),
                     (te.data.unsqueeze(1).contiguous(), te.targets.long()), 1, 28)


# ---------------------------------------------------------------- CIFAR

def _cifar(name: str, root: Path, download: bool) -> RawSplits:
    import torchvision.datasets as tvd

    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    folder = root / cls.base_folder
    hint = f"put {cls.filename} (from {cls.url}) in {root}, or its extracted {cls.base_folder}/ folder"
    try:
        tr, te = cls(str(root), train=True, download=False), cls(str(root), train=False, download=False)
    except RuntimeError:
        if not download and not (root / cls.filename).is_file():
            raise DataError(f"no local copy of {name} in {folder} and downloads are off: {hint}") from None
        try:  # torchvision reuses a local archive with the right checksum instead of downloading
            tr, te = cls(str(root), train=True, download=True), cls(str(root), train=False, download=True)
        except Exception as e:  # noqa: BLE001
            msg = str(e).splitlines()[0] if str(e) else ""
            raise DataError(f"could not download {name} ({type(e).__name__}: {msg}); {hint}") from None

    def to_t(ds) -> tuple[Tensor, Tensor]:
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(ds.targets, dtype=torch.long)

    return RawSplits(list(tr.classes), to_t(tr), to_t(te), 3, 32)


def _cifar_local(name: str, root: Path) -> bool:
    import torchvision.datasets as tvd

    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    return (root / cls.base_folder).is_dir() or (root / cls.filename).is_file()


# ---------------------------------------------------------------- digits, fake

def _digits() -> RawSplits:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # 0..16 -> 0..255
    return RawSplits(DIGIT_CLASSES, (torch.from_numpy(x).unsqueeze(1), torch.from_numpy(d.target.astype(np.int64))),
                     None, 1, 8)


FAKE_CLASSES = ["circle", "square", "ring", "cross", "triangle", "diamond", "h-stripes", "v-stripes", "d-stripes",
                "checker"]


def make_fake(n: int, seed: int, size: int = 32) -> tuple[Tensor, Tensor]:
    """``n`` RGB images of 10 shape/pattern classes with random colours, positions, scales and noise (learnable).

    The class is the shape, never the colour, so a model has to look at structure. Deterministic from ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    y = y[torch.randperm(n, generator=g)]
    coords = torch.arange(size, dtype=torch.float32)
    yy, xx = coords.view(1, size, 1), coords.view(1, 1, size)
    cx = (size / 2 + (torch.rand(n, generator=g) - 0.5) * size * 0.35).view(n, 1, 1)
    cy = (size / 2 + (torch.rand(n, generator=g) - 0.5) * size * 0.35).view(n, 1, 1)
    r = (size * (0.18 + 0.14 * torch.rand(n, generator=g))).view(n, 1, 1)
    period = torch.randint(3, 6, (n, 1, 1), generator=g).float()
    phase = torch.randint(0, 6, (n, 1, 1), generator=g).float()
    dx, dy = xx - cx, yy - cy
    shapes = [
        lambda dx, dy, r, p, f: (dx ** 2 + dy ** 2).sqrt() < r,
        lambda dx, dy, r, p, f: torch.maximum(dx.abs(), dy.abs()) < r * 0.85,
        lambda dx, dy, r, p, f: ((dx ** 2 + dy ** 2).sqrt() - r * 0.8).abs() < r * 0.25,
        lambda dx, dy, r, p, f: (torch.minimum(dx.abs(), dy.abs()) < r * 0.28) & (torch.maximum(dx.abs(), dy.abs()) < r),
        lambda dx, dy, r, p, f: (dy < r * 0.8) & (dy > -r) & (dx.abs() < (dy + r) * 0.55),
        lambda dx, dy, r, p, f: dx.abs() + dy.abs() < r,
        lambda dx, dy, r, p, f: ((yy + f) / p).floor() % 2 == 0,
        lambda dx, dy, r, p, f: ((xx + f) / p).floor() % 2 == 0,
        lambda dx, dy, r, p, f: ((xx + yy + f) / p).floor() % 2 == 0,
        lambda dx, dy, r, p, f: (((xx + f) / p).floor() + ((yy + f) / p).floor()) % 2 == 0,
    ]
    mask = torch.zeros(n, 1, size, size)
    for c, shape in enumerate(shapes):  # only the mask each sample needs
        i = torch.nonzero(y == c).flatten()
        mask[i, 0] = shape(dx[i], dy[i], r[i], period[i], phase[i]).expand(len(i), size, size).float()
    bg = torch.rand(n, 3, 1, 1, generator=g) * 255
    fg = (bg + 96 + torch.rand(n, 3, 1, 1, generator=g) * 64) % 256  # always far from the background per channel
    noise = (torch.rand(n, 3, size, size, generator=g) - 0.5) * 40
    img = bg * (1 - mask) + fg * mask + noise
    return img.round().clamp(0, 255).to(torch.uint8), y.long()


def _fake(seed: int) -> RawSplits:
    return RawSplits(FAKE_CLASSES, make_fake(3000, seed * 2 + 1), make_fake(1000, seed * 2 + 2), 3, 32)


# ---------------------------------------------------------------- entry points

def load_builtin(name: str, *, seed: int = 0, root: str | None = None, download: bool = True) -> RawSplits:
    """Load a built-in's official splits as tensors (see the module docstring for where copies are looked for)."""
    if name not in BUILTINS:
        raise DataError(f"unknown built-in data set {name!r}; built-ins: {', '.join(BUILTINS)} "
                        f"(or give a folder or a CSV file)")
    if name == "digits":
        return _digits()
    if name == "fake":
        return _fake(seed)
    r = data_root(root)
    if name in ("mnist", "fashion-mnist"):
        return _mnist_family(name, r, download)
    return _cifar(name, r, download)


def builtin_is_local(name: str, root: str | None = None) -> bool:
    """True when ``name`` can be loaded without a download."""
    if name in ("digits", "fake"):
        return True
    r = data_root(root)
    if name in ("mnist", "fashion-mnist"):
        return any(_idx_folder_complete(f) for f in _idx_candidates(name, r))
    return _cifar_local(name, r)


# ---------------------------------------------------------------- helpers of the generated and built-in sets

def fingerprint_tensors(*tensors: Tensor) -> str:
    """Short sha256 (16 hex digits) of the shapes and bytes of ``tensors``, in order."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def generate_chunks(n: int, chunk: int, make: Callable[[int, int], _Part], workers: int = 1) -> list[_Part]:
    """``make(count, index)`` of each ``chunk``-sized part of ``n``, in order, one intra-op torch thread in each."""
    starts = list(range(0, n, chunk))
    threads = torch.get_num_threads()

    def one(c: int) -> _Part:
        torch.set_num_threads(1)  # per thread: small tensors are faster so, and reductions add up in one order
        return make(min(chunk, n - starts[c]), c)

    try:
        if workers <= 1 or len(starts) <= 1:
            return [one(c) for c in range(len(starts))]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(one, range(len(starts))))
    finally:
        torch.set_num_threads(threads)
