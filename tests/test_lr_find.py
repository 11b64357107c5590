import math
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torch import nn

from visionkit.engine import Trainer
from visionkit.engine.lr_find import LRFindResult, lr_find, plot_lr_find, valley_index
from visionkit.tasks import ClassificationTask

CPU = torch.device("cpu")


class TensorBatches:
    """Like visionkit's Loader: ``len()`` batches per epoch, each a pure function of (seed, epoch, index), and the
    global RNG untouched. Counts the epochs asked for."""

    def __init__(self, x, y, batch=64, seed=0, shuffle=True):
        self.x, self.y, self.batch, self.seed, self.shuffle = x, y, batch, seed, shuffle
        self.epochs_seen = []

    def __len__(self):
        return math.ceil(len(self.x) / self.batch)

    def epoch(self, epoch, start=0):
        self.epochs_seen.append(epoch)
        if self.shuffle:
            order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        else:
            order = torch.arange(len(self.x))
        for b in range(start, len(self)):
            idx = order[b * self.batch:(b + 1) * self.batch]
            yield self.x[idx], self.y[idx]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: one thread is as fast, and does not stall when the machine's cores are busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    tr, va = slice(0, 1400), slice(1400, None)
    mean, std = x[tr].mean(0), x[tr].std(0).clamp_min(1e-3)  # standardized on the training part
    x = (x - mean) / std
    return x[tr], y[tr], x[va], y[va]


def mlp(seed=0, dropout=0.0, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(64, 64)] + ([nn.BatchNorm1d(64)] if bn else []) + [nn.ReLU(), nn.Dropout(dropout),
                                                                          nn.Linear(64, 10)]
    return nn.Sequential(*layers)


def toy(n=96, d=8, classes=4, seed=0):
    """Separable 4-class toy set: the class is the argmax of a fixed linear map."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x @ torch.randn(d, classes, generator=g)).argmax(1)
    return x, y


def same(a, b):
    """Exact, recursive equality of state dicts (tensors compared with torch.equal, dtype and device included)."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(u, v) for u, v in zip(a, b))
    return a == b


def train_val_acc(lr, digits, epochs=3):
    """Train a fresh MLP (same init as in the sweep) with plain SGD at ``lr``; validation top-1."""
    xtr, ytr, xva, yva = digits
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    t = Trainer(model=model, task=ClassificationTask(10), optimizer=opt, train_loader=TensorBatches(xtr, ytr),
                val_loader=TensorBatches(xva, yva, shuffle=False), epochs=epochs, device=CPU)
    row = t.fit()
    return row["val_acc1"] if math.isfinite(row["train_loss"]) else 0.0


def test_digits_suggestion_is_sensible_and_trains_better(digits):
    xtr, ytr, _, _ = digits
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    start_lr, end_lr = 1e-5, 10.0
    res = lr_find(model, ClassificationTask(10), TensorBatches(xtr, ytr), opt, start_lr=start_lr, end_lr=end_lr,
                  num_steps=100)
    assert isinstance(res, LRFindResult)
    assert len(res.lrs) == len(res.losses) == len(res.smoothed) > 20
    assert res.lrs[0] == pytest.approx(start_lr)
    # the loss falls first: well below the start at its minimum (the smoothed curve lags the raw one) ...
    assert min(res.losses) < 0.3 * res.losses[0]
    i_min = min(range(len(res.smoothed)), key=res.smoothed.__getitem__)
    assert res.smoothed[i_min] < 0.75 * res.smoothed[0]
    assert 1e-4 < res.lrs[i_min] < end_lr
    # ... then rises again (or diverges and stops the sweep)
    assert res.stopped_early or max(res.smoothed[i_min:]) > 2 * res.smoothed[i_min]
    assert res.suggestion == res.suggestions["valley"]
    assert set(res.suggestions) == {"valley", "steep", "min/10"}
    for v in res.suggestions.values():
        assert math.isfinite(v) and start_lr <= v <= end_lr
    assert 1e-4 < res.suggestion < 1.0
    # the real check: a short training run at the suggestion beats one at either end of the sweep
    acc_sugg = train_val_acc(res.suggestion, digits)
    acc_start = train_val_acc(start_lr, digits)
    acc_end = train_val_acc(end_lr, digits)
    assert acc_sugg > 0.8
    assert acc_sugg > acc_start + 0.2
    assert acc_sugg > acc_end + 0.2


def test_state_mode_grads_and_rng_restored():
    x, y = toy()
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 4))
    opt = torch.optim.Adam([{"params": model[0].parameters(), "lr": 1e-3},
                            {"params": model[4].parameters(), "lr": 3e-3, "weight_decay": 0.01}])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5)
    task = ClassificationTask(4)
    task.training_step(model, (x[:16], y[:16]))["loss"].backward()  # real optimizer state (Adam moments, step)
    opt.step()
    sched.step()
    task.training_step(model, (x[16:32], y[16:32]))["loss"].backward()  # leave pending grads too
    grads = [p.grad.clone() for p in model.parameters()]
    model.eval()
    model_before = {k: v.clone() for k, v in model.state_dict().items()}
    import copy

    opt_before = copy.deepcopy(opt.state_dict())
    sched_before = copy.deepcopy(sched.state_dict())
    rng_before = torch.get_rng_state()

    res = lr_find(model, task, TensorBatches(x, y, batch=16), opt, num_steps=30, end_lr=1.0)
    assert len(res.lrs) > 0

    assert same(model.state_dict(), model_before)
    assert same(opt.state_dict(), opt_before)
    assert same(sched.state_dict(), sched_before)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 3e-3]  # the groups' own lrs, not the sweep's
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert not model.training and not any(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng_before)  # the sweep's dropout draws are undone

    model.train()
    lr_find(model, task, TensorBatches(x, y, batch=16), opt, num_steps=10)
    assert model.training and all(m.training for m in model.modules())
    assert same(model.state_dict(), model_before)  # BatchNorm buffers included


