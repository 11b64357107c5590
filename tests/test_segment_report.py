"""The segmentation report: every section from a tiny trained run (seg-shapes pictures as image files, one epoch of a
narrow U-Net), the worst / best gallery, the per-class table, a run without checkpoints, a directory that is not a
run, and (when headless Chromium is installed) a real browser rendering the page."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import visionkit
from visionkit.config import ConfigError
from visionkit.tasks.segment.data import SEG_SHAPES_CLASSES, SEG_SHAPES_PALETTE, make_seg_shapes
from visionkit.tasks.segment.report import PLOT_NAMES, SECTIONS, build_report

SPLITS = {"train": (32, 11), "val": (16, 12), "test": (8, 13)}  # n, generation seed
SIZE = 32  # pixels: a quarter of seg-shapes' cost, still four U-Net levels


def _write_data(root: Path) -> Path:
    """seg-shapes pictures in the DIR/{train,val,test}/{images,masks} layout, plus one unreadable training image."""
    for split, (n, seed) in SPLITS.items():
        x, y = make_seg_shapes(n, seed, size=SIZE)
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(root / split / "images" / f"{split}{i:03d}.png")
            Image.fromarray(y[i].numpy()).save(root / split / "masks" / f"{split}{i:03d}.png")
    (root / "train" / "images" / "broken.png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(root / "train" / "masks" / "broken.png")
    (root / "classes.txt").write_text("".join(f"{c} {r} {g} {b}\n" for c, (r, g, b)
                                              in zip(SEG_SHAPES_CLASSES, SEG_SHAPES_PALETTE)))
    return root


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster than two contending ones (on a shared machine, much faster)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("segreport")
    data = _write_data(base / "shapes")
    d = base / "run"
    visionkit.train(data=str(data), epochs=1, out=str(d), quiet=True, device="cpu",
                    overrides={"data.batch_size": 16, "data.workers": 0, "data.bad_images": "skip",
                               "aug.preset": "none", "train.report": False, "model.kwargs": {"base": 8}})
    return d


@pytest.fixture(scope="module")
def report(run_dir) -> Path:
    return build_report(run_dir, device="cpu", max_gallery=4)


def sections(text: str) -> dict[str, str]:
    """{section id: its HTML} of a report."""
    parts = re.split(r'(?=<section id=")', text)
    return {re.match(r'<section id="([^"]+)"', p).group(1): p for p in parts if p.startswith("<section id=")}


def test_every_section_gallery_and_png_copies(run_dir, report):
    assert report == run_dir / "report.html" and report.is_file()
    text = report.read_text()
    s = sections(text)
    assert list(s) == list(SECTIONS)
    assert all(f'href="#{sid}"' in text for sid in SECTIONS) and 'href="#top-losses"' not in text  # its own nav
    refs = re.findall(r'(?:src|href)\s*=\s*["\']?([^"\'\s>]*)', text)
    assert refs and not [r for r in refs if not r.startswith(("data:image/png;base64,", "#"))]
    assert "http://" not in text and "https://" not in text and "<script" not in text.lower()
    assert 'class="note"' not in text  # everything was available
    # 16 validation images: the 4 worst and the 4 best, each tile image | truth | prediction
    assert s["gallery"].count('<figure class="tile">') == 8 and s["gallery"].count("<img ") == 24
    assert "Worst 4" in s["gallery"] and "Best 4" in s["gallery"] and s["gallery"].count("mIoU ") >= 8
    ious = [float(v) for v in re.findall(r"<b class=\"(?:bad|good)\">mIoU ([\d.]+)%", s["gallery"])]
    assert ious[:4] == sorted(ious[:4]) and ious[4:] == sorted(ious[4:], reverse=True)
    assert max(ious[:4]) <= min(ious[4:])
    for name in PLOT_NAMES:
        with Image.open(run_dir / "report" / name) as im:
            assert im.format == "PNG" and im.width > 50, name
    assert s["curves"].count("<img ") == 3 and s["confusion"].count("<img ") == 1


def test_numbers_and_tables(run_dir, report):
    import json
    s = sections(report.read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    # best.pt on the rebuilt validation split reproduces what training logged for that epoch
    assert f"{summary['best']['val_miou'] * 100:.2f}%" in s["summary"].split("This report&#x27;s predictions")[1]
    assert "test mIoU" in s["summary"] and f"{summary['test']['miou'] * 100:.2f}%" in s["summary"]
    table = s["per-class"].split("<table")[1]
    assert table.count("<tr") == 1 + len(SEG_SHAPES_CLASSES)
    assert all(f"{c}</td>" in table for c in SEG_SHAPES_CLASSES)
    assert "<img " in s["per-class"]  # the IoU bar chart
    assert all(c in s["data"] for c in SEG_SHAPES_CLASSES) and "broken.png" in s["data"]
    assert "Bad files skipped (1)" in s["data"]


def test_run_without_checkpoints_still_renders(run_dir, report, tmp_path):
    d = tmp_path / "early"
    shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns("tb", "report.html"))
    for name in ("best.pt", "last.pt", "summary.json", "metrics.csv"):
        (d / name).unlink()
    out = build_report(d, out=tmp_path / "elsewhere" / "r.html", device="cpu")
    assert out == tmp_path / "elsewhere" / "r.html"
    s = sections(out.read_text())
    assert list(s) == list(SECTIONS)
    for sid in ("per-class", "confusion", "gallery"):
        assert "no checkpoint yet" in s[sid] and "<img " not in s[sid], sid
    assert "No metrics yet" in s["summary"] and "No metrics yet" in s["curves"] and "star" in s["data"]
    for name in PLOT_NAMES:  # plots this report lacks do not survive from the copied run's report
        assert not (d / "report" / name).exists(), name


def test_changed_data_is_noted_and_gallery_can_be_off(run_dir, report, tmp_path):
    import json
    d = tmp_path / "changed"
    shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns("tb", "report.html"))
    info = json.loads((d / "data.json").read_text())
    (d / "data.json").write_text(json.dumps({**info, "fingerprint": "0" * 16}))
    s = sections(build_report(d, device="cpu", max_gallery=0).read_text())
    assert "changed since training" in s["summary"] and "changed since training" in s["per-class"]
    assert "Gallery switched off" in s["gallery"] and "<img " not in s["gallery"]
    assert not (d / "report" / "gallery_worst.png").exists() and (d / "report" / "per_class_iou.png").is_file()


def test_not_a_run_directory(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_report(tmp_path / "missing")
    with pytest.raises(ConfigError, match="not a run directory"):
        build_report(tmp_path)


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="headless Chromium is not installed")
def test_renders_in_a_browser(report, tmp_path):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    shot = tmp_path / "page.png"
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,2400", report.resolve().as_uri()], check=True, timeout=60,
                   capture_output=True)
    with Image.open(shot) as im:
        a = np.asarray(im.convert("RGB"))
    assert a.shape[0] >= 2000 and (a < 250).any(axis=2).mean() > 0.05  # a page with content, not a blank one
