"""End to end through the real console script: train -> eval -> predict -> resume, bad inputs, exact resume."""
import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

VK = [sys.executable, "-m", "visionkit"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
# a small own model at 32 px on 2 cores: every CLI run here takes a few seconds (no report: test_report covers it)
TINY = ["--model", "lenet", "--img-size", "32", "--batch-size", "16", "--quiet", "--set", "data.workers=0",
        "train.report=false"]


def vk(*args, cwd=None, check=True, timeout=300):
    r = subprocess.run([*VK, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=timeout,
                       check=False)
    if check and r.returncode != 0:
        raise AssertionError(f"visionkit {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r


def vk_here(*args):
    """The CLI in this process, without an interpreter start-up per call: for user errors, which end before any
    training (the console script itself is exercised by the other tests)."""
    from visionkit.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse, or a message given to SystemExit
            code = e.code if isinstance(e.code, int) else 1
            if not isinstance(e.code, int) and e.code is not None:
                print(e.code, file=err)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def user_error(r, *words):
    """A user mistake: non-zero exit, one 'error:' line, no traceback."""
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), r.stderr
    for w in words:
        assert w in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes told apart by colour and a bar, 16 images each, with train/ val/ test/."""
    root = tmp_path_factory.mktemp("shapes")
    g = torch.Generator().manual_seed(0)
    colours = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}
    for split, n in [("train", 16), ("val", 6), ("test", 6)]:
        for name, rgb in colours.items():
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                noise = (torch.rand(40, 40, 3, generator=g) * 60).to(torch.uint8)
                arr = (torch.tensor(rgb, dtype=torch.uint8) // 2 + noise).numpy()
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "r1"
    r = vk("train", "--data", folder, *TINY, "--epochs", "2", "--out", out, "--set", "optim.lr=0.003")
    assert "done:" in r.stdout
    return out


def test_run_directory_is_self_describing(trained):
    names = {p.name for p in trained.iterdir()}
    assert {"config.yaml", "env.json", "metrics.csv", "summary.json", "last.pt", "best.pt", "classes.json",
            "tb"} <= names
    rows = read_csv(trained / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(rows[0]) == {"epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc1", "val_acc5", "time"}
    s = json.loads((trained / "summary.json").read_text())
    assert {"best", "final", "test"} <= set(s) and s["test"]["n"] == 18
    assert json.loads((trained / "classes.json").read_text()) == ["blue", "green", "red"]
    env = json.loads((trained / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["data_fingerprint"] and env["seed"] == 0
    assert any(f.name.startswith("events.out.tfevents") for f in (trained / "tb").iterdir())


def test_eval_json_and_table(trained, folder):
    res = json.loads(vk("eval", trained / "best.pt", "--data", folder, "--split", "test", "--format", "json").stdout)
    assert {"acc1", "acc5", "loss", "n", "per_class", "confusion_matrix"} <= set(res)
    assert res["n"] == 18 and sum(map(sum, res["confusion_matrix"])) == 18
    summary = json.loads((trained / "summary.json").read_text())
    assert res["acc1"] == pytest.approx(summary["test"]["acc1"])  # same weights, same split, same number
    table = vk("eval", trained / "best.pt", "--data", folder).stdout
    assert "precision" in table and "red" in table


def test_predict_formats(trained, folder):
    imgs = sorted((folder / "test" / "red").glob("*.png"))[:3]
    res = json.loads(vk("predict", trained / "best.pt", *imgs, "--topk", "2", "--format", "json").stdout)
    assert [r["path"] for r in res] == [str(p) for p in imgs]
    assert all(len(r["topk"]) == 2 and r["topk"][0]["prob"] >= r["topk"][1]["prob"] for r in res)
    assert all(t["label"] in ("red", "green", "blue") for r in res for t in r["topk"])
    rows = list(csv.reader(io.StringIO(vk("predict", trained, folder / "test" / "blue", "--format", "csv").stdout)))
    assert rows[0][:3] == ["path", "label1", "prob1"] and len(rows) == 7


def test_predict_broken_image_is_one_line(trained, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    user_error(vk("predict", trained / "best.pt", bad, check=False), "broken.jpg")


def test_resume_extends_a_finished_run(trained, folder, tmp_path):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    vk("train", "--resume", run, "--epochs", "3", "--quiet")
    rows = read_csv(run / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]


def test_bad_inputs_give_one_line_errors(trained, folder, tmp_path):
    user_error(vk_here("train", "--data", tmp_path / "missing", *TINY), "missing")
    user_error(vk_here("train", "--data", folder, "--model", "resnet18x", "--out", tmp_path / "a"),
               "resnet18x")
    user_error(vk_here("train", "--data", folder, *TINY, "--out", trained), "already exists")
    user_error(vk_here("train", "--data", folder, *TINY, "--set", "optim.lrr=1"), "optim.lrr")
    user_error(vk_here("train", "--data", "nosuchset", *TINY), "nosuchset")
    user_error(vk_here("train", "--resume", trained, "--model", "nin"), "nin")
    user_error(vk_here("eval", tmp_path / "nope.pt", "--data", folder), "not found")
    (tmp_path / "fake.pt").write_bytes(b"\x80\x04garbage")
    user_error(vk_here("eval", tmp_path / "fake.pt", "--data", folder), "cannot read checkpoint")
    # nothing was written over the existing run
    assert json.loads((trained / "summary.json").read_text())["epochs_run"] == 2


def test_bad_images_fail_lists_all_then_skip_records(folder, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(folder / "train", data)
    (data / "red" / "empty.png").write_bytes(b"")
    (data / "blue" / "text.jpg").write_text("hello")
    good = (data / "green" / "0.png").read_bytes()
    (data / "green" / "cut.png").write_bytes(good[: len(good) // 2])
    r = vk("train", "--data", data, *TINY, "--epochs", "1", "--out", tmp_path / "run", check=False)
    user_error(r, "3", "empty.png", "text.jpg", "cut.png")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    vk("train", "--data", data, *TINY, "--epochs", "1", "--out", tmp_path / "run2", "--bad-images", "skip")
    skipped = json.loads((tmp_path / "run2" / "data.json").read_text())["bad_files"]
    assert sorted(Path(b["path"]).name for b in skipped) == ["cut.png", "empty.png", "text.jpg"]


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    """--deterministic on CPU: a run killed by SIGKILL and resumed ends with the same metrics as one never stopped."""
    args = ["--data", "fake", "--model", "lenet", "--epochs", "2", "--batch-size", "32", "--deterministic",
            "--quiet", "--device", "cpu", "--set", "aug.mixup=0.2", "model.drop_rate=0.2", "train.report=false"]
    vk("train", *args, "--out", tmp_path / "full")
    run = tmp_path / "killed"
    p = subprocess.Popen([*VK, "train", *args, "--out", str(run), "--save-every", "5"], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "last.pt").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["state"]["epoch"] < 2, "the run finished before it could be killed"
    vk("train", "--resume", run, "--quiet")
    full = read_csv(tmp_path / "full" / "metrics.csv")
    resumed = read_csv(run / "metrics.csv")
    drop_time = [{k: v for k, v in r.items() if k != "time"} for r in full], \
                [{k: v for k, v in r.items() if k != "time"} for r in resumed]
    assert drop_time[0] == drop_time[1]
    a = json.loads((tmp_path / "full" / "summary.json").read_text())["test"]
    b = json.loads((run / "summary.json").read_text())["test"]
    assert a == b


def _default_sigint():
    """A shell's background job (`make test &`) starts with SIGINT ignored, and Python keeps an inherited ignore:
    give the child the default disposition a terminal's Ctrl-C would meet."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_saves_and_exits_cleanly(tmp_path):
    run = tmp_path / "run"
    p = subprocess.Popen([*VK, "train", "--data", "digits", "--model", "lenet", "--img-size", "16", "--epochs", "500",
                          "--quiet", "--out", str(run)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, preexec_fn=_default_sigint)  # noqa: PLW1509  (one signal() call, no locks)
    deadline = time.time() + 120
    while not (run / "metrics.csv").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)  # an epoch has finished: we are inside the training loop
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    ck = torch.load(run / "last.pt", weights_only=True)
    assert ck["state"]["epoch"] >= 1
    vk("train", "--resume", run, "--epochs", str(ck["state"]["epoch"] + 1), "--quiet")


def test_bad_weights_inputs_give_one_line_errors(trained, folder, tmp_path):
    """The issue's bad inputs for transfer learning, through the CLI; no run dir is left behind."""
    base = ["train", "--data", folder, "--img-size", "32", "--quiet", "--epochs", "1", "--set", "data.workers=0"]
    lenet = trained / "best.pt"  # a visionkit checkpoint of another architecture
    user_error(vk_here(*base, "--model", "timm:resnet10t", "--weights", lenet, "--out", tmp_path / "a"),
               "another architecture")
    data = (trained / "best.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    user_error(vk_here(*base, "--model", "lenet", "--weights", tmp_path / "cut.pt", "--out", tmp_path / "b"),
               "truncated")
    (tmp_path / "evil.pt").write_bytes(b"\x80\x04cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode()
                                       + b"'\ntR.")
    user_error(vk_here(*base, "--model", "lenet", "--weights", tmp_path / "evil.pt", "--out", tmp_path / "c"),
               "not a plain state dict")
    assert not (tmp_path / "pwned").exists()
    user_error(vk_here(*base, "--model", "tv:squeezenet1_1", "--finetune", "linear-probe", "--out", tmp_path / "d"),
               "Linear classifier head")
    user_error(vk_here(*base, "--model", "lenet", "--pretrained", "--out", tmp_path / "e"),
               "has no pretrained weights")
    assert not any((tmp_path / x).exists() for x in "abcde")


def test_weights_from_a_checkpoint_then_lr_find(trained, folder, tmp_path):
    r = vk("train", "--data", folder, *TINY, "--epochs", "1", "--weights", trained / "best.pt", "--finetune", "staged",
           "--out", tmp_path / "ft")
    assert json.loads((tmp_path / "ft" / "finetune.json").read_text())["strategy"] == "staged"
    r = vk("lr-find", "--data", folder, *TINY, "--out", tmp_path / "lr", "--steps", "30")
    assert "suggested lr" in r.stdout
    saved = json.loads((tmp_path / "lr" / "lr_find.json").read_text())
    assert len(saved["lrs"]) <= 30 and saved["suggestion"] > 0
    assert (tmp_path / "lr" / "lr_find.png").stat().st_size > 1000
