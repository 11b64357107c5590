"""Segmentation through the whole product: train (task inferred from the layout), eval, predict, exact mid-epoch
resume, 2-process DDP equality, and the bad inputs of the issue as one-line errors with no run directory left."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from visionkit.cli import main
from visionkit.config import resolve_config
from visionkit.engine import Callback, Trainer
from visionkit.engine.checkpoint import load_checkpoint
from visionkit.tasks import get_task
from visionkit.tasks.segment.data import SEG_SHAPES_CLASSES, make_seg_shapes

# a narrow U-Net with GroupNorm (per image: 2 ranks x 4 images train as 1 x 8, which BatchNorm without SyncBatchNorm
# does not), no augmentation, fp32, no loader worker processes: small and exact
TINY = ["--batch-size", "8", "--quiet", "--set", "model.kwargs={base: 4, norm: group}", "aug.preset=none",
        "train.amp=off", "train.report=false", "model.channels_last=false", "data.workers=0"]


@pytest.fixture(scope="module")
def seg_dir(tmp_path_factory) -> Path:
    """DIR/{train,val,test}/{images,masks}/ + classes.txt: 16 / 8 / 8 images of 32 px from seg-shapes' generator."""
    d = tmp_path_factory.mktemp("segdata")
    x, y = make_seg_shapes(32, seed=3, size=32)
    (d / "classes.txt").write_text("\n".join(SEG_SHAPES_CLASSES) + "\n")
    for split, lo, hi in (("train", 0, 16), ("val", 16, 24), ("test", 24, 32)):
        for sub in ("images", "masks"):
            (d / split / sub).mkdir(parents=True)
        for i in range(lo, hi):
            Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(d / split / "images" / f"{i:03d}.png")
            Image.fromarray(y[i].numpy(), mode="L").save(d / split / "masks" / f"{i:03d}.png")
    return d


