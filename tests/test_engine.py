import pickle

import pytest
import torch
from torch import nn

from visionkit.config import OptimConfig, SchedConfig
from visionkit.engine import (
    Callback,
    CheckpointError,
    Trainer,
    atomic_save,
    build_optimizer,
    build_scheduler,
    load_checkpoint,
)
from visionkit.engine.events import EarlyStopping
from visionkit.tasks import ClassificationTask


class ToyLoader:
    """Linearly separable 2-class data; batches a pure function of (epoch, index), like the real loaders."""

    def __init__(self, n=256, batch=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.y = (self.x[:, 0] + 0.5 * self.x[:, 1] > 0).long()
        self.batch = batch

    def __len__(self):
        return len(self.x) // self.batch

    def epoch(self, epoch, start=0):
        perm = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(epoch))
        for i in range(start, len(self)):
            idx = perm[i * self.batch:(i + 1) * self.batch]
            yield self.x[idx], self.y[idx]


def make_trainer(tmp_path=None, epochs=3, accum=1, batch=32, lr=0.5, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = build_optimizer(model, OptimConfig(name="sgd", lr=lr, momentum=0.0, nesterov=False, weight_decay=0.0))
    loader = ToyLoader(batch=batch)
    return Trainer(model=model, task=ClassificationTask(2), optimizer=opt, train_loader=loader,
                   val_loader=ToyLoader(n=128, batch=64, seed=1), epochs=epochs, device=torch.device("cpu"),
                   grad_accum=accum, run_dir=tmp_path, **kw)


def test_optimizer_keeps_norms_and_biases_out_of_weight_decay():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(2))
    m(torch.randn(1, 3, 8, 8))
    opt = build_optimizer(m, OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05))
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decay == {id(m[0].weight), id(m[3].weight)}
    sgd = build_optimizer(m, OptimConfig(name="sgd", lr=0.1, nesterov=True))
    assert sgd.param_groups[0]["nesterov"] is True


@pytest.mark.parametrize("name", ["cosine", "linear", "onecycle", "step", "multistep", "cosine_restarts", "constant"])
def test_schedules_warm_up_and_end_where_expected(name):
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched, per_step = build_scheduler(opt, SchedConfig(name=name, warmup_epochs=1, step_epochs=2, milestones=[2],
                                                        restart_epochs=2), epochs=4, steps_per_epoch=10, lr=0.1)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert per_step
    assert lrs[0] < 0.05 and max(lrs) == pytest.approx(0.1, rel=0.05)  # warmup (onecycle: its own) up to lr
    if name in ("cosine", "linear", "onecycle"):
        assert lrs[-1] < 0.01
    if name in ("step", "multistep"):
        assert lrs[19] == pytest.approx(0.1) and lrs[20] == pytest.approx(0.01)  # drop at epoch 2 exactly


def test_plateau_steps_per_epoch():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched, per_step = build_scheduler(opt, SchedConfig(name="plateau", patience=0), 3, 10, 0.1)
    assert not per_step
    sched.step(0.5)
    sched.step(0.5)
    assert opt.param_groups[0]["lr"] < 0.1


def test_atomic_save_never_leaves_half_a_file(tmp_path, monkeypatch):
    p = tmp_path / "last.pt"
    atomic_save({"model": {"w": torch.ones(2)}, "format_version": 1}, p)

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        atomic_save({"model": {"w": torch.zeros(2)}, "format_version": 1}, p)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(p)["model"]["w"], torch.ones(2))
    assert [f.name for f in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_load_refuses_pickles_truncation_and_foreign_files(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"model": Evil(), "format_version": 1}, evil)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(evil)
    good = tmp_path / "good.pt"
    atomic_save({"model": {"w": torch.randn(100)}, "format_version": 1}, good)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(trunc)
    other = tmp_path / "sd.pt"
    torch.save({"w": torch.ones(1)}, other)
    with pytest.raises(CheckpointError, match="not a visionkit checkpoint"):
        load_checkpoint(other)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "plain.pt").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "plain.pt")


def test_trainer_learns_and_writes_checkpoints(tmp_path):
    t = make_trainer(tmp_path, epochs=3)
    last = t.fit()
    assert len(t.state.history) == 3 and last["val_acc1"] > 0.9 and last["train_loss"] < 0.4
    assert (tmp_path / "last.pt").exists() and (tmp_path / "best.pt").exists()
    ck = load_checkpoint(tmp_path / "last.pt")
    assert ck["state"]["epoch"] == 3 and ck["state"]["step"] == 3 * 8


def test_grad_accumulation_matches_a_bigger_batch():
    # mean-reduced loss over 2 x 16 accumulated == one batch of 32 (no BN, plain SGD)
    a = make_trainer(epochs=1, accum=2, batch=16)
    b = make_trainer(epochs=1, accum=1, batch=32)
    # same sample order: batch-16 loader with perm p gives batches p[0:16], p[16:32] ~ batch-32's p[0:32]
    a.fit()
    b.fit()
    assert a.state.step == b.state.step == 8
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_resume_mid_epoch_is_exact(tmp_path):
    full = make_trainer(None, epochs=2)
    full.fit()
    part = make_trainer(tmp_path, epochs=2, save_every=3)
    # run one epoch and a bit: stop by raising after step 11 (epoch 2, batch 3), like a SIGKILL after a save
    class Kill(Exception):
        pass

    class KillAtStep12(Callback):
        def on_step_end(self, trainer, batch, n_batches):
            if trainer.state.step == 12:
                raise Kill
    part.callbacks.append(KillAtStep12())
    with pytest.raises(Kill):
        part.fit()
    ck = load_checkpoint(tmp_path / "last.pt")
    assert ck["state"]["epoch"] == 1 and ck["state"]["batch"] == 1  # saved at step 9 (epoch 2, batch 1)
    resumed = make_trainer(tmp_path, epochs=2)
    resumed.load_state(ck)
    resumed.fit()
    for pa, pb in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(pa, pb)
    assert resumed.state.history[-1]["val_loss"] == full.state.history[-1]["val_loss"]
    assert resumed.state.history[-1]["train_loss"] == pytest.approx(full.state.history[-1]["train_loss"], rel=1e-6)


def test_early_stopping_and_ema(tmp_path):
    from timm.utils import ModelEmaV3
    t = make_trainer(tmp_path, epochs=20, lr=1e-6, monitor="val_acc1", callbacks=[EarlyStopping(2)])
    t.ema = ModelEmaV3(t.model, decay=0.9)
    t.fit()
    assert t.state.stop and len(t.state.history) < 20
    ck = load_checkpoint(tmp_path / "best.pt")
    assert ck["ema"] is not None
