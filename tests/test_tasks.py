"""The task plug-in contract: a task the engine has never heard of trains, resumes exactly and logs its own metrics;
the engine imports nothing from tasks/; the monitored metric is checked before training; ties keep the later epoch."""
from __future__ import annotations

import ast
import csv
import dataclasses
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import visionkit
from visionkit.cli import main
from visionkit.config import ConfigError
from visionkit.engine import Callback, Trainer
from visionkit.engine.checkpoint import load_checkpoint
from visionkit.engine.events import CSVLogger
from visionkit.engine.loop import State, upgrade_state
from visionkit.tasks import monitor_for

ENGINE = Path(visionkit.__file__).parent / "engine"


# ------------------------------------------------------------------------------------------------ a toy task
class MeanBrightness:
    """Regress each image's mean brightness: not classification, not segmentation. Targets are dicts (a tree)."""

    name = "brightness"
    monitor = ("val_mae", "min")
    log_names = ("abs_err",)
    metric_names = ("loss", "mae")
    show = ()

    def training_step(self, model, batch):
        x, y = batch
        pred = model(x).squeeze(1)
        err = pred - y["mean"]
        return {"loss": (err ** 2).mean(), "n": x.shape[0], "logs": {"abs_err": err.detach().abs().sum()}}

    def predict(self, model, x, tta=False):
        return model(x).squeeze(1)

    def new_metrics(self):
        return MAE()


class MAE:
    def __init__(self):
        self.sq = self.abs = 0.0
        self.n = 0

    def update(self, pred, y):
        err = pred.float() - y["mean"]
        self.sq += float((err ** 2).sum())
        self.abs += float(err.abs().sum())
        self.n += len(err)

    def sync(self, dist, lists=False):
        from visionkit.engine.distributed import all_sum
        self.sq, self.abs, self.n = all_sum(dist, [self.sq, self.abs, self.n])

    def compute(self, full=False):
        return {"loss": self.sq / max(self.n, 1), "mae": self.abs / max(self.n, 1), "n": self.n}


class Batches:
    """The engine's loader interface (len, epoch(e, start)) over fixed random images; order reshuffled per epoch."""

    def __init__(self, n: int = 48, batch: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 1, 8, 8, generator=g)
        self.batch = batch

    def __len__(self):
        return math.ceil(len(self.x) / self.batch)

    def epoch(self, e: int, start: int = 0):
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(e))
        for b in range(start, len(self)):
            idx = order[b * self.batch:(b + 1) * self.batch]
            x = self.x[idx]
            yield x, {"mean": x.mean((1, 2, 3))}


def toy_trainer(run_dir: Path, epochs: int = 3, callbacks=()) -> Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Dropout(0.1), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    task = MeanBrightness()
    return Trainer(model=model, task=task, optimizer=opt, train_loader=Batches(), val_loader=Batches(16, seed=1),
                   epochs=epochs, device=torch.device("cpu"), monitor="val_mae", monitor_mode="min", save_every=2,
                   run_dir=run_dir, callbacks=[CSVLogger(run_dir / "metrics.csv"), *callbacks])


def test_a_task_the_engine_does_not_know_trains_logs_and_resumes_exactly(tmp_path):
    full = toy_trainer(tmp_path / "full")
    full.fit()
    rows = list(csv.DictReader((tmp_path / "full" / "metrics.csv").read_text().splitlines()))
    assert len(rows) == 3
    assert {"train_loss", "train_abs_err", "val_loss", "val_mae"} <= set(rows[0])  # its own columns, none dropped
    assert float(rows[-1]["val_mae"]) < float(rows[0]["val_mae"])  # it learns

    class Stop(Exception):
        pass

    class StopAt(Callback):
        def on_step_end(self, trainer, batch, n_batches):
            if trainer.state.step == 10:  # epoch 2, mid-epoch (6 steps an epoch); the last save was at step 8
                raise Stop

    part = toy_trainer(tmp_path / "part", callbacks=[StopAt()])
    with pytest.raises(Stop):
        part.fit()
    ck = load_checkpoint(tmp_path / "part" / "last.pt")
    assert (ck["state"]["epoch"], ck["state"]["batch"]) == (1, 2)
    resumed = toy_trainer(tmp_path / "part")
    resumed.load_state(ck)
    resumed.fit()
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert resumed.state.history[-1]["val_mae"] == full.state.history[-1]["val_mae"]
    assert resumed.state.history[-1]["train_abs_err"] == pytest.approx(full.state.history[-1]["train_abs_err"],
                                                                      rel=1e-6)


