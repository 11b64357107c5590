"""Training on several processes (torch.distributed, Gloo on CPU): the splits of the data, exact metrics, the loop's
DDP pieces, and whole runs through `visionkit train --devices 2` and torchrun, including a worker killed mid-epoch."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import ddp_workers
import pytest
import torch
import torch.multiprocessing as mp
import yaml

from visionkit.api import check_world
from visionkit.config import ConfigError, resolve_config
from visionkit.data import make_loader
from visionkit.data.datasets import TensorImages
from visionkit.engine import evaluate, load_checkpoint
from visionkit.engine.distributed import Dist, DistError, check_devices, from_env, plan_local, worker_device
from visionkit.finetune import FeatureLoader
from visionkit.models import create_model
from visionkit.tasks import ClassificationTask

TINY = ["--data", "digits", "--model", "lenet", "--img-size", "32", "--batch-size", "64", "--quiet",
        "--set", "aug.preset=none", "train.amp=off", "train.report=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def visionkit(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "visionkit", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, check=False)


def tensors(run: Path, name: str = "last.pt") -> dict:
    return load_checkpoint(run / name)["model"]


def assert_same_weights(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        torch.testing.assert_close(v, b[k], atol=atol, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


# ------------------------------------------------------------------------------------------------ data splits
def _loader(n: int, batch: int, train: bool, rank: int, world: int, **kw):
    ids = torch.arange(n)
    images = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)  # sample i carries i in its first two pixels
    images[:, 0, 0, 0], images[:, 0, 0, 1] = (ids % 256).to(torch.uint8), (ids // 256).to(torch.uint8)
    ds = TensorImages(images, ids % 3, ["a", "b", "c"])
    return make_loader(ds, batch_size=batch, train=train, seed=3, device="cpu", input_size=(1, 2, 2), mean=(0.0,),
                       std=(1 / 255,), rank=rank, world=world, **kw)


def _ids(x: torch.Tensor) -> list[int]:
    return (x[:, 0, 0, 0] + 256 * x[:, 0, 0, 1]).round().long().tolist()


@pytest.mark.parametrize("n,batch,world", [(100, 20, 2), (100, 24, 3), (7, 8, 2), (3, 8, 4), (50, 10, 1)])
def test_training_batches_split_the_single_process_batch(n, batch, world):
    """Worker r's batch b is its slice of global batch b: together they are the one-process batch, equally sized."""
    single = [_ids(x) for x, _ in _loader(n, batch, True, 0, 1).epoch(2)]
    parts = [[_ids(x) for x, _ in _loader(n, batch, True, r, world).epoch(2)] for r in range(world)]
    assert all(len(p) == len(single) for p in parts)  # same number of steps everywhere (else DDP would hang)
    for b, whole in enumerate(single):
        sizes = {len(p[b]) for p in parts}
        assert len(sizes) == 1  # equal local batches: DDP's gradient mean is then the global batch's mean
        joined = [i for p in parts for i in p[b]]
        if n >= batch * world or n % world == 0:
            assert joined == whole
        else:  # a short epoch is padded with its first samples (DistributedSampler's rule)
            assert joined[:len(whole)] == whole and set(joined) <= set(range(n))
    # resume mid-epoch: the rest of the epoch from batch k, on any rank
    assert [_ids(x) for x, _ in _loader(n, batch, True, world - 1, world).epoch(2, start=1)] == parts[-1][1:]


@pytest.mark.parametrize("n,batch,world", [(359, 50, 2), (10, 8, 3), (2, 8, 4)])
def test_evaluation_parts_cover_every_sample_once(n, batch, world):
    seen = sorted(i for r in range(world) for x, _ in _loader(n, batch, False, r, world).epoch(0) for i in _ids(x))
    assert seen == list(range(n))


def test_feature_loader_splits_like_the_image_loaders():
    f, y = torch.arange(30.0).view(30, 1), torch.arange(30) % 2
    single = [b[0].view(-1).tolist() for b in FeatureLoader(f, y, 10, True, 0).epoch(1)]
    parts = [[b[0].view(-1).tolist() for b in FeatureLoader(f, y, 10, True, 0, r, 2).epoch(1)] for r in range(2)]
    assert [p0 + p1 for p0, p1 in zip(*parts)] == single


