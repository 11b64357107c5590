"""The Python API end to end on small offline data (digits, fake): every training option is exercised for real."""
import json

import pytest
import torch

import visionkit
from visionkit.config import ConfigError
from visionkit.core.runtime import cpu_has_bf16

# no report (tests/test_report.py covers it; here it would double each run's time)
FAST = {"data.img_size": 28, "data.batch_size": 32, "aug.hflip": 0.0, "model.kwargs": {"width": 32},
        "train.report": False}
# bf16 autocast where the CPU runs it natively; emulated (AVX2-only CPUs) it is 20-300x slower than fp32
AMP = "bf16" if cpu_has_bf16() else "off"


def small(tmp_path, name="run", epochs=1, model="fastnet", data="digits", **over):
    return visionkit.train(data, model, epochs=epochs, out=str(tmp_path / name), quiet=True,
                           overrides={**FAST, **over})


def test_train_learns_digits_and_predictor_agrees(tmp_path):
    run = small(tmp_path, epochs=4, **{"optim.lr": 3e-3})
    assert run.summary["test"]["acc1"] > 0.85, run.summary
    res = visionkit.evaluate_checkpoint(run.dir / "best.pt", "digits", split="test")
    assert res["acc1"] == pytest.approx(run.summary["test"]["acc1"])
    assert len(res["per_class"]) == 10 and sum(r["support"] for r in res["per_class"]) == res["n"]
    p = visionkit.load(run.dir)
    assert p.classes == [str(i) for i in range(10)] and p.preprocess["input_size"] == [1, 28, 28]


@pytest.mark.parametrize("over", [
    {"train.ema": True, "train.ema_decay": 0.9, "train.grad_accum": 2, "train.clip_grad": 1.0},
    {"aug.mixup": 0.2, "aug.cutmix": 1.0, "train.label_smoothing": 0.1, "aug.erasing": 0.5},
    {"data.balance": "loss", "optim.name": "sgd", "optim.lr": 0.05, "sched.name": "onecycle"},
    {"data.balance": "sampler", "optim.name": "adam", "sched.name": "plateau"},
    {"train.amp": AMP, "sched.name": "multistep", "sched.milestones": [1], "model.channels_last": False},
    {"model.name": "lenet", "model.kwargs": {"bn": True}, "model.drop_rate": 0.1, "optim.lr": 1e-2},
    {"sched.name": "cosine_restarts", "sched.restart_epochs": 1, "train.tta": True, "data.val_split": 0.0},
])
def test_training_options_run_and_learn_something(tmp_path, over):
    run = small(tmp_path, epochs=2, model=over.pop("model.name", "fastnet"),
                **{"optim.lr": over.pop("optim.lr", 3e-3), **over})
    hist = run.summary["final"]
    assert hist["epoch"] == 2 and hist["train_loss"] == hist["train_loss"]  # finite
    assert run.summary["test"]["acc1"] > 0.2  # well above chance (0.1) after two short epochs
    ck = torch.load(run.dir / "last.pt", weights_only=True)
    assert (ck["ema"] is not None) == bool(over.get("train.ema"))


def test_early_stopping_stops(tmp_path):
    run = small(tmp_path, epochs=30, **{"optim.lr": 1e-7, "train.patience": 2, "sched.name": "constant"})
    assert run.summary["stopped_early"] and run.summary["epochs_run"] < 30


def test_seeded_runs_repeat_and_differ(tmp_path):
    a = small(tmp_path, "a", **{"train.seed": 3})
    b = small(tmp_path, "b", **{"train.seed": 3})
    c = small(tmp_path, "c", **{"train.seed": 4})
    assert a.summary["final"]["train_loss"] == b.summary["final"]["train_loss"]
    assert a.summary["final"]["train_loss"] != c.summary["final"]["train_loss"]


def test_config_yaml_reproduces_the_run(tmp_path):
    a = small(tmp_path, "a")
    b = visionkit.train(config=str(a.dir / "config.yaml"), out=str(tmp_path / "b"))
    assert a.summary["final"]["train_loss"] == b.summary["final"]["train_loss"]
    assert json.loads((b.dir / "env.json").read_text())["data_fingerprint"] == \
        json.loads((a.dir / "env.json").read_text())["data_fingerprint"]


def test_api_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown argument"):
        visionkit.train("digits", "lenet", epoch=3)
    with pytest.raises(ConfigError, match="no CUDA"):
        if torch.cuda.is_available():
            raise ConfigError("no CUDA (skipped: a GPU is here)")
        visionkit.train("digits", "fastnet", device="cuda", out=str(tmp_path / "cuda"))