def visionkit(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "visionkit", *args], check=False, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def run(seg_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("segrun") / "run"
    assert main(["train", "--data", str(seg_dir), "--epochs", "2", "--out", str(out), *TINY]) == 0
    return out


def test_train_infers_the_task_and_writes_the_contract(run):
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["task"] == "segment" and cfg["model"]["name"] == "unet"
    s = json.loads((run / "summary.json").read_text())
    assert s["best"]["monitor"] == "val_miou"
    test = s["test"]
    assert {"miou", "pixel_acc", "n"} <= set(test) and test["n"] == 8
    assert [r["class"] for r in test["per_class"]] == SEG_SHAPES_CLASSES
    assert {"class", "iou", "acc", "support"} <= set(test["per_class"][0])
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train_pixel_acc", "val_miou", "val_pixel_acc", "val_fwiou"} <= set(header)


def test_eval_json_and_predict_masks(run, seg_dir, tmp_path, capsys):
    assert main(["eval", str(run), "--data", str(seg_dir), "--split", "test", "--format", "json"]) == 0
    res = json.loads(capsys.readouterr().out)
    s = json.loads((run / "summary.json").read_text())
    assert res["miou"] == pytest.approx(s["test"]["miou"], abs=1e-6) and res["n"] == 8
    big = Image.fromarray((np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8))
    big.save(tmp_path / "photo.jpg")
    out = tmp_path / "pred"
    assert main(["predict", str(run), str(tmp_path / "photo.jpg"), "--out", str(out), "--format", "json"]) == 0
    r = json.loads(capsys.readouterr().out)[0]
    mask = Image.open(r["mask"])
    assert mask.mode == "P" and mask.size == (70, 50)  # at the image's own size, ids as pixel values
    assert np.asarray(mask).max() < len(SEG_SHAPES_CLASSES)
    assert sum(r["fractions"].values()) == pytest.approx(1.0)
    assert Path(r["overlay"]).is_file()
    # the same again would overwrite: refused, nothing written
    assert main(["predict", str(run), str(tmp_path / "photo.jpg"), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def _trainer(seg_dir: Path, run_dir: Path, callbacks=()) -> Trainer:
    cfg = resolve_config(overrides={"task": "segment", "data.source": str(seg_dir), "model.name": "unet",
                                    "model.kwargs": {"base": 4}, "aug.preset": "basic", "train.amp": "off",
                                    "data.batch_size": 4, "train.epochs": 2, "model.channels_last": False,
                                    "train.deterministic": True, "data.workers": 0})
    s = get_task("segment").setup(cfg, None)
    return Trainer(model=s.net, task=s.task, optimizer=s.opt, scheduler=s.sched, train_loader=s.train_loader,
                   val_loader=s.val_loader, epochs=2, device=s.device, monitor="val_miou", save_every=1,
                   run_dir=run_dir, meta={"config": cfg.to_dict()}, callbacks=list(callbacks))


def test_mid_epoch_resume_is_exact(seg_dir, tmp_path):
    """With flips and scale jitter on: stopped at step 6 (epoch 2, batch 2), resumed, equal to the unbroken run."""
    full = _trainer(seg_dir, tmp_path / "full")
    full.fit()

    class Stop(Exception):
        pass

    class StopAt(Callback):
        def on_save(self, trainer, name):
            if trainer.state.step == 6 and name == "last.pt":
                raise Stop

    part = _trainer(seg_dir, tmp_path / "part", [StopAt()])
    with pytest.raises(Stop):
        part.fit()
    resumed = _trainer(seg_dir, tmp_path / "part")
    resumed.load_state(load_checkpoint(tmp_path / "part" / "last.pt"))
    assert (resumed.state.epoch, resumed.state.batch) == (1, 2)
    resumed.fit()
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.state.history[-1]["val_miou"] == full.state.history[-1]["val_miou"]


def test_two_workers_train_what_one_trains(seg_dir, tmp_path):
    """1 process x batch 8 against 2 x 4, same seed: the same weights after the epoch. SGD: Adam's division by the
    root of tiny second moments would amplify the float rounding of the all-reduce's sum order."""
    one, two = tmp_path / "one", tmp_path / "two"
    sgd = ["--lr", "0.05", "--set", "optim.name=sgd"]
    r1 = visionkit("train", "--data", str(seg_dir), "--epochs", "1", "--out", str(one), *TINY, *sgd)
    r2 = visionkit("train", "--data", str(seg_dir), "--epochs", "1", "--out", str(two), "--devices", "2", *TINY, *sgd)
    assert r1.returncode == 0, r1.stderr
    assert r2.returncode == 0, r2.stderr
    a, b = load_checkpoint(one / "last.pt")["model"], load_checkpoint(two / "last.pt")["model"]
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], atol=1e-5), k
    # evaluation is reduced exactly: both report the same confusion-matrix metrics
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert s1["test"]["miou"] == pytest.approx(s2["test"]["miou"], abs=1e-4)


def test_bad_inputs_are_one_line_and_leave_no_run_directory(seg_dir, tmp_path, capsys):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(seg_dir, broken)
    (broken / "train" / "masks" / "000.png").unlink()  # an image without its mask
    Image.new("L", (20, 20)).save(broken / "train" / "masks" / "001.png")  # a mask of another size
    Image.fromarray(np.full((32, 32), 9, np.uint8), mode="L").save(broken / "train" / "masks" / "002.png")  # id 9
    Image.new("RGB", (32, 32), (1, 2, 3)).save(broken / "train" / "masks" / "003.png")  # RGB, no palette
    cases = [(["--data", str(broken)], ["000", "001", "002", "003"]),
             (["--data", str(seg_dir), "--set", "train.label_smoothing=0.2"], ["belongs to the classify task"]),
             (["--data", "digits", "--task", "segment"], ["does not fit digits"]),
             (["--data", str(seg_dir), "--task", "classify"], ["segmentation data set"]),
             (["--data", str(seg_dir), "--model", "resnet_nope"], ["resnet_nope"])]
    for args, needles in cases:
        out = tmp_path / "run"
        assert main(["train", *args, "--epochs", "1", "--out", str(out), "--quiet"]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(n in err[0] for n in needles), (args, err)
        assert not out.exists(), args
    out = tmp_path / "skip"
    assert main(["train", "--data", str(broken), "--epochs", "1", "--out", str(out), "--bad-images", "skip",
                 *TINY]) == 0
    data = json.loads((out / "data.json").read_text())
    assert len(data["bad_files"]) == 4
