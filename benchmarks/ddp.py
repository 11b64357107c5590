"""Several processes (DDP): what `visionkit train --devices N` costs or gains against one process, on this machine.

Claim (issue #5): the same recipe trains the same model on N workers (the global batch is fixed), and the figures
say what to expect from scaling on this machine. On the 2-core CPU, 2 Gloo workers share the cores one process
already uses, so they cannot be faster. The CPU numbers measure the overhead of DDP; the GPU numbers (when a GPU
machine runs this) measure NCCL through torchrun with world size 1 against a plain single process.

Each configuration is a real `visionkit train` subprocess on Fashion-MNIST (recipe fast-cpu, no report), repeated
``--repeats`` times. Throughput is training images per second from the per-epoch train time in metrics.csv (epoch 1
excluded when there are several: it includes warm-up). It also records the test accuracy of each run.

Usage: python benchmarks/ddp.py [--epochs 2] [--repeats 2] [--configs 1 2] [--json benchmarks/out/ddp.json]
       (on a GPU machine: --configs 1 torchrun1 --device cuda)
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
N_TRAIN = 60000


def run(config: str, epochs: int, device: str, out: Path, recipe: str) -> dict:
    base = ["train", "--data", "fashion-mnist", "--recipe", recipe, "--epochs", str(epochs), "--device", device,
            "--out", str(out), "--quiet", "--set", "train.report=false"]
    if config == "1":
        cmd = [sys.executable, "-m", "visionkit", *base]
    elif config == "torchrun1":  # NCCL (or Gloo) with world size 1, as torchrun starts it
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               "-m", "visionkit", *base]
    else:
        cmd = [sys.executable, "-m", "visionkit", *base, "--devices", config]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    with open(out / "metrics.csv") as f:
        times = [float(r["time"]) for r in csv.DictReader(f)]
    steady = times[1:] if len(times) > 1 else times
    summary = json.loads((out / "summary.json").read_text())
    return {"config": config, "epoch_s": times, "img_s": N_TRAIN / statistics.mean(steady), "wall_s": wall,
            "test_acc1": summary.get("test", {}).get("acc1"), "world_size": summary.get("world_size", 1)}


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.0f} ± {statistics.stdev(xs):.0f}" if len(xs) > 1 else f"{xs[0]:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--configs", nargs="+", default=["1", "2"], help="1, torchrun1, or a worker count for --devices")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--recipe", default="fast-cpu")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "out" / "ddp.json"))
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="vk-ddp-"))
    results: dict[str, list[dict]] = {c: [] for c in a.configs}
    for rep in range(a.repeats):  # interleaved, so that drift of the machine hits every configuration alike
        for c in a.configs:
            results[c].append(run(c, a.epochs, a.device, tmp / f"{c}-{rep}", a.recipe))
            print(f"{c}: {results[c][-1]['img_s']:.0f} img/s, test {results[c][-1]['test_acc1']}", file=sys.stderr)

    base = statistics.mean(r["img_s"] for r in results[a.configs[0]])
    print(f"\n{'config':>10} | {'workers':>7} | {'train img/s':>13} | {'vs ' + a.configs[0]:>8} | test acc1 (each run)")
    print("-" * 72)
    for c, runs in results.items():
        ips = [r["img_s"] for r in runs]
        accs = ", ".join(f"{r['test_acc1']:.4f}" for r in runs)
        print(f"{c:>10} | {runs[0]['world_size']:>7} | {mean_std(ips):>13} | {statistics.mean(ips) / base:>7.2f}x | {accs}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                        "cpus": os.cpu_count(), "device": a.device, "recipe": a.recipe,
                                        "epochs": a.epochs, "results": results}, indent=2))
    print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
