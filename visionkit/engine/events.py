"""Events and the callbacks that hang on them.

The events, in the order they fire: on_fit_start, on_epoch_start, on_step_end, on_eval_end, on_epoch_end, on_save,
on_fit_end (and on_interrupt on Ctrl-C). A callback overrides the ones it needs; each gets the Trainer, whose
``state`` it may read (and, for control such as early stopping, set ``state.stop``).
"""
from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path

from ..core.rundir import atomic_write_bytes


def columns(rows: list[dict]) -> list[str]:
    """metrics.csv's columns: the union of the rows' keys, in the order they first appear (``time`` last)."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    return [c for c in cols if c != "time"] + (["time"] if "time" in cols else [])


class Callback:
    def on_fit_start(self, trainer) -> None: ...
    def on_epoch_start(self, trainer) -> None: ...
    def on_step_end(self, trainer, batch: int, n_batches: int) -> None: ...
    def on_eval_end(self, trainer, row: dict) -> None: ...
    def on_epoch_end(self, trainer, row: dict) -> None: ...
    def on_save(self, trainer, name: str) -> None: ...
    def on_interrupt(self, trainer) -> None: ...
    def on_fit_end(self, trainer) -> None: ...


class EarlyStopping(Callback):
    """Stop when the monitored metric has not improved for ``patience`` epochs (the Trainer tracks improvement)."""

    def __init__(self, patience: int):
        self.patience = patience

    def on_epoch_end(self, trainer, row: dict) -> None:
        if self.patience and trainer.state.bad_epochs >= self.patience:
            trainer.state.stop = True  # on every rank: they all see the same (reduced) metrics
            if getattr(trainer, "dist", None) is None or trainer.dist.is_main:
                print(f"early stopping: {trainer.monitor} has not improved for {self.patience} epochs "
                      f"(best {trainer.state.best:.4f} at epoch {trainer.state.best_epoch})", file=sys.stderr)


class CSVLogger(Callback):
    """metrics.csv, rewritten from the history each epoch (so a resumed run's file has each epoch exactly once).
    Its columns are whatever the task logged and its evaluator returned: nothing is dropped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_epoch_end(self, trainer, row: dict) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=columns(trainer.state.history), lineterminator="\n")
        w.writeheader()
        for r in trainer.state.history:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
        atomic_write_bytes(self.path, buf.getvalue().encode())


class TensorBoardLogger(Callback):
    """TensorBoard scalars per epoch (train/val loss and accuracy, lr). The writer is created lazily."""

    def __init__(self, log_dir: str | Path):
        self.log_dir = str(log_dir)
        self.writer = None

    def on_epoch_end(self, trainer, row: dict) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter  # imported here: it is slow to import
            self.writer = SummaryWriter(self.log_dir)
        for k, v in row.items():
            if k != "epoch" and isinstance(v, (int, float)):
                self.writer.add_scalar(k.replace("_", "/", 1), v, row["epoch"])
        self.writer.flush()

    def on_fit_end(self, trainer) -> None:
        if self.writer is not None:
            self.writer.close()


class Progress(Callback):
    """A tqdm bar per epoch with the loss, the task's logged values, lr, images/s and ETA; or, quiet, one line per
    epoch: the train columns, val_loss, the monitored metric and the task's default one (plus its ``show`` columns)."""

    def __init__(self, quiet: bool = False, every: int = 20):
        self.quiet, self.every, self.bar = quiet, every, None

    def on_epoch_start(self, trainer) -> None:
        self.t0, self.n0 = time.perf_counter(), trainer.state.running["n"]
        if not self.quiet and sys.stderr.isatty():  # logs and CI get the one line per epoch only
            from tqdm.auto import tqdm
            st = trainer.state
            self.bar = tqdm(total=len(trainer.train_loader), initial=st.batch, leave=False, dynamic_ncols=True,
                            desc=f"epoch {st.epoch + 1}/{trainer.epochs}", file=sys.stderr, unit="batch")

    def on_step_end(self, trainer, batch: int, n_batches: int) -> None:
        if self.bar is None or (batch % self.every and batch != n_batches):
            return
        r = trainer.state.running
        n = max(int(r["n"]), 1)
        ips = (r["n"] - self.n0) / max(time.perf_counter() - self.t0, 1e-9)
        logs = {k: f"{float(v) / n:.3f}" for k, v in r["logs"].items()}
        self.bar.set_postfix(loss=f"{float(r['loss_sum']) / n:.4f}", **logs, lr=f"{trainer.lr:.2e}",
                             img_s=f"{ips:.0f}", refresh=False)
        self.bar.update(batch - self.bar.n)

    def on_epoch_end(self, trainer, row: dict) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        every = -(-trainer.epochs // 20)  # at most ~20 lines (a linear probe runs many epochs of milliseconds)
        if row["epoch"] % every and row["epoch"] not in (1, trainer.epochs):
            return
        shown = [k for k in row if k.startswith("train_")]
        default = getattr(trainer.task, "monitor", (None,))[0]  # shown even when the run monitors another column
        shown += [k for k in ("val_loss", trainer.monitor, default, *getattr(trainer.task, "show", ()))
                  if k in row and k != "epoch"]
        parts = [f"epoch {row['epoch']}/{trainer.epochs}"]
        parts += [f"{k} {row[k]:.4f}" for k in dict.fromkeys(shown)]
        parts += [f"lr {row['lr']:.2e}", f"{row['time']:.1f}s"]
        print("  ".join(parts), file=sys.stderr, flush=True)

    def on_interrupt(self, trainer) -> None:
        if self.bar is not None:
            self.bar.close()
