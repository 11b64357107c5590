"""Detection through the whole product: the evaluator (COCO mAP), train (task inferred from the layout), eval,
predict, report, exact mid-epoch resume, and the bad inputs of the issue as one-line errors with no run directory."""
from __future__ import annotations

import json
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
from visionkit.tasks.detect.metrics import DetMetrics, image_hits
from visionkit.tasks.detect.task import DetectionTask, merge


def _det(boxes, scores, labels) -> dict:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels, dtype=torch.long)}


def _truth(boxes, labels, difficult=None) -> dict:
    t = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
         "labels": torch.tensor(labels, dtype=torch.long)}
    if difficult is not None:
        t["difficult"] = torch.tensor(difficult)
    return t


# ------------------------------------------------------------------------------------------------ the evaluator
def test_map_is_one_for_perfect_detections_and_zero_for_none():
    m = DetMetrics(2, ["a", "b"])
    t = _truth([[10, 10, 50, 50], [60, 10, 90, 40]], [0, 1])
    m.update([_det(t["boxes"].tolist(), [0.9, 0.8], [0, 1])], [t])
    r = m.compute(full=True)
    assert r["map"] == pytest.approx(1.0) and r["map50"] == pytest.approx(1.0) and r["n"] == 1
    assert [c["class"] for c in r["per_class"]] == ["a", "b"] and r["per_class"][1]["support"] == 1
    none = DetMetrics(2)
    none.update([_det([], [], [])], [t])
    assert none.compute()["map"] == 0.0


def test_a_wrong_class_or_a_loose_box_costs_ap():
    t = _truth([[10, 10, 50, 50]], [0])
    wrong = DetMetrics(2)
    wrong.update([_det([[10, 10, 50, 50]], [0.9], [1])], [t])
    assert wrong.compute()["map50"] == 0.0
    loose = DetMetrics(2)  # IoU 2/3: a hit at 0.5, a miss from 0.70 on
    loose.update([_det([[10, 10, 50, 70]], [0.9], [0])], [t])
    r = loose.compute()
    assert r["map50"] == pytest.approx(1.0) and r["map75"] == 0.0 and 0 < r["map"] < 1


def test_difficult_objects_are_neither_missed_nor_hit():
    """VOC's difficult (COCO's crowd): not finding one costs nothing, finding one is no false positive."""
    t = _truth([[10, 10, 50, 50], [60, 60, 90, 90]], [0, 0], difficult=[False, True])
    found_easy = DetMetrics(1)
    found_easy.update([_det([[10, 10, 50, 50]], [0.9], [0])], [t])
    found_both = DetMetrics(1)
    found_both.update([_det([[10, 10, 50, 50], [60, 60, 90, 90]], [0.9, 0.95], [0, 0])], [t])
    assert found_easy.compute()["map"] == pytest.approx(1.0)
    assert found_both.compute()["map"] == pytest.approx(1.0)


def test_metrics_refuse_labels_outside_the_classes():
    with pytest.raises(ValueError, match="outside"):
        DetMetrics(2).update([_det([], [], [])], [_truth([[0, 0, 5, 5]], [2])])


def test_image_hits_and_merge():
    p = _det([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10]], [0.9, 0.8, 0.1], [1, 1, 1])
    h = image_hits(p, _truth([[0, 0, 10, 10], [40, 40, 50, 50]], [1, 1]), score_thresh=0.3)
    assert (h["tp"], h["fp"], h["fn"]) == (1, 1, 1)
    a, b = _det([[0, 0, 10, 10]], [0.6], [0]), _det([[1, 0, 10, 10], [50, 50, 60, 60]], [0.9, 0.5], [0, 0])
    out = merge([[a], [b]], iou=0.5, max_det=10)[0]
    assert out["scores"].tolist() == pytest.approx([0.9, 0.5])  # the overlapping pair kept once, the better one


def test_flip_tta_maps_mirrored_boxes_back():
    class Fixed(torch.nn.Module):  # "detects" a box at the left edge of whatever it is shown
        nms_thresh, max_det = 0.5, 100

        def forward(self, x):
            left = x[0, 0, 0, 0] > 0.5
            box = [0.0, 0.0, 8.0, 8.0] if left else [24.0, 0.0, 32.0, 8.0]
            return [_det([box], [0.9], [0])]
    x = torch.zeros(1, 3, 32, 32)
    x[..., :8] = 1.0
    out = DetectionTask(1).predict(Fixed().eval(), x, tta=True)[0]
    assert out["boxes"].tolist() == [[0.0, 0.0, 8.0, 8.0]]  # both views agree once mapped back: one box


