"""A time budget instead of an epoch count: measure a few real steps, then fit the schedule to the epochs that fit.

``--budget-min M`` (``train.budget_min``) means "the best model this machine trains in M minutes, evaluation
included": how many epochs that is differs 10x between a CPU with native bf16 and one without, and more with a GPU.
``plan`` times a few optimizer steps and a few evaluation batches with the run's own model, data and precision
(the model, optimizer and RNGs are put back afterwards, so the run starts exactly as it would have), then returns
the number of whole epochs that fit in what is left of the budget after the final test pass and the report.
The caller lays the schedule (warmup as the same fraction of the run, decay to the end) over those epochs.

A plan from a few steps cannot see what changes later (another job taking a core, a machine whose speed drifts: the
same seg-cpu step took ~265 ms and, an hour later, ~350 ms here), so :class:`Keeper` plans again after every epoch from
the epochs' measured wall time, as Ultralytics' ``time=`` does: fewer epochs when the rest would overrun, more when
two epochs say time is left over. The caller's ``relayout`` lays the schedule out over the new length (a lengthened
cosine takes the lr back up to where the longer run would be; a seg-cpu run that stopped at 4 epochs with 80 s unused
showed that lengthening only in the first half cost more than that bump).

Example::

    p = plan(trainer, budget_s=300, elapsed_s=12.0, test_batches=40)
    p.epochs, p.step_s
    trainer.callbacks.append(Keeper(p, t_start, relayout=lambda epochs: ...))
"""
from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import asdict, dataclass

import torch

from . import distributed
from .checkpoint import rng_state, set_rng_state
from .events import Callback

RESERVE = 0.05  # of the budget, kept back for what the estimate cannot see (checkpoints, the summary, noise)


@dataclass
class Plan:
    epochs: int
    step_s: float  # seconds per optimizer step (after warm-up)
    eval_batch_s: float  # seconds per evaluation batch
    epoch_s: float  # one epoch: its steps and its validation pass
    final_s: float  # after training: the test pass and the report (estimated)
    budget_s: float
    elapsed_s: float  # spent before training (data, model, this measurement)

    def to_dict(self) -> dict:
        return asdict(self)


def _time_steps(trainer, n: int) -> float:
    """Seconds per step (the median) over ``n`` real optimizer steps after 2 warm-up steps, the batch's loading and
    augmentation included; everything is restored after."""
    model, opt = trainer.forward_model, trainer.opt  # no DDP wrapper: rank 0 measures alone
    saved_model, saved_opt = copy.deepcopy(trainer.model.state_dict()), copy.deepcopy(opt.state_dict())
    rng = rng_state()
    times = []
    try:
        trainer.forward_model.train()
        batches = trainer.train_loader.epoch(0)
        for _ in range(n + 2):
            t0 = time.perf_counter()  # the batch's loading and augmentation are part of a step's cost
            batch = next(batches, None)
            if batch is None:
                break
            if trainer.batch_transform is not None:
                batch = trainer.batch_transform(batch)
            with trainer.autocast():
                loss = trainer.task.training_step(model, batch)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        batches.close()
    finally:
        trainer.model.load_state_dict(saved_model)
        opt.load_state_dict(saved_opt)
        opt.zero_grad(set_to_none=True)
        set_rng_state(rng)
    steady = sorted(times[2:] or times)  # the median: one slow step (an allocator growing, a neighbour) is not the rule
    return steady[len(steady) // 2] if steady else 0.0


@torch.no_grad()
def _time_eval(trainer, loader, n: int = 4) -> float:
    model = trainer.eval_model
    was = model.training
    model.eval()
    times = []
    batches = loader.epoch(0)
    for i, (x, _) in enumerate(batches):
        if i >= n + 1:
            break
        t0 = time.perf_counter()
        with trainer.autocast():
            trainer.task.predict(model, x, tta=trainer.tta)
        times.append(time.perf_counter() - t0)
    batches.close()
    model.train(was)
    steady = times[1:] or times
    return sum(steady) / max(len(steady), 1)


def plan(trainer, budget_s: float, elapsed_s: float, test_batches: int = 0, report_s: float = 0.0,
         steps: int = 6) -> Plan:
    """How many epochs of ``trainer`` fit in ``budget_s`` seconds, ``elapsed_s`` of which are already spent."""
    t0 = time.perf_counter()
    step_s = _time_steps(trainer, steps) * trainer.grad_accum
    eval_s = 0.0
    loader = trainer.val_loader or trainer.train_loader
    eval_batch_s = _time_eval(trainer, loader)
    if trainer.val_loader is not None:
        eval_s = eval_batch_s * len(trainer.val_loader)
    epoch_s = step_s * trainer.steps_per_epoch + eval_s
    final_s = eval_batch_s * test_batches + report_s
    spent = elapsed_s + (time.perf_counter() - t0)
    left = budget_s * (1 - RESERVE) - spent - final_s
    epochs = max(1, math.floor(left / max(epoch_s, 1e-9)))
    return Plan(epochs, step_s, eval_batch_s, epoch_s, final_s, budget_s, spent)


class Keeper(Callback):
    """Keeps a budgeted run within its budget: after each epoch's evaluation (before its checkpoint, so that a resume
    sees the new length) it counts the epochs that still fit from the mean wall time of the last three epochs and,
    when that differs from ``trainer.epochs``, calls ``relayout(epochs)`` (which sets ``trainer.epochs`` and lays the
    schedule out again). Rank 0 decides, every rank follows. ``changes`` records (after epoch, new epochs)."""

    def __init__(self, plan: Plan, t_start: float, relayout, quiet: bool = False):
        self.plan, self.t_start, self.relayout, self.quiet = plan, t_start, relayout, quiet
        self.times: list[float] = []
        self.last = time.perf_counter()
        self.changes: list[tuple[int, int]] = []

    def on_fit_start(self, trainer) -> None:
        self.last = time.perf_counter()

    def pace(self) -> float:
        """Mean wall seconds of the last three epochs."""
        recent = self.times[-3:]
        return sum(recent) / len(recent)

    def epochs_now(self, done: int, planned: int, now: float) -> int:
        left = self.plan.budget_s * (1 - RESERVE) - (now - self.t_start) - self.plan.final_s
        recent = self.times[-3:]
        fit = done + max(0, math.floor(left / max(self.pace(), 1e-9)))  # at the recent mean pace
        if fit < planned:
            return fit
        # lengthen only on two epochs' evidence and at the slowest recent pace: epoch times on a shared machine swing
        # by 20-30%, and one quick epoch must not buy an epoch that overruns
        sure = done + max(0, math.floor(left / max(max(recent), 1e-9)))
        return sure if len(self.times) >= 2 and sure > planned else planned

    def on_eval_end(self, trainer, row: dict) -> None:
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now
        done, planned = trainer.state.epoch + 1, trainer.epochs
        if done >= planned:
            return
        epochs = distributed.on_main(trainer.dist, lambda: self.epochs_now(done, planned, now))
        if epochs == planned:
            return
        self.relayout(epochs)
        self.changes.append((done, epochs))
        trainer.meta.setdefault("budget", {})["changes"] = list(self.changes)
        if not self.quiet:
            why = "the rest would overrun the budget" if epochs < planned else "time is left over"
            print(f"budget: {epochs} epochs instead of {planned} ({why}; {self.pace():.1f} s/epoch measured)",
                  file=sys.stderr)