def test_a_global_batch_that_does_not_split_is_refused():
    with pytest.raises(ValueError, match="does not split evenly over 3 workers"):
        _loader(10, 8, True, 0, 3)
    cfg = resolve_config(overrides={"data.batch_size": 100})
    with pytest.raises(ConfigError, match="multiple of 3 \\(e.g. 99 or 102\\)"):
        check_world(cfg, 3, "cpu")
    check_world(cfg, 4, "cpu")
    with pytest.raises(ConfigError, match="SyncBatchNorm runs on CUDA only"):
        check_world(resolve_config(overrides={"dist.sync_bn": True}), 2, "cpu")


# ------------------------------------------------------------------------------------------------ devices
def test_torchrun_environment_is_read():
    assert from_env({}) is None
    d = from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (d.rank, d.world, d.local_rank, d.local_world, d.is_main) == (3, 4, 1, 2, False)
    assert Dist().is_main and not Dist().enabled


def test_mixed_or_missing_devices_are_one_line_errors():
    check_devices(["cuda:0", "cuda:1"])
    check_devices(["cpu", "cpu"])
    with pytest.raises(DistError, match=r"mixed CPU and GPU workers \(cpu: ranks 2, cuda: ranks 0,1\)"):
        check_devices(["cuda:0", "cuda:1", "cpu"])
    with pytest.raises(DistError, match="local rank 2 has no GPU"):
        check_devices(["cuda:0", "error: local rank 2 has no GPU: this machine has 2"])
    assert worker_device("cpu", 5) == "cpu"
    assert worker_device("cuda:1", 0).startswith("error: --device cuda:1 names one device")
    if not torch.cuda.is_available():
        assert worker_device("auto", 1) == "cpu"
        assert worker_device("cuda", 0).startswith("error:")


def test_local_plan_refuses_more_workers_than_devices():
    cores = os.cpu_count() or 1
    assert plan_local(1, "cpu") == "cpu"
    with pytest.raises(DistError, match=f"use at most --devices {cores}"):
        plan_local(cores + 1, "cpu")
    with pytest.raises(DistError, match="at least 1"):
        plan_local(0, "auto")
    if not torch.cuda.is_available():
        with pytest.raises(DistError, match="no CUDA GPU"):
            plan_local(2, "cuda")
    else:
        with pytest.raises(DistError, match="more GPUs than this machine has"):
            plan_local(torch.cuda.device_count() + 1, "auto")


# ------------------------------------------------------------------------------------------------ Gloo processes
def _spawn(fn, world: int, *args) -> None:
    mp.spawn(fn, args=(world, free_port(), *args), nprocs=world, join=True)


def test_evaluation_on_two_processes_equals_one_process(tmp_path):
    model = create_model("lenet", num_classes=10, in_chans=1)
    torch.manual_seed(1)
    for p in model.parameters():  # an arbitrary model, so that some images are wrong
        p.data.normal_(0, 0.3)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    single = evaluate(model, ClassificationTask(10), ddp_workers._digits_loader(0, 1, 50, False, size=32), full=True)
    _spawn(ddp_workers.evaluate_worker, 2, str(tmp_path / "w.pt"), str(tmp_path))
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        assert (res["n"], res["acc1"], res["acc5"]) == (single["n"], single["acc1"], single["acc5"]) == (
            359, single["acc1"], single["acc5"])
        assert res["confusion_matrix"] == single["confusion_matrix"]
        assert res["loss"] == pytest.approx(single["loss"], rel=1e-6)
    assert 0.05 < single["acc1"] < 0.95  # not a degenerate model