def test_engine_imports_nothing_from_tasks():
    for f in ENGINE.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = ("." * node.level) + (node.module or "")
                assert "tasks" not in mod, f"{f.name} imports {mod}"
            elif isinstance(node, ast.Import):
                assert not any("tasks" in a.name for a in node.names), f.name


def test_monitor_is_checked_before_training():
    task = MeanBrightness()
    assert monitor_for(task, "auto", "auto", True) == ("val_mae", "min")
    assert monitor_for(task, "auto", "auto", False) == ("train_loss", "min")
    assert monitor_for(task, "train_abs_err", "auto", True) == ("train_abs_err", "max")
    assert monitor_for(task, "val_mae", "max", True) == ("val_mae", "max")
    assert monitor_for(task, "epoch", "auto", False) == ("epoch", "max")  # keep the latest epoch
    with pytest.raises(ConfigError, match="val_acc.*not a metric.*choose from"):
        monitor_for(task, "val_acc", "auto", True)
    with pytest.raises(ConfigError, match="no validation split"):
        monitor_for(task, "val_mae", "auto", False)


def test_unknown_monitor_is_one_line_and_leaves_no_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--data", "digits", "--model", "lenet", "--epochs", "1", "--out", str(out),
                 "--set", "train.monitor=val_acc"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "val_acc1" in err[0]
    assert not out.exists()


def test_a_tie_keeps_the_later_epoch_unless_its_loss_is_worse(tmp_path):
    t = toy_trainer(tmp_path, epochs=1)
    t.monitor, t.monitor_mode = "val_acc1", "max"
    t.state.best, t.state.best_loss = 0.9, 0.30
    assert t.improved(0.9, 0.25) == (True, True)  # tie, lower loss: the later epoch
    assert t.improved(0.9, 0.30) == (True, True)  # tie, same loss: the later epoch
    assert t.improved(0.9, 0.35) == (False, True)  # tie, higher loss: keep the earlier
    assert t.improved(0.91, 0.50) == (True, False)
    assert t.improved(0.89, 0.10) == (False, False)


def test_checkpoints_from_before_the_plug_ins_still_load():
    old = {"epoch": 1, "batch": 3, "step": 7, "best": 0.5, "best_epoch": 1, "bad_epochs": 0, "history": [],
           "running": {"loss_sum": 2.0, "correct": 5, "n": 8, "time": 1.0}, "stop": False}
    st = State(**upgrade_state(old))
    assert st.running["logs"] == {"acc": 5} and st.best_loss is None