# ------------------------------------------------------------------------------------------------ the whole product
# TinySSD at 64 px, no augmentation, fp32, no loader worker processes: small and exact
TINY = ["--img-size", "64", "--batch-size", "8", "--quiet", "--set", "aug.preset=none", "train.amp=off",
        "model.channels_last=false", "data.workers=0"]


@pytest.fixture(scope="module")
def det_csv(tmp_path_factory) -> Path:
    """A box CSV (image,label,xmin,ymin,xmax,ymax,split) over 16 / 8 / 8 PNGs of 64 px from det-shapes' generator."""
    from visionkit.tasks.detect.data import DET_SHAPES_CLASSES, make_det_shapes
    d = tmp_path_factory.mktemp("detdata")
    x, targets = make_det_shapes(32, seed=5, size=64)
    (d / "images").mkdir()
    rows = ["image,label,xmin,ymin,xmax,ymax,split"]
    for i, t in enumerate(targets):
        name = f"images/{i:03d}.png"
        Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(d / name)
        split = "train" if i < 16 else "val" if i < 24 else "test"
        if not len(t["labels"]):
            rows.append(f"{name},,,,,,{split}")  # an image without objects: a negative
        for b, k in zip(t["boxes"].tolist(), t["labels"].tolist()):
            rows.append(f"{name},{DET_SHAPES_CLASSES[k]},{b[0]:.1f},{b[1]:.1f},{b[2]:.1f},{b[3]:.1f},{split}")
    (d / "boxes.csv").write_text("\n".join(rows) + "\n")
    return d / "boxes.csv"


