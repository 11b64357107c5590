"""The run report: every section, nothing fetched from the network, PNG copies, runs with missing pieces, bad input,
escaping of user strings, and a real browser (headless Chromium) rendering the page with every image decoded."""
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import visionkit
from visionkit.config import ConfigError
from visionkit.report import build_report
from visionkit.report.html import SECTIONS

FAST = {"data.img_size": 32, "train.report": False}
PLOTS = ["curves_loss.png", "curves_accuracy.png", "curves_lr.png", "confusion.png", "confusion_norm.png",
         "reliability.png", "top_losses.png", "gradcam.png", "class_counts.png"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("report") / "run"
    visionkit.train("fake", "lenet", epochs=2, out=str(d), quiet=True, overrides=FAST)
    return d


@pytest.fixture(scope="module")
def report(run_dir) -> Path:
    return build_report(run_dir, device="cpu", max_gallery=8, cam_images=3)


def sections(text: str) -> dict[str, str]:
    """{section id: its HTML} of a report."""
    parts = re.split(r'(?=<section id=")', text)
    return {re.match(r'<section id="([^"]+)"', p).group(1): p for p in parts if p.startswith("<section id=")}


def test_every_section_self_contained_and_png_copies(run_dir, report):
    assert report == run_dir / "report.html" and report.is_file()
    text = report.read_text()
    assert list(sections(text)) == list(SECTIONS)
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in text
    refs = re.findall(r'(?:src|href)\s*=\s*["\']?([^"\'\s>]*)', text)
    assert refs and not [r for r in refs if not r.startswith(("data:image/png;base64,", "#"))]
    assert "http://" not in text and "https://" not in text and "<script" not in text.lower()
    assert text.count("<img ") == text.count('src="data:image/png;base64,') > 20
    for name in PLOTS:
        with Image.open(run_dir / "report" / name) as im:
            assert im.format == "PNG" and im.width > 50, name
    s = sections(text)
    assert "could not" not in s["gradcam"] and s["gradcam"].count("<img ") == 2 * 6  # 3 right + 3 wrong, 2 each
    assert s["top-losses"].count("<img ") == 8
    assert "No metrics yet" not in text


def test_numbers_agree_with_the_run(run_dir, report):
    s = sections(report.read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    best = summary["best"]
    # best.pt on the rebuilt validation split reproduces the accuracy training logged for that epoch
    assert f"{best['val_acc1'] * 100:.2f}%" in s["summary"].split("This report&#x27;s predictions")[1]
    assert s["per-class"].count("<tr") == 1 + 10 and 'class="worst"' in s["per-class"]
    assert f"{summary['n_val']} images" in s["confusion"]
    assert "ECE" in s["calibration"] and "<details>" in s["calibration"]
    assert "circle" in s["data"] and "2400" in s["data"]


def _copy_run(run_dir: Path, dest: Path, drop: list[str]) -> Path:
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("tb", "report.html"))
    for name in drop:
        (dest / name).unlink()
    return dest


def test_run_without_metrics_or_best_checkpoint_still_renders(run_dir, report, tmp_path, monkeypatch):
    d = _copy_run(run_dir, tmp_path / "early", ["best.pt", "summary.json"])  # with the full report's PNG copies
    (d / "metrics.csv").write_text("epoch,lr,train_loss,train_acc,val_loss,val_acc1,val_acc5,time\n")

    def unsupported(*a, **k):
        raise RuntimeError("no spatial layer in this model\nsecond line")
    monkeypatch.setattr("visionkit.explain.cam.compute_cams", unsupported)  # and a model Grad-CAM cannot handle
    out = build_report(d, out=tmp_path / "elsewhere" / "r.html", device="cpu", max_gallery=2, cam_images=1)
    assert out == tmp_path / "elsewhere" / "r.html"
    text = out.read_text()
    s = sections(text)
    assert list(s) == list(SECTIONS)
    assert "No metrics yet" in s["summary"] and "No metrics yet" in s["curves"]
    assert "last.pt on the validation split" in s["summary"]  # predictions from last.pt when best.pt is missing
    assert s["confusion"].count("<img ") == 2 and (d / "report" / "confusion.png").is_file()
    assert "Grad-CAM could not be computed for this model: RuntimeError: no spatial layer in this model<" in text
    assert "<img " not in s["gradcam"] and "<img " in s["top-losses"]
    for name in ("curves_loss.png", "gradcam.png"):  # plots this report lacks do not survive from the earlier one
        assert not (d / "report" / name).exists()


def test_run_without_any_checkpoint_or_metrics_says_why(run_dir, tmp_path):
    d = _copy_run(run_dir, tmp_path / "interrupted", ["best.pt", "last.pt", "summary.json", "metrics.csv"])
    s = sections(build_report(d).read_text())
    assert list(s) == list(SECTIONS)
    for sid in ("confusion", "per-class", "confused-pairs", "top-losses", "calibration", "gradcam"):
        assert "no checkpoint yet" in s[sid] and "<img " not in s[sid], sid
    assert "No metrics yet" in s["summary"] and "circle" in s["data"]


def test_not_a_run_directory(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_report(tmp_path / "missing")
    with pytest.raises(ConfigError, match="not a run directory"):
        build_report(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ConfigError, match="not a run directory"):
        build_report(tmp_path / "file.txt")
    (tmp_path / "config.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="not a visionkit config"):
        build_report(tmp_path)


def test_bad_arguments(run_dir):
    with pytest.raises(ConfigError, match="max_gallery"):
        build_report(run_dir, max_gallery=-1)
    with pytest.raises(ConfigError, match="unknown device"):
        build_report(run_dir, device="abacus")


EVIL = ['<script>alert("x")', "b&c <img src=x onerror=alert(1)>"]


def test_user_strings_are_escaped_and_moved_data_is_a_note(tmp_path):
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for k, name in enumerate(EVIL):
        (data / name).mkdir(parents=True)
        for i in range(8):
            a = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            a[..., k] = 255  # the class is the dominant channel
            Image.fromarray(a).save(data / name / f"{i}.png")
    (data / EVIL[0] / "<b>broken.png").write_bytes(b"not an image")
    run = visionkit.train(str(data), "lenet", epochs=1, out=str(tmp_path / "run"), quiet=True,
                          overrides={**FAST, "data.workers": 0, "data.bad_images": "skip", "data.val_split": 0.25})
    text = build_report(run.dir, max_gallery=4, cam_images=1).read_text()
    for name in EVIL:
        assert name not in text and html.escape(name) in text
    assert "<script" not in text.lower() and "<b>broken" not in text and "&lt;b&gt;broken.png" in text
    s = sections(text)
    assert "Bad files skipped (1)" in s["data"] and "image width" in s["data"]
    assert "<img " in s["confusion"]

    shutil.move(data, tmp_path / "moved")  # the data is gone: prediction sections say why, the rest renders
    s = sections(build_report(run.dir).read_text())
    assert list(s) == list(SECTIONS)
    assert "cannot be loaded here" in s["confusion"] and "<img " in s["curves"]


# ------------------------------------------------------------------------------------------------ a real browser
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
PROBE = """<script>
window.addEventListener("load", () => {
  const ids = %s;
  const imgs = Array.from(document.images);
  const verdict = {
    sections: Object.fromEntries(ids.map(id => [id, document.querySelector("section#" + id) !== null])),
    images: imgs.length,
    broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
    overflow: document.documentElement.scrollWidth - document.documentElement.clientWidth,
  };
  const pre = document.createElement("pre");
  pre.id = "verdict";
  pre.textContent = JSON.stringify(verdict);
  document.body.appendChild(pre);
});
</script>"""


@pytest.fixture(scope="module")
def browser() -> str:
    """The browser binary; checked before the run is trained, so a machine without one skips at once."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("Chromium not installed: apt-get install chromium (make test does it on Debian)")


def _chromium(browser: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("width", [1280, 390])
def test_chromium_renders_every_section_and_image(browser, report, tmp_path, width):
    text = report.read_text()
    # the page's own policy forbids scripts; the probe copy allows inline ones and keeps images limited to data: URIs
    probe = text.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';")
    probe = probe.replace("</body>", PROBE % json.dumps(list(SECTIONS)) + "</body>")
    page = tmp_path / "probe.html"
    page.write_text(probe)
    res = _chromium(browser, tmp_path, "--dump-dom", "--virtual-time-budget=10000", f"--window-size={width},2000",
                    page.as_uri())
    found = re.search(r'<pre id="verdict">(.*?)</pre>', res.stdout, re.DOTALL)
    assert found, f"no verdict from {browser}: {res.stderr[-2000:]}"
    verdict = json.loads(html.unescape(found.group(1)))
    assert verdict["sections"] == dict.fromkeys(SECTIONS, True)
    assert verdict["images"] == text.count("<img ") and verdict["broken"] == []
    assert verdict["overflow"] <= 0, "the page scrolls sideways: something is wider than the screen"

    shot = tmp_path / "shot.png"
    res = _chromium(browser, tmp_path, f"--screenshot={shot}", f"--window-size={width},4000", report.as_uri())
    assert shot.is_file(), res.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (width, 4000)
        grey = np.asarray(im.convert("L"))
    assert grey.std() > 10 and (grey < 128).mean() > 0.01  # not a blank page: text and plots drawn


def test_reliability_bins_give_torchmetrics_ece():
    import torch

    from visionkit.report.plots import reliability_bins
    from visionkit.tasks.classify.evaluate import score
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(500, 7, generator=g), 1)
    probs[:5] = torch.eye(7)[:5]  # confidence exactly 1.0 lands in the last bin
    targets = torch.randint(0, 7, (500,), generator=g)
    conf, pred = probs.max(1)
    bins = reliability_bins(conf.numpy(), (pred == targets).numpy(), 15)
    ece = sum(b["count"] / 500 * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])
    assert sum(b["count"] for b in bins) == 500
    assert ece == pytest.approx(score(probs, targets)["ece"], abs=1e-5)


def test_train_writes_the_report_and_a_failing_report_does_not_fail_the_run(tmp_path, monkeypatch, capsys):
    run = visionkit.train("fake", "lenet", epochs=1, out=str(tmp_path / "auto"), quiet=True,
                          overrides={"data.img_size": 32})
    text = (run.dir / "report.html").read_text()
    assert list(sections(text)) == list(SECTIONS) and "could not" not in sections(text)["gradcam"]

    def broken(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr("visionkit.report.build_report", broken)
    run = visionkit.train("fake", "lenet", epochs=1, out=str(tmp_path / "broken"), quiet=True,
                          overrides={"data.img_size": 32})
    err = capsys.readouterr().err
    assert "warning: the report could not be written (RuntimeError: disk full)" in err
    assert f"visionkit report {run.dir}" in err
    assert (run.dir / "best.pt").is_file() and (run.dir / "summary.json").is_file()
    assert not (run.dir / "report.html").exists()


def test_cli_report_explain_features_user_errors(run_dir, tmp_path, capsys):
    from visionkit.cli import main
    text_jpg = tmp_path / "note.jpg"
    text_jpg.write_text("not an image")
    image = tmp_path / "ok.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    cases = [(["report", str(tmp_path / "nowhere")], "does not exist"),
             (["report", str(tmp_path)], "config.yaml"),
             (["explain", str(run_dir / "best.pt"), str(text_jpg)], "cannot be read"),
             (["explain", str(run_dir / "best.pt"), str(image), "--layer", "nope"],
              "unknown layer 'nope'; layers with spatial outputs: features"),
             (["explain", str(run_dir / "best.pt"), str(image), "--target", "zebra"], "unknown target label"),
             (["features", str(run_dir / "best.pt"), str(image), "--layer", "nope"], "unknown layer 'nope'")]
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and words in err, (argv, err)
    assert main(["report", str(run_dir), "--out", str(tmp_path / "r.html")]) == 0
    assert capsys.readouterr().out.strip() == f"report: {tmp_path / 'r.html'}"


def test_a_relative_data_path_is_found_from_another_folder(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    for k, name in enumerate(["dark", "light"]):
        (tmp_path / "photos" / name).mkdir(parents=True)
        for i in range(12):
            px = rng.integers(0, 90, (24, 24, 3)) + 150 * k
            Image.fromarray(px.astype(np.uint8)).save(tmp_path / "photos" / name / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    run = visionkit.train("photos", "lenet", epochs=1, out="run", quiet=True,
                          overrides={**FAST, "data.val_split": 0.25, "data.workers": 0})
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # `photos` is not here: it is where train ran
    s = sections(build_report(tmp_path / run.dir).read_text())
    assert "not available" not in s["confusion"] and "<img " in s["confusion"]
