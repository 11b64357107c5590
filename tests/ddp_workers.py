"""Worker functions for tests/test_distributed.py: each runs in a process started by torch.multiprocessing.spawn,
opens a Gloo process group and writes what it measured to ``out/rank{R}.pt`` for the test to compare."""
from __future__ import annotations

import faulthandler
import hashlib
import os
from datetime import timedelta

import torch
import torch.distributed as tdist
from torch import nn

from visionkit.config import OptimConfig
from visionkit.data import build_data, make_loader
from visionkit.engine import Callback, Trainer, build_optimizer, evaluate
from visionkit.engine.distributed import Dist
from visionkit.models import create_model
from visionkit.tasks import ClassificationTask


def _open(rank: int, world: int, port: int) -> Dist:
    # a worker stuck for 3 minutes prints where it is and exits, so the test fails instead of hanging CI
    faulthandler.dump_traceback_later(180, exit=True)
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                             timeout=timedelta(seconds=120))
    return Dist(rank=rank, world=world, local_rank=rank, local_world=world, enabled=True, backend="gloo")


def digest(sd: dict) -> str:
    h = hashlib.sha256()
    for k, v in sd.items():
        h.update(k.encode())
        if torch.is_tensor(v):
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _digits_loader(rank: int, world: int, batch: int, train: bool, split: str = "val", size: int = 8):
    b = build_data("digits", val_split=0.2, seed=0)
    ds = getattr(b, split)
    return make_loader(ds, batch_size=batch, train=train, seed=0, device="cpu", input_size=(1, size, size), mean=(0.5,),
                       std=(0.5,), rank=rank, world=world)


def evaluate_worker(rank: int, world: int, port: int, weights: str, out: str) -> None:
    """Score the same weights on this rank's part of the digits val split (359 images, eval batch 50: the last
    global batch splits unevenly); every rank must return the totals of the whole split."""
    d = _open(rank, world, port)
    model = create_model("lenet", num_classes=10, in_chans=1)
    model.load_state_dict(torch.load(weights, weights_only=True))
    res = evaluate(model, ClassificationTask(10), _digits_loader(rank, world, 50, False, size=32), full=True,
                   dist=d)
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    tdist.destroy_process_group()


class CountAllReduce:
    """A DDP communication hook that counts the all-reduces DDP asks for, then does the default one."""

    def __init__(self):
        self.calls = 0


def counting_hook(state: CountAllReduce, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    state.calls += 1
    return allreduce_hook(None, bucket)


class Unfreeze(Callback):
    """Epoch 1: only the head trains; epoch 2: everything (what staged fine-tuning does)."""

    def on_epoch_start(self, trainer) -> None:
        head_only = trainer.state.epoch == 0
        for name, p in trainer.model.named_parameters():
            p.requires_grad_(name.startswith("head") or not head_only)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.head(self.body(x))


class Register(Callback):
    """Puts the counting hook on each DDP wrapper the trainer builds, before the wrapper's first backward."""

    def __init__(self):
        self.state, self.wrappers = CountAllReduce(), []

    def on_epoch_start(self, trainer) -> None:
        ddp = trainer.train_module()
        if all(ddp is not w for w in self.wrappers):
            ddp.register_comm_hook(self.state, counting_hook)
            self.wrappers.append(ddp)


def trainer_worker(rank: int, world: int, port: int, out: str, accum: int) -> None:
    """Two epochs of a BatchNorm net with EMA and gradient accumulation; the head alone trains in epoch 1.
    Writes the all-reduce count, optimizer steps and digests of the weights and the EMA weights."""
    from timm.utils import ModelEmaV3
    d = _open(rank, world, port)
    model = _Net()
    if rank:  # a different start on rank 1: DDP must hand everyone rank 0's weights
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    from visionkit.engine.distributed import broadcast_module
    broadcast_module(d, model)
    ema = ModelEmaV3(model, decay=0.9)
    opt = build_optimizer(model, OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=0.0))
    hooked = Register()
    train = _digits_loader(rank, world, 32, True, "train")
    trainer = Trainer(model=model, task=ClassificationTask(10), optimizer=opt, train_loader=train,
                      val_loader=_digits_loader(rank, world, 64, False), epochs=2, device=torch.device("cpu"),
                      grad_accum=accum, ema=ema, callbacks=[Unfreeze(), hooked], dist=d)
    trainer.fit()
    torch.save({"calls": hooked.state.calls, "steps": trainer.state.step, "batches": len(train), "wrappers": len(hooked.wrappers),
                "model": digest(model.state_dict()), "ema": digest(ema.module.state_dict()),
                "history": trainer.state.history}, os.path.join(out, f"rank{rank}.pt"))
    tdist.destroy_process_group()


def det_batch(size: int = 64, n: int = 8):
    """``n`` det-shapes images in [0, 1] and their targets (the same on every rank)."""
    from visionkit.tasks.detect.data import make_det_shapes
    x, targets = make_det_shapes(n, seed=1, size=size)
    return x.float() / 255, targets


def det_grads(model: nn.Module, x, targets) -> dict:
    """Gradients of TinySSD's summed losses with BatchNorm frozen (its batch statistics are per rank by design)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    model.zero_grad()
    sum(model(x, targets).values()).backward()
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def det_loss_worker(rank: int, world: int, port: int, out: str) -> None:
    """This rank's half of a batch through TinySSD; gradients averaged over ranks as DDP does."""
    from visionkit.tasks.detect.models import create_det_model
    _open(rank, world, port)
    torch.manual_seed(0)
    model = create_det_model("tinyssd", 5, img_size=64)
    x, targets = det_batch()
    per = len(x) // world
    grads = det_grads(model, x[rank * per:(rank + 1) * per], targets[rank * per:(rank + 1) * per])
    for g in grads.values():
        tdist.all_reduce(g)
        g /= world
    torch.save(grads, os.path.join(out, f"rank{rank}.pt"))
    tdist.destroy_process_group()
