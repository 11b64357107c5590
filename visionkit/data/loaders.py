"""Loaders whose every batch is a pure function of (seed, epoch, batch index), for exact mid-epoch resume.

Two paths behind one interface (``len(loader)``, ``loader.epoch(e, start=k)``):

* ``TensorImages``: the whole set is one uint8 tensor on the device; a batch is an index gather plus batched
  tensor augmentation (airbench style), no worker processes.
* ``ImageFiles``: a torch DataLoader with persistent workers; each sample's augmentation is seeded from
  (seed, epoch, position in epoch), so it does not depend on which worker decodes it.

Neither path reads or advances the global RNGs (torch, ``random``, numpy).
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import weakref
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .collate import to_device
from .datasets import ImageFiles, TensorImages

_MASK64 = (1 << 64) - 1


def mix_seed(*xs: int) -> int:
    """Deterministic 63-bit seed from integers (splitmix64 chain), independent of Python's hash randomisation.

    Example::

        mix_seed(0, 3, 17)  # seed for epoch 3, batch 17 of a run with seed 0
    """
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (int(x) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def class_weights(targets: Sequence[int] | Tensor, num_classes: int) -> Tensor:
    """Inverse-frequency class weights normalised to mean 1 over the classes present (absent classes get 0).

    Example::

        class_weights([0, 0, 0, 1], 2)  # tensor([0.5000, 1.5000])
    """
    counts = torch.bincount(torch.as_tensor(targets, dtype=torch.long).cpu(), minlength=num_classes).float()
    w = torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))
    present = counts > 0
    return w / w[present].mean() if present.any() else w


def sample_weights(targets: Sequence[int] | Tensor, num_classes: int) -> Tensor:
    """Per-sample weights (inverse class frequency) for ``make_loader(sampler_weights=...)``: classes drawn equally."""
    t = torch.as_tensor(targets, dtype=torch.long).cpu()
    return class_weights(t, num_classes)[t]


@contextlib.contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Seed torch (CPU), ``random`` and numpy's global RNGs for the block, then restore their previous states."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % (1 << 32))
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class Loader:
    """Batches of one dataset for the engine: ``len(loader)`` batches per epoch; ``epoch(e, start)`` yields them.

    Batch ``b`` of epoch ``e`` (its samples, order and augmentation) depends only on (seed, e, b), so
    ``list(loader.epoch(e, start=k)) == list(loader.epoch(e))[k:]``.

    Several workers (``world`` > 1): ``batch_size`` is the global batch. Every worker walks the same global order
    and takes its own contiguous part of each global batch (``part``), so the union of the workers' batch ``b`` is
    the single-process batch ``b``: DistributedSampler's split, with the epoch re-seeded the same way. A training
    epoch is padded with its first samples to a multiple of ``world`` (as DistributedSampler pads) so that every
    worker gets equal batches; evaluation is never padded (a part may be one sample shorter, or empty).
    """

    ORDER_TAG = 0x5EED  # mixed into the shuffling seed

    def __init__(self, n: int, *, batch_size: int, train: bool, seed: int, device: torch.device,
                 channels_last: bool, drop_last: bool | None, sampler_weights: Tensor | None, rank: int = 0,
                 world: int = 1) -> None:
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        if train and batch_size % world:
            raise ValueError(f"batch size {batch_size} does not split evenly over {world} workers")
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world = rank, world
        self.device, self.channels_last = torch.device(device), channels_last
        self.num_samples = n
        self.drop_last = (train and n > batch_size) if drop_last is None else drop_last
        pad = train and world > 1 and not self.drop_last
        self.epoch_len = math.ceil(n / world) * world if pad else n  # positions in one epoch's order
        self.sampler_weights = None
        if sampler_weights is not None and train:
            w = torch.as_tensor(sampler_weights, dtype=torch.double).cpu()
            if len(w) != n:
                raise ValueError(f"sampler_weights has {len(w)} entries for {n} samples")
            self.sampler_weights = w

    def __len__(self) -> int:
        n = self.epoch_len
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def order(self, epoch: int) -> Tensor:
        """Sample indices of ``epoch`` in global batch order (CPU LongTensor of length ``epoch_len``)."""
        if not self.train:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, self.ORDER_TAG))
        if self.sampler_weights is not None:
            order = torch.multinomial(self.sampler_weights, self.num_samples, replacement=True, generator=g)
        else:
            order = torch.randperm(self.num_samples, generator=g)
        if self.epoch_len > len(order):
            order = order.repeat(-(-self.epoch_len // len(order)))[:self.epoch_len]
        return order

    def part(self, b: int) -> slice:
        """This worker's positions in ``order`` for global batch ``b``."""
        start = b * self.batch_size
        stop = min(start + self.batch_size, self.epoch_len)
        if self.world == 1:
            return slice(start, stop)
        per, extra = divmod(stop - start, self.world)
        lo = start + self.rank * per + min(self.rank, extra)
        return slice(lo, lo + per + (self.rank < extra))

    def batch_seed(self, epoch: int, b: int) -> int:
        """Seed of batch ``b``'s augmentation draws (one stream per worker when several share a batch)."""
        return mix_seed(self.seed, epoch, b) if self.world == 1 else mix_seed(self.seed, epoch, b, self.rank)

    def close(self) -> None:
        """Release worker processes now (a no-op without workers); the loader still works afterwards."""

    def _finish(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        raise NotImplementedError


def adapt_channels(x: Tensor, chans: int) -> Tensor:
    """uint8 [N,C,H,W] to ``chans`` channels: grey -> colour repeats, colour -> grey uses luma (like PIL "L")."""
    c = x.shape[1]
    if c == chans:
        return x
    if c == 1 and chans == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    if c == 3 and chans == 1:
        w = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
        return (x.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise ValueError(f"cannot convert {c}-channel images to {chans} channels")


class TensorLoader(Loader):
    """Fast path: the whole uint8 set on ``device``, batches gathered by index and augmented as a batch."""

    def __init__(self, ds: TensorImages, *, input_size: tuple[int, int, int], mean, std, aug, **kw) -> None:
        super().__init__(len(ds), **kw)
        from visionkit.config import AugConfig
        from visionkit.transforms import BatchAugment

        self.in_chans = input_size[0]
        self.adapt = len(mean) != self.in_chans
        self.images = ds.images.to(self.device)
        self.targets = ds.targets.to(self.device)
        augment = self.train and aug is not None
        self.augment = BatchAugment(aug if aug is not None else AugConfig(), mean, std,
                                    (input_size[1], input_size[2]), train=augment)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        order = self.order(epoch).to(self.device)
        for b in range(start, len(self)):
            idx = order[self.part(b)]
            if not len(idx):  # evaluation on several workers: the last batch can be shorter than the world
                continue
            x = self.images.index_select(0, idx)
            if self.adapt:  # BatchAugment itself converts to len(mean) channels (cheaper: after the gather)
                x = adapt_channels(x, self.in_chans)
            g = torch.Generator(device=self.device).manual_seed(self.batch_seed(epoch, b))
            yield self._finish(self.augment(x, g), self.targets.index_select(0, idx))


class _EpochBatches:
    """Batch sampler yielding ``[(epoch, position, index), ...]``; epoch/start are set before each iteration."""

    def __init__(self, loader: WorkerLoader) -> None:
        # a weak reference: no loader <-> sampler cycle, so a dropped loader is freed (and its worker processes shut
        # down) at once, by this process, instead of by a later garbage collection that may run in a forked worker
        self.loader, self.epoch, self.start = weakref.proxy(loader), 0, 0

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        order = self.loader.order(self.epoch).tolist()
        for b in range(self.start, len(self.loader)):
            part = self.loader.part(b)
            if part.stop > part.start:  # (an empty part: evaluation's last batch on more workers than samples)
                yield [(self.epoch, p, order[p]) for p in range(part.start, part.stop)]

    def __len__(self) -> int:
        return max(0, len(self.loader) - self.start)


class SeededSamples(Dataset):
    """``apply(ds[i])`` for the worker pool, indexed by ``(epoch, position, index)``: train-time randomness is seeded
    from (seed, epoch, position in epoch), so a run and its resume draw the same augmentation. ``apply`` is the task's
    (picklable, for worker processes): :class:`ImageTransform` here, the joint image/mask one for segmentation."""

    def __init__(self, ds: Dataset, apply: Callable, seed: int, train: bool) -> None:
        self.ds, self.apply, self.seed, self.train = ds, apply, seed, train

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: tuple[int, int, int]):
        epoch, pos, i = key
        sample = self.ds[i]
        if not self.train:
            return self.apply(sample)
        with isolated_rng(mix_seed(self.seed, epoch, pos)):
            return self.apply(sample)


class ImageTransform:
    """``(img, label) -> (transform(img), label)``: a classification sample (RGB; the transform turns it grey when
    the input size asks for 1 channel)."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, sample: tuple) -> tuple[Tensor, int]:
        img, y = sample
        return self.transform(img), y


class WorkerLoader(Loader):
    """Samples decoded and transformed in a DataLoader with persistent workers (any task's files): a subclass builds
    the per-sample dataset, indexed by ``(epoch, position, index)``, and passes it to ``start_workers``. Mid-epoch
    start slices the index list."""

    def start_workers(self, samples: Dataset, workers: int | None, collate_fn: Callable | None = None) -> None:
        """``collate_fn``: the task's (default: torch's, which stacks images and labels)."""
        workers = min(4, os.cpu_count() or 1) if workers is None else workers
        self.batches = _EpochBatches(self)
        self.dl = DataLoader(samples, batch_sampler=self.batches, num_workers=workers, collate_fn=collate_fn,
                             persistent_workers=workers > 0, pin_memory=self.device.type == "cuda",
                             generator=torch.Generator().manual_seed(self.seed))  # keeps the global RNG untouched

    def close(self) -> None:
        # A loader dropped with live persistent workers is shut down by the garbage collector, at a moment no one
        # chooses: possibly inside another loader's freshly forked worker, where it stalls for seconds and warns.
        it = getattr(self.dl, "_iterator", None)
        if it is not None:
            it._shutdown_workers()
            self.dl._iterator = None

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        self.batches.epoch, self.batches.start = epoch, start
        if start >= len(self):
            return
        nb = self.device.type == "cuda"
        for x, y in self.dl:  # targets may be a tree (detection: a list of dicts)
            yield self._finish(x.to(self.device, non_blocking=nb), to_device(y, self.device, nb))


class FileLoader(WorkerLoader):
    """Image files of a classification set: each sample's transform seeded from (seed, epoch, position)."""

    def __init__(self, ds: ImageFiles, *, input_size: tuple[int, int, int], mean, std, aug,
                 workers: int | None, crop_pct: float = 0.875, interpolation: str | None = None, **kw) -> None:
        super().__init__(len(ds), **kw)
        from visionkit.transforms import build_eval_transform, build_train_transform

        augment = self.train and aug is not None
        if augment:
            tf = build_train_transform(aug, input_size, mean, std)
        else:
            interp = interpolation or getattr(aug, "interpolation", None) or "bilinear"
            tf = build_eval_transform(input_size, mean, std, crop_pct=crop_pct, interpolation=interp)
        self.start_workers(SeededSamples(ds, ImageTransform(tf), self.seed, augment), workers)


def make_loader(ds: Dataset, *, batch_size: int, train: bool, seed: int, device: torch.device | str,
                input_size: tuple[int, int, int], mean: Sequence[float], std: Sequence[float], aug=None,
                channels_last: bool = False, workers: int | None = None, drop_last: bool | None = None,
                sampler_weights: Tensor | Sequence[float] | None = None, crop_pct: float = 0.875,
                interpolation: str | None = None, rank: int = 0, world: int = 1) -> Loader:
    """A Loader for ``ds``: the tensor fast path for TensorImages, a worker DataLoader for ImageFiles.

    ``aug`` (an AugConfig) applies only when ``train``; eval loaders never shuffle, augment or drop batches.
    ``crop_pct`` and ``interpolation`` are the model's eval preprocessing for image files (resize to
    size / crop_pct, centre crop), the same as prediction uses. ``rank``/``world``: this worker's part of every
    global batch of ``batch_size`` when several processes train (see ``Loader``).

    Example::

        b = build_data("digits")
        dl = make_loader(b.train, batch_size=64, train=True, seed=0, device="cpu", input_size=(1, 8, 8),
                         mean=(0.5,), std=(0.5,))
        for x, y in dl.epoch(0): ...
    """
    kw = {"batch_size": batch_size, "train": train, "seed": seed, "device": torch.device(device),
          "channels_last": channels_last, "drop_last": drop_last, "sampler_weights": sampler_weights,
          "rank": rank, "world": world}
    if isinstance(ds, TensorImages):
        return TensorLoader(ds, input_size=tuple(input_size), mean=mean, std=std, aug=aug, **kw)
    if isinstance(ds, ImageFiles):
        return FileLoader(ds, input_size=tuple(input_size), mean=mean, std=std, aug=aug, workers=workers,
                          crop_pct=crop_pct, interpolation=interpolation, **kw)
    raise TypeError(f"make_loader expects TensorImages or ImageFiles, got {type(ds).__name__}")