@pytest.mark.parametrize("accum", [2])
def test_ddp_loop_all_reduces_once_per_step_and_keeps_ranks_identical(tmp_path, accum):
    """Two ranks start from different weights (rank 0's win), freeze then unfreeze (the DDP wrapper is rebuilt),
    accumulate 2 batches per step (one all-reduce per step, not per batch) and keep an EMA of a BatchNorm net."""
    _spawn(ddp_workers.trainer_worker, 2, str(tmp_path), accum)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["steps"] == 2 * -(-r0["batches"] // accum)  # 2 epochs of ceil(batches / accum) steps
    assert r0["wrappers"] == 2  # head only, then everything
    assert r0["calls"] == r0["steps"]  # one bucket each: one all-reduce per optimizer step
    assert r0["model"] == r1["model"] and r0["ema"] == r1["ema"]
    # metrics are reduced: every rank has the same numbers (and so takes the same decisions); only wall time differs
    assert [{k: v for k, v in row.items() if k != "time"} for row in r0["history"]] == \
        [{k: v for k, v in row.items() if k != "time"} for row in r1["history"]]
    assert r0["history"][-1]["train_loss"] < r0["history"][0]["train_loss"] - 0.1  # it learns


# ------------------------------------------------------------------------------------------------ whole runs
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One epoch on 1 process (batch 64) and on 2 (32 each), then each resumed for a second epoch on the other count."""
    d = tmp_path_factory.mktemp("ddp")
    one, two = d / "one", d / "two"
    r1 = visionkit("train", *TINY, "--epochs", "1", "--out", str(one))
    r2 = visionkit("train", *TINY, "--epochs", "1", "--out", str(two), "--devices", "2")
    assert r1.returncode == 0, r1.stderr
    assert r2.returncode == 0, r2.stderr
    first = {"one": tensors(one), "two": tensors(two)}
    r3 = visionkit("train", "--resume", str(one), "--epochs", "2", "--devices", "2", "--quiet")  # 1 -> 2 workers
    r4 = visionkit("train", "--resume", str(two), "--epochs", "2", "--quiet")  # 2 -> 1
    assert r3.returncode == 0, r3.stderr
    assert r4.returncode == 0, r4.stderr
    return {"one": one, "two": two, "first": first, "stderr2": r2.stderr, "resume_stderr": r3.stderr + r4.stderr}


def test_two_workers_train_what_one_trains(runs):
    """2 processes x batch 32 against 1 process x batch 64, same seed, no augmentation: the same parameters after
    the epoch's 16 steps, to float tolerance."""
    assert_same_weights(runs["first"]["one"], runs["first"]["two"])


def test_two_workers_write_one_run_directory(runs):
    two = runs["two"]
    cfg = yaml.safe_load((two / "config.yaml").read_text())
    assert cfg["data"]["batch_size"] == 64
    assert cfg["dist"]["world_size"] == 2 and cfg["dist"]["batch_per_device"] == 32
    assert json.loads((two / "env.json").read_text())["world_size"] == 2
    rows = (two / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 3  # header + 2 epochs: written once (rank 0), not once per rank
    assert not list(two.glob(".*.tmp"))
    assert "error" not in runs["stderr2"].lower() and "Traceback" not in runs["stderr2"]


def test_resume_on_a_different_number_of_workers(runs):
    """1 -> 2 and 2 -> 1: both continue at epoch 2 and end with the same weights (same global batches)."""
    assert "on 2 workers (it was written by 1)" in runs["resume_stderr"]
    assert "on 1 worker (it was written by 2)" in runs["resume_stderr"]
    for name in ("one", "two"):
        assert load_checkpoint(runs[name] / "last.pt")["state"]["epoch"] == 2
        assert len((runs[name] / "metrics.csv").read_text().strip().splitlines()) == 3
    assert_same_weights(tensors(runs["one"]), tensors(runs["two"]), atol=1e-4)
    evals = [json.loads((runs[n] / "summary.json").read_text()) for n in ("one", "two")]
    assert evals[0]["final"]["val_acc1"] == pytest.approx(evals[1]["final"]["val_acc1"], abs=2 / 359)


def _worker_pids(launcher: int) -> dict[int, int]:
    """rank -> pid of the launcher's worker processes (their environment holds RANK)."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            env = (p / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) != launcher:
            continue
        for kv in env:
            if kv.startswith(b"RANK="):
                out[int(kv[5:])] = int(p.name)
    return out


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc (Linux)")
def test_a_killed_worker_stops_the_job_and_the_run_resumes_on_one(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "visionkit", "train", *TINY, "--batch-size", "16", "--epochs", "30",
                             "--save-every", "20", "--devices", "2", "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "last.pt").exists():  # training has started and written a checkpoint
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
            time.sleep(0.05)
        workers = _worker_pids(proc.pid)
        assert sorted(workers) == [0, 1]
        os.kill(workers[1], signal.SIGKILL)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode not in (0, None)
    assert took < 45  # the agent noticed and stopped rank 0: no hang in its next all-reduce
    assert f"error: worker rank 1 was killed by SIGKILL; the job was stopped. Its last checkpoint is intact: " \
           f"continue with `visionkit train --resume {run}`" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2, err  # + rank 0's "lost contact" line
    ckpt = load_checkpoint(run / "last.pt")  # the last atomic checkpoint is whole
    stopped_at = ckpt["state"]["step"]
    end = ckpt["state"]["epoch"] + 2  # the rest of the killed epoch and one more (not all 30: test time)
    res = visionkit("train", "--resume", str(run), "--epochs", str(end), "--quiet")
    assert res.returncode == 0, res.stderr
    done = load_checkpoint(run / "last.pt")["state"]
    assert done["epoch"] == end and done["step"] % end == 0 and 0 < stopped_at < done["step"]
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == end + 1


def test_torchrun_on_two_nodes(tmp_path):
    """The contract's second form: `torchrun --nnodes 2 ... -m visionkit train` (two local "machines" of one
    worker each, through a c10d rendezvous), with the weights one process trains on the same batches."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "t",
           "-m", "visionkit", "train", *TINY, "--epochs", "1", "--out", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [n.communicate(timeout=300) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs
    single = visionkit("train", *TINY, "--epochs", "1", "--out", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr
    assert_same_weights(tensors(tmp_path / "run"), tensors(tmp_path / "single"))
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["dist"]["world_size"] == 2


# ------------------------------------------------------------------------------------------------ bad input
def _one_error_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def _cli_error(capsys, *argv: str, code: int = 2) -> str:
    """Run the CLI in this process (checks that come before any worker starts); its one error line."""
    from visionkit.cli import main
    assert main(list(argv)) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 1 and all(line.startswith("error: ") for line in err), err
    return err[0] if err else ""


def test_bad_launches_are_one_line_errors(tmp_path, capsys):
    cores = os.cpu_count() or 1
    out = ["--out", str(tmp_path / "never")]
    assert "use at most --devices" in _cli_error(capsys, "train", *TINY, *out, "--devices", str(cores + 1),
                                                 "--device", "cpu")
    assert "multiple of 2" in _cli_error(capsys, "train", *TINY, *out, "--devices", "2", "--batch-size", "63",
                                         "--device", "cpu")
    assert "needs --rdzv-endpoint" in _cli_error(capsys, "train", *TINY, *out, "--nnodes", "2")
    assert "HOST:PORT" in _cli_error(capsys, "train", *TINY, *out, "--nnodes", "2", "--rdzv-endpoint", "node0")
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in _cli_error(capsys, "train", *TINY, *out, "--devices", "2", "--device", "cuda")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    assert "already exists and is not empty" in _cli_error(capsys, "train", *TINY, "--devices", "2",
                                                           "--out", str(tmp_path / "used"))
    assert not (tmp_path / "never").exists()


def test_a_rendezvous_nobody_answers_times_out_with_one_line(tmp_path):
    t0 = time.monotonic()
    res = visionkit("train", *TINY, "--out", str(tmp_path / "never"), "--devices", "1", "--nnodes", "2",
                    "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-timeout", "3")
    line = _one_error_line(res)
    assert "not every node joined within 3 s" in line
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "never").exists()


def test_other_commands_refuse_to_run_under_torchrun(tmp_path, capsys, monkeypatch):
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    assert "only `visionkit train` runs on several processes" in _cli_error(
        capsys, "eval", str(tmp_path), "--data", "digits")
    assert "torchrun, which started 2 workers here" in _cli_error(capsys, "train", *TINY, "--devices", "3")
    monkeypatch.setenv("RANK", "1")  # rank 1 meets the same error silently: rank 0 reports it
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert _cli_error(capsys, "eval", str(tmp_path), "--data", "digits") == ""


def test_detection_loss_gives_ddp_the_one_process_gradient(tmp_path):
    """TinySSD divides its summed loss by the positive anchors averaged over ranks, so the gradient DDP averages over
    2 ranks of 4 images is the gradient of one process on all 8 (BatchNorm frozen: its statistics are per rank)."""
    from visionkit.tasks.detect.models import create_det_model
    torch.manual_seed(0)
    model = create_det_model("tinyssd", 5, img_size=64)
    x, targets = ddp_workers.det_batch()
    assert sum(len(t["labels"]) for t in targets[:4]) != sum(len(t["labels"]) for t in targets[4:])  # uneven ranks
    single = ddp_workers.det_grads(model, x, targets)
    _spawn(ddp_workers.det_loss_worker, 2, str(tmp_path))
    for r in range(2):
        grads = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        for k, g in single.items():
            assert torch.allclose(grads[k], g, atol=1e-5, rtol=1e-4), k