def test_task_is_inferred_recorded_and_checked(tmp_path, capsys):
    from visionkit.api import resolve_run
    cfg, _ = resolve_run("digits", None, None, None, None, None, {})
    assert (cfg.task, cfg.model.name) == ("classify", "resnet18")
    cfg, _ = resolve_run("seg-shapes", None, None, None, None, None, {})
    assert (cfg.task, cfg.model.name) == ("segment", "unet")
    cfg, _ = resolve_run("det-shapes", None, None, None, None, None, {})
    assert (cfg.task, cfg.model.name) == ("detect", "tinyssd")
    cases = [(["--data", "digits", "--task", "segment"], "does not fit digits"),
             (["--data", "seg-shapes", "--task", "classify"], "segmentation data set"),
             (["--data", "digits", "--set", "segment.loss=dice"], "belongs to the segment task"),
             (["--data", "seg-shapes", "--set", "train.label_smoothing=0.1"], "belongs to the classify task"),
             (["--data", "digits", "--task", "detect"], "does not fit digits"),
             (["--data", "digits", "--task", "track"], "must be one of auto, classify, segment, detect")]
    for args, msg in cases:
        out = tmp_path / "run"
        code = main(["train", *args, "--epochs", "1", "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and msg in err[0], (args, err)
        assert not out.exists()


def test_old_task_name_in_a_config_is_read(tmp_path):
    from visionkit.config import resolve_config
    cfg = resolve_config(base={"task": "classification", "train": {"monitor": "val_acc1"}})
    assert cfg.task == "classify"


def test_bf16_on_a_cpu_without_it_warns_with_the_measured_factor(monkeypatch, capsys):
    from visionkit.core import runtime
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(runtime, "cpu_bf16_slowdown", lambda: 250.0)
    assert runtime.amp_dtype("auto", torch.device("cpu")) is None  # auto means fp32 there
    assert runtime.amp_dtype("bf16", torch.device("cpu")) == torch.bfloat16  # honoured, loudly
    err = capsys.readouterr().err
    assert "WARNING" in err and "250x slower" in err


def test_recipes_say_auto_precision():
    from visionkit.config import RECIPE_DIR
    for p in RECIPE_DIR.glob("*.yaml"):
        amp = (yaml.safe_load(p.read_text()).get("train") or {}).get("amp", "auto")
        assert amp == "auto", f"{p.name} forces train.amp={amp}"


def test_a_time_budget_sets_the_epochs_and_records_them(tmp_path):
    run = visionkit.train("digits", "lenet", out=str(tmp_path / "b"), overrides={
        "train.budget_min": 0.25, "data.img_size": 16, "train.report": False, "data.batch_size": 64,
        "sched.warmup_epochs": 2}, quiet=True)
    cfg = yaml.safe_load((run.dir / "config.yaml").read_text())
    ck = load_checkpoint(run.dir / "last.pt")
    planned = ck["budget"]["epochs"]
    final = ck["budget"]["changes"][-1][1] if ck["budget"].get("changes") else planned
    assert cfg["train"]["epochs"] == final == run.summary["epochs_run"] >= 1
    assert ck["config"]["train"]["epochs"] == final
    # the warmup is the same fraction of the run (2 of the nominal 10 epochs) and recorded, so a resume rebuilds it
    assert cfg["sched"]["warmup_epochs"] == ck["config"]["sched"]["warmup_epochs"] == pytest.approx(2 * final / 10)
    assert ck["budget"]["step_s"] > 0 and ck["budget"]["budget_s"] == 15


def test_the_budget_is_planned_again_after_every_epoch():
    """A first plan that was too hopeful (its steps ran in a quiet moment) is cut back, one that left time over is
    lengthened once two epochs say so, at the slowest pace they showed."""
    from visionkit.engine.budget import Keeper, Plan
    p = Plan(epochs=10, step_s=0.1, eval_batch_s=0.1, epoch_s=10.0, final_s=5.0, budget_s=100.0, elapsed_s=0.0)
    k = Keeper(p, t_start=0.0, relayout=None)
    k.times = [20.0, 20.0]  # epochs take twice the plan: at 40 s, (95 - 40 - 5) / 20 = 2.5 more fit
    assert k.epochs_now(done=2, planned=10, now=40.0) == 4
    k.times = [5.0, 5.0]  # half the plan: at 10 s, (95 - 10 - 5) / 5 = 16 more fit
    assert k.epochs_now(done=2, planned=10, now=10.0) == 18
    assert k.epochs_now(done=6, planned=10, now=10.0) == 22  # late in the run too, as long as epochs remain
    k.times = [5.0]  # one quick epoch is not evidence enough to lengthen
    assert k.epochs_now(done=1, planned=10, now=5.0) == 10
    k.times = [4.0, 8.0]  # lengthening goes by the slowest recent epoch: (95 - 12 - 5) / 8 = 9.75
    assert k.epochs_now(done=2, planned=10, now=12.0) == 11
    k.times = [50.0]  # nothing more fits: end after this epoch
    assert k.epochs_now(done=1, planned=10, now=90.0) == 1


def test_a_budget_run_cut_short_ends_in_time_with_its_schedule_laid_out_again(tmp_path, monkeypatch, capsys):
    import time as _time

    from visionkit.engine import budget
    real = budget.plan

    def hopeful(trainer, *a, **kw):  # the first plan thinks 40 epochs fit
        return dataclasses.replace(real(trainer, *a, **kw), epochs=40)
    monkeypatch.setattr(budget, "plan", hopeful)
    t0 = _time.perf_counter()
    run = visionkit.train("digits", "lenet", out=str(tmp_path / "b"), overrides={
        "train.budget_min": 0.1, "data.img_size": 16, "train.report": False, "data.batch_size": 64,
        "sched.name": "cosine", "sched.warmup_epochs": 0}, quiet=False)
    assert _time.perf_counter() - t0 < 0.1 * 60 + 3
    ck = load_checkpoint(run.dir / "last.pt")
    done = run.summary["epochs_run"]
    assert ck["budget"]["epochs"] == 40 and ck["budget"]["changes"][0][1] < 40
    assert ck["config"]["train"]["epochs"] == done == ck["budget"]["changes"][-1][1]
    assert "instead of 40" in capsys.readouterr().err
    with open(run.dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["lr"]) < 0.2 * float(rows[0]["lr"])  # the cosine decayed over the shortened run