class RecordingSGD(torch.optim.SGD):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen = []

    def step(self, closure=None):
        self.seen.append([g["lr"] for g in self.param_groups])
        return super().step(closure)


def test_discriminative_groups_keep_their_ratio_and_schedule_is_exponential():
    x, y = toy(n=40)  # 3 batches of 16: 20 steps need 7 epochs
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = RecordingSGD([{"params": model[0].parameters(), "lr": 0.001},
                        {"params": model[2].parameters(), "lr": 0.1},
                        {"params": [], "lr": 0.025}], momentum=0.9)
    loader = TensorBatches(x, y, batch=16)
    start, end, n = 1e-4, 1e-1, 20
    res = lr_find(model, ClassificationTask(4), loader, opt, start_lr=start, end_lr=end, num_steps=n)
    assert not res.stopped_early
    assert len(res.lrs) == len(opt.seen) == n
    assert loader.epochs_seen == list(range(7))
    for i, (g0, g1, g2) in enumerate(opt.seen):
        expected = start * (end / start) ** (i / (n - 1))
        assert g1 == pytest.approx(expected, rel=1e-12)  # the largest group follows the sweep
        assert res.lrs[i] == pytest.approx(g1, rel=1e-12)  # and is the one reported
        assert g1 / g0 == pytest.approx(100.0, rel=1e-9)
        assert g1 / g2 == pytest.approx(4.0, rel=1e-9)
    assert res.lrs[0] == pytest.approx(start) and res.lrs[-1] == pytest.approx(end)
    assert [g["lr"] for g in opt.param_groups] == [0.001, 0.1, 0.025]


def test_divergence_stops_early():
    x, y = toy(n=256)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    start, end = 1e-4, 1e8
    res = lr_find(model, ClassificationTask(4), TensorBatches(x, y, batch=32), opt, start_lr=start, end_lr=end,
                  num_steps=100)
    assert res.stopped_early
    assert 3 <= len(res.lrs) < 100
    assert res.lrs[-1] < end
    assert all(math.isfinite(v) for v in res.losses + res.smoothed)
    for v in res.suggestions.values():
        assert math.isfinite(v) and start <= v <= end
    # it stopped at the first step whose smoothed loss passed 4x the best so far (that step is kept)
    sm = res.smoothed
    assert sm[-1] > 4 * min(sm)
    assert all(sm[i] <= 4 * min(sm[:i + 1]) for i in range(len(sm) - 1))

    # with the ratio test off, the sweep still stops once the loss is no longer finite
    res = lr_find(model, ClassificationTask(4), TensorBatches(x, y, batch=32), opt, start_lr=start, end_lr=1e30,
                  num_steps=100, diverge=math.inf)
    assert res.stopped_early and len(res.lrs) < 100
    assert all(math.isfinite(v) for v in res.losses + res.smoothed)
    for v in res.suggestions.values():
        assert math.isfinite(v) and start <= v <= 1e30
    # no divergence when the sweep stays tame
    res = lr_find(model, ClassificationTask(4), TensorBatches(x, y, batch=32), opt, start_lr=1e-6, end_lr=1e-3,
                  num_steps=30)
    assert not res.stopped_early and len(res.lrs) == 30


def test_bf16_autocast_and_bad_arguments():
    x, y = toy()
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    task, loader = ClassificationTask(4), TensorBatches(x, y, batch=16)
    res = lr_find(model, task, loader, opt, num_steps=12, amp_dtype=torch.bfloat16, device="cpu")
    assert len(res.lrs) == 12 and all(math.isfinite(v) for v in res.losses)
    with pytest.raises(ValueError):
        lr_find(model, task, loader, opt, start_lr=1.0, end_lr=0.1)
    with pytest.raises(ValueError):
        lr_find(model, task, loader, opt, num_steps=1)


def test_valley_index_and_to_dict():
    # flat, a long fall (indices 10..40), then a rise: the valley pick lies inside the fall
    curve = [5.0] * 10 + [5.0 - 0.1 * i for i in range(31)] + [2.0 + 0.5 * i for i in range(10)]
    i = valley_index(curve)
    assert 15 <= i <= 35
    assert valley_index([1.0]) == 0 and valley_index([2.0, 1.0]) in (0, 1)
    r = LRFindResult(lrs=[1e-3, 1e-2], losses=[2.0, 1.0], smoothed=[2.0, 1.5], suggestion=1e-3,
                     suggestions={"valley": 1e-3, "steep": 1e-3, "min/10": 1e-3}, stopped_early=False)
    d = r.to_dict()
    assert d["lrs"] == [1e-3, 1e-2] and d["suggestions"]["valley"] == 1e-3 and d["stopped_early"] is False


def test_plot_writes_png(tmp_path):
    x, y = toy(n=256)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    res = lr_find(model, ClassificationTask(4), TensorBatches(x, y, batch=32), opt, start_lr=1e-4, end_lr=1e3,
                  num_steps=60)
    out = plot_lr_find(res, tmp_path / "sub" / "lr.png")
    assert out == tmp_path / "sub" / "lr.png" and out.stat().st_size > 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_import_does_not_load_matplotlib():
    code = "import sys, visionkit.engine.lr_find; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