@pytest.fixture(scope="module")
def run(det_csv, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("detrun") / "run"
    assert main(["train", "--data", str(det_csv), "--epochs", "2", "--out", str(out), *TINY]) == 0
    return out


def test_train_infers_the_task_and_writes_the_contract(run):
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["task"] == "detect" and cfg["model"]["name"] == "tinyssd"
    s = json.loads((run / "summary.json").read_text())
    assert s["best"]["monitor"] == "val_map"
    test = s["test"]
    assert {"map", "map50", "map75", "mar100", "n", "per_class"} <= set(test) and test["n"] == 8
    assert {"class", "ap", "ap50", "support"} <= set(test["per_class"][0])
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train_loss", "val_map", "val_map50"} <= set(header)
    assert {"train_classification", "train_bbox_regression"} <= set(header)  # TinySSD's loss terms, by name
    html = (run / "report.html").read_text()
    assert "Per-class AP" in html and "Worst and best images" in html and "data:image/png;base64" in html


def test_eval_json_and_predict_boxes(run, det_csv, tmp_path, capsys):
    assert main(["eval", str(run), "--data", str(det_csv), "--split", "test", "--format", "json"]) == 0
    res = json.loads(capsys.readouterr().out)
    s = json.loads((run / "summary.json").read_text())
    assert res["map"] == pytest.approx(s["test"]["map"], abs=1e-6) and res["n"] == 8
    assert main(["eval", str(run), "--data", str(det_csv), "--split", "test"]) == 0
    assert "mAP=" in capsys.readouterr().out
    big = Image.fromarray((np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8))
    big.save(tmp_path / "photo.jpg")
    out = tmp_path / "pred"
    assert main(["predict", str(run), str(tmp_path / "photo.jpg"), "--conf", "0.0", "--max-det", "5", "--out",
                 str(out), "--format", "json"]) == 0
    r = json.loads(capsys.readouterr().out)[0]
    assert r["size"] == [70, 50] and len(r["detections"]) <= 5
    for det in r["detections"]:  # boxes in the image's own pixels
        x1, y1, x2, y2 = det["box"]
        assert 0 <= x1 <= x2 <= 70 and 0 <= y1 <= y2 <= 50 and 0 <= det["score"] <= 1
    assert Path(r["drawn"]).is_file()
    assert main(["predict", str(run), str(tmp_path / "photo.jpg"), "--format", "csv", "--conf", "0.0"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "path,class,score,xmin,ymin,xmax,ymax"
    # the same --out again would overwrite: refused, nothing written; a bad threshold is one line too
    assert main(["predict", str(run), str(tmp_path / "photo.jpg"), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["predict", str(run), str(tmp_path / "photo.jpg"), "--conf", "1.5"]) == 2
    assert "--conf" in capsys.readouterr().err


def _trainer(det_csv: Path, run_dir: Path, callbacks=()) -> Trainer:
    cfg = resolve_config(overrides={"task": "detect", "data.source": str(det_csv), "model.name": "tinyssd",
                                    "data.img_size": 64, "aug.preset": "basic", "train.amp": "off",
                                    "data.batch_size": 4, "train.epochs": 2, "model.channels_last": False,
                                    "train.deterministic": True, "data.workers": 0})
    s = get_task("detect").setup(cfg, None)
    return Trainer(model=s.net, task=s.task, optimizer=s.opt, scheduler=s.sched, train_loader=s.train_loader,
                   val_loader=s.val_loader, epochs=2, device=s.device, monitor="val_map", save_every=1,
                   run_dir=run_dir, meta={"config": cfg.to_dict()}, callbacks=list(callbacks))


def test_mid_epoch_resume_is_exact(det_csv, tmp_path):
    """With flips and scale jitter on: stopped at step 6 (epoch 2, batch 2), resumed, equal to the unbroken run."""
    full = _trainer(det_csv, tmp_path / "full")
    full.fit()

    class Stop(Exception):
        pass

    class StopAt(Callback):
        def on_save(self, trainer, name):
            if trainer.state.step == 6 and name == "last.pt":
                raise Stop

    part = _trainer(det_csv, tmp_path / "part", [StopAt()])
    with pytest.raises(Stop):
        part.fit()
    resumed = _trainer(det_csv, tmp_path / "part")
    resumed.load_state(load_checkpoint(tmp_path / "part" / "last.pt"))
    assert (resumed.state.epoch, resumed.state.batch) == (1, 2)
    resumed.fit()
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.state.history[-1]["val_map"] == full.state.history[-1]["val_map"]


def test_bad_inputs_are_one_line_and_leave_no_run_directory(det_csv, tmp_path, capsys):
    rows = det_csv.read_text().splitlines()
    broken = det_csv.parent / "broken.csv"
    broken.write_text("\n".join([rows[0], "images/nope.png,circle,1,1,9,9,train", *rows[1:]]) + "\n")
    seg = tmp_path / "seg"
    for sub in ("images", "masks"):
        (seg / sub).mkdir(parents=True)
        Image.new("L" if sub == "masks" else "RGB", (16, 16)).save(seg / sub / "a.png")
    cases = [(["--data", str(broken)], ["nope.png", "--bad-images skip"]),
             (["--data", str(det_csv), "--set", "train.label_smoothing=0.2"], ["belongs to the classify task"]),
             (["--data", str(det_csv), "--set", "segment.loss=dice"], ["belongs to the segment task"]),
             (["--data", "digits", "--task", "detect"], ["does not fit digits"]),
             (["--data", str(seg), "--task", "detect"], ["segmentation data set"]),
             (["--data", str(det_csv), "--task", "classify"], ["detection data set"]),
             (["--data", str(det_csv), "--model", "ssd_nope"], ["ssd_nope"])]
    for args, needles in cases:
        out = tmp_path / "run"
        assert main(["train", *args, "--epochs", "1", "--out", str(out), "--quiet"]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(n in err[0] for n in needles), (args, err)
        assert not out.exists(), args
    out = tmp_path / "skip"
    assert main(["train", "--data", str(broken), "--epochs", "1", "--out", str(out), "--bad-images", "skip",
                 "--set", "train.report=false", *TINY]) == 0
    data = json.loads((out / "data.json").read_text())
    assert [b["path"] for b in data["bad_files"]] and "nope.png" in data["bad_files"][0]["path"]


def test_the_detectors_loss_terms_are_columns_one_may_monitor():
    from visionkit.tasks.base import monitor_for
    from visionkit.tasks.detect.models import create_det_model
    net = create_det_model("tinyssd", 2, img_size=64).train()
    losses = net(torch.rand(2, 3, 64, 64), [_truth([[5, 5, 30, 30]], [1]), _truth([], [])])
    assert sorted(losses) == sorted(net.loss_names)
    task = DetectionTask(2, log_names=net.loss_names)
    assert monitor_for(task, "train_classification", "min", has_val=True) == ("train_classification", "min")
