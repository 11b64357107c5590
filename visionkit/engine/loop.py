"""The training loop: fit -> train_one_epoch / evaluate. Read it top to bottom.

The loop knows no task vocabulary (no labels, accuracies or masks): a task turns a batch into a loss plus named
sums to log (``task.training_step``), and model outputs into metrics (``task.predict`` + ``task.new_metrics``, the
task's one evaluator). Every logged sum becomes a ``train_<name>`` column and every scalar the evaluator returns a
``val_<name>`` column; the monitored column (and whether it is maximised) is the run's choice, checked before
training starts. Extra behaviour (progress bars, CSV/TensorBoard logs, early stopping) hangs on a short list of
events (see ``events.py``) instead of growing the loop.

Exact resume: every piece of changing state lives in ``self.state`` or in objects with a ``state_dict`` (model,
optimizer, scheduler, scaler, EMA), and the data order/augmentation of each batch is a pure function of
(seed, epoch, batch index). A checkpoint written after optimizer step N therefore lets a new process continue with
batch N+1 of the same epoch and reproduce, bit for bit on CPU with ``--deterministic``, the run that never stopped.

Several processes (``dist``, see ``distributed.py``): each trains its part of every global batch through
DistributedDataParallel, whose gradient all-reduce makes the step the one a single process would take on the whole
batch. Metrics are summed over processes before anyone reads them, so every rank takes the same decisions (best
epoch, early stopping); rank 0 alone writes. Checkpoints hold no trace of the world size, so any number of
processes can resume them.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.runtime import autocast_for
from . import distributed
from .checkpoint import FORMAT_VERSION, atomic_save, rng_state, set_rng_state
from .distributed import Dist
from .events import Callback


def new_running() -> dict:
    """An epoch's running sums: loss x n, n, the task's logged sums, seconds spent."""
    return {"loss_sum": 0.0, "n": 0, "time": 0.0, "logs": {}}


def upgrade_state(state: dict) -> dict:
    """A checkpoint's State from any format: before the task plug-ins, the running sums held classification's
    ``correct`` count itself (now the task's ``acc`` log)."""
    r = dict(state.get("running") or new_running())
    if "correct" in r:
        r.setdefault("logs", {})["acc"] = r.pop("correct")
    r.setdefault("logs", {})
    return {**state, "running": r}


@dataclass
class State:
    """Everything about progress that a checkpoint must carry."""
    epoch: int = 0  # current epoch, 0-based
    batch: int = 0  # batches of the current epoch already consumed (at an optimizer-step boundary)
    step: int = 0  # optimizer steps taken overall
    best: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0  # epochs since the monitored metric last improved (early stopping)
    history: list = field(default_factory=list)  # one metrics row per finished epoch
    running: dict = field(default_factory=lambda: new_running())
    best_loss: float | None = None  # val_loss of the best epoch: breaks ties on the monitored metric
    stop: bool = False  # set by callbacks (early stopping)


class Trainer:
    """Holds the pieces of a run and trains them. Built by ``visionkit.api`` from a Config; usable directly too."""

    def __init__(self, *, model: nn.Module, task, optimizer: torch.optim.Optimizer, scheduler=None,
                 sched_per_step: bool = True, train_loader, val_loader=None, epochs: int, device: torch.device,
                 amp_dtype: torch.dtype | None = None, grad_accum: int = 1, clip_grad: float = 0.0, ema=None,
                 batch_transform: Callable | None = None, monitor: str = "val_loss", monitor_mode: str = "auto",
                 save_every: int = 0,
                 run_dir: str | Path | None = None, meta: dict | None = None, callbacks: list[Callback] = (),
                 tta: bool = False, forward_model: nn.Module | None = None, epoch_checkpoints: bool = True,
                 dist: Dist | None = None):
        self.model, self.task, self.opt, self.sched = model, task, optimizer, scheduler
        # what batches go through: the model itself, its torch.compile wrapper, or (linear probe) just its head on
        # cached features. Checkpoints always hold `model`.
        self.forward_model = forward_model or model
        self.sched_per_step = sched_per_step
        self.train_loader, self.val_loader = train_loader, val_loader
        self.epochs, self.device, self.amp_dtype = epochs, device, amp_dtype
        self.grad_accum, self.clip_grad, self.ema = grad_accum, clip_grad, ema
        self.batch_transform = batch_transform  # the task's batch-level augmentation (MixUp/CutMix), outside autocast
        if monitor_mode == "auto":
            monitor_mode = "min" if "loss" in monitor else "max"
        self.monitor, self.monitor_mode, self.save_every, self.tta = monitor, monitor_mode, save_every, tta
        # False: last.pt only when fit ends (epochs of milliseconds, e.g. a linear probe, would spend their time
        # writing checkpoints); best.pt is still written whenever the monitored metric improves
        self.epoch_checkpoints = epoch_checkpoints
        self.run_dir = Path(run_dir) if run_dir else None
        self.meta = meta or {}  # config, classes, model cfg: stored in every checkpoint
        self.callbacks = list(callbacks)
        # GradScaler only for fp16 on CUDA; bf16 has fp32's range and needs no loss scaling
        self.scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 and device.type == "cuda" else None
        self.state = State()
        self.dist = dist or Dist()
        self._ddp, self._ddp_key = None, None
        self.steps_per_epoch = math.ceil(len(train_loader) / grad_accum)

    # ---------------------------------------------------------------- events
    def fire(self, event: str, **kw: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(self, **kw)

    def autocast(self):
        return autocast_for(self.device, self.amp_dtype)()

    @property
    def lr(self) -> float:
        """The current lr of the fastest param group (the head's, with discriminative lrs)."""
        return max(g["lr"] for g in self.opt.param_groups)

    @property
    def eval_model(self) -> nn.Module:
        """The weights we evaluate and keep: the EMA copy when EMA is on."""
        return self.ema.module if self.ema is not None else self.forward_model

    def train_module(self) -> nn.Module:
        """What a training batch goes through: ``forward_model``, wrapped in DistributedDataParallel when a process
        group is open. DDP registers the parameters that require grad when it is built, so it is built again when
        that set changes (staged or gradual unfreezing): a stage unfrozen later is then all-reduced too."""
        if not self.dist.enabled:
            return self.forward_model
        key = tuple(p.requires_grad for p in self.forward_model.parameters())
        if key != self._ddp_key:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self._ddp = None  # the old wrapper's gradient hooks go with it
            ids = [self.device.index] if self.device.type == "cuda" else None
            # buffers (BatchNorm statistics) stay per rank during the epoch and are averaged before each evaluation
            # and checkpoint; torch < 2.13 calls the switch broadcast_buffers
            no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
                else "broadcast_buffers"
            self._ddp = DDP(self.forward_model, device_ids=ids, **{no_sync: False})
            self._ddp_key = key
        return self._ddp

    # ---------------------------------------------------------------- training
    def fit(self) -> dict:
        self.fire("on_fit_start")
        try:
            while self.state.epoch < self.epochs and not self.state.stop:
                self.train_one_epoch()
                row = self.end_epoch()
                self.fire("on_epoch_end", row=row)
        except KeyboardInterrupt:
            # Ctrl-C: keep what finished (the last optimizer-step boundary) and let the caller exit cleanly
            self.save("last.pt", collective=False)  # the other ranks are stopping too: no collective now
            self.fire("on_interrupt")
            raise
        if not self.epoch_checkpoints:
            self.save("last.pt")
        self.fire("on_fit_end")
        return self.state.history[-1] if self.state.history else {}

    def train_one_epoch(self) -> None:
        st, loader = self.state, self.train_loader
        self.forward_model.train()
        self.fire("on_epoch_start")  # after train(): callbacks may put frozen layers back in eval mode
        model = self.train_module()  # after the callbacks: they decide what trains this epoch
        t0 = time.perf_counter() - st.running["time"]
        n_batches = len(loader)
        for i, batch in enumerate(loader.epoch(st.epoch, start=st.batch), start=st.batch):
            if self.batch_transform is not None:
                batch = self.batch_transform(batch)
            # the last window of an epoch may be shorter than grad_accum: scale by its real length
            window = min(self.grad_accum, n_batches - (i // self.grad_accum) * self.grad_accum)
            step_now = (i + 1) % self.grad_accum == 0 or i + 1 == n_batches
            # accumulating: gradients stay local until the window's last batch, whose backward all-reduces them once
            with model.no_sync() if not step_now and self._ddp is model else contextlib.nullcontext():
                with self.autocast():
                    out = self.task.training_step(model, batch)
                loss = out["loss"] / window
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            # running sums stay on device: .item() would force a sync every step
            r = st.running
            r["loss_sum"] = r["loss_sum"] + out["loss"].detach() * out["n"]
            r["n"] += out["n"]
            for k, v in out.get("logs", {}).items():
                r["logs"][k] = r["logs"].get(k, 0.0) + (v.detach() if torch.is_tensor(v) else v)
            if step_now:
                self.optimizer_step()
                st.batch = i + 1
                r["time"] = time.perf_counter() - t0
                self.fire("on_step_end", batch=i + 1, n_batches=n_batches)
                if self.save_every and st.step % self.save_every == 0 and i + 1 < n_batches:
                    self.save("last.pt")
        st.running["time"] = time.perf_counter() - t0

    def optimizer_step(self) -> None:
        if self.scaler:
            self.scaler.unscale_(self.opt)  # clip true gradients, not scaled ones
        if self.clip_grad > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.state.step += 1
        if self.sched is not None and self.sched_per_step:
            self.sched.step()
        if self.ema is not None:
            self.ema.update(self.model, step=self.state.step)

    def end_epoch(self) -> dict:
        st = self.state
        r = st.running
        keys = sorted(r["logs"])  # the same on every rank: every rank ran the same task
        sums = distributed.all_sum(self.dist, [r["loss_sum"], r["n"], *(r["logs"][k] for k in keys)])
        n = max(sums[1], 1)
        row = {"epoch": st.epoch + 1, "lr": self.lr, "train_loss": sums[0] / n,
               **{f"train_{k}": v / n for k, v in zip(keys, sums[2:])}}
        distributed.average_norm_stats(self.dist, self.model, self.ema.module if self.ema is not None else None)
        if self.val_loader is not None:
            val = self.evaluate(self.val_loader)
            row.update({f"val_{k}": v for k, v in val.items() if k != "n" and isinstance(v, (int, float))})
        row["time"] = r["time"]
        self.fire("on_eval_end", row=row)
        value = row.get(self.monitor)
        if self.sched is not None and not self.sched_per_step:  # reduce-on-plateau: once per epoch, on the monitor
            self.sched.step(value if value is not None else row["train_loss"])
        improved, tie = self.improved(value, row.get("val_loss"))
        st.bad_epochs = 0 if improved and not tie else st.bad_epochs + 1  # a tie is no progress for early stopping
        if improved:
            st.best, st.best_epoch, st.best_loss = value, st.epoch + 1, row.get("val_loss")
        st.history.append(row)
        st.epoch += 1
        st.batch = 0
        st.running = new_running()
        if self.epoch_checkpoints:
            self.save("last.pt")
        if improved:
            self.save("best.pt")
        return row

    def improved(self, value: float | None, loss: float | None) -> tuple[bool, bool]:
        """(is this epoch the new best, is it only by a tie). Better on the monitor wins; on a tie (accuracies on
        small validation sets tie often) a validation loss at least as low wins, so the later epoch is kept when
        the loss does not say otherwise: the early epoch of a tie is rarely the model one wants. Without a value
        (no validation) the latest epoch is the best we know."""
        st = self.state
        if value is None or st.best is None:
            return True, False
        if value != st.best:
            return (value < st.best if self.monitor_mode == "min" else value > st.best), False
        return loss is None or st.best_loss is None or loss <= st.best_loss, True

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, loader, model: nn.Module | None = None, full: bool = False) -> dict:
        return evaluate(model or self.eval_model, self.task, loader, self.autocast, tta=self.tta, full=full,
                        dist=self.dist)

    # ---------------------------------------------------------------- checkpoints
    def checkpoint(self) -> dict:
        st = asdict(self.state)
        r = st["running"]
        st["running"] = {**{k: float(v) if torch.is_tensor(v) else v for k, v in r.items() if k != "logs"},
                         "logs": {k: float(v) for k, v in r["logs"].items()}}
        return {
            "format_version": FORMAT_VERSION,
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict() if self.sched is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "state": st,
            "rng": rng_state(),
            **self.meta,
        }

    def save(self, name: str, collective: bool = True) -> None:
        """Rank 0 writes the checkpoint. With several ranks it also holds every rank's RNG state (gathered: every
        rank calls ``save`` at the same points), so that a resume on as many ranks continues each rank's stream."""
        if self.run_dir is None:
            return
        rngs = None
        if collective and self.dist.world > 1:
            distributed.average_norm_stats(self.dist, self.model, self.ema.module if self.ema is not None else None)
            rngs = distributed.gather(self.dist, rng_state())
        if self.dist.is_main:
            ckpt = self.checkpoint()
            if rngs is not None:
                ckpt["rng_ranks"] = rngs
            atomic_save(ckpt, self.run_dir / name)
            self.fire("on_save", name=name)

    def load_state(self, ckpt: dict) -> None:
        """Restore everything a checkpoint holds, so that ``fit`` continues where it stopped."""
        self.model.load_state_dict(ckpt["model"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.module.load_state_dict(ckpt["ema"])
        self.opt.load_state_dict(ckpt["optimizer"])
        if self.sched is not None and ckpt.get("scheduler") is not None:
            self.sched.load_state_dict(ckpt["scheduler"])
        if self.scaler and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state = State(**upgrade_state(ckpt["state"]))
        ranks = ckpt.get("rng_ranks") or []
        if len(ranks) == self.dist.world:  # resumed on as many ranks as wrote it: each rank's own stream
            set_rng_state(ranks[self.dist.rank])
        else:  # rank 0's stream; the other ranks branch off it (their dropout masks must differ from rank 0's)
            set_rng_state(ckpt["rng"])
            distributed.seed_rank(self.state.step, self.dist)


@torch.no_grad()
def evaluate(model: nn.Module, task, loader, autocast: Callable = contextlib.nullcontext, tta: bool = False,
             full: bool = False, dist: Dist | None = None) -> dict:
    """One pass over ``loader`` with ``model`` in eval mode; returns the task's metrics. With ``dist``, each rank
    scores its part of the data and the counts are summed: every rank returns the totals of the whole split."""
    was_training = model.training
    model.eval()
    metrics = task.new_metrics()
    for x, y in loader.epoch(0):
        with autocast():
            out = task.predict(model, x, tta=tta)
        metrics.update(out, y)
    model.train(was_training)
    if dist is not None and dist.enabled:
        metrics.sync(dist, lists=full)
    return metrics.compute(full=full)
