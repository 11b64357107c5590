"""Fashion-MNIST on this machine with the shipped recipes: test accuracy and whole-command wall time.

Claims (2-core CPU): recipe `fast-cpu` reaches >= 93.0% test accuracy within 5 minutes wall, and recipe
`fast-cpu-long` >= 94.5% within 20 minutes, for the whole `visionkit train` command (process start, data load,
training, validation, final test scoring), mean ± std over 3 seeds.

Each run is a real `visionkit train` subprocess; the accuracy is the `test.acc1` it writes to summary.json.
With --peer, the plain PyTorch baseline in ../shared/peers/fm_plain.py runs beside it (skipped when absent).

Usage: python benchmarks/fashion_mnist.py [--recipes fast-cpu fast-cpu-long] [--seeds 0 1 2] [--peer]
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"fast-cpu": (0.930, 300), "fast-cpu-long": (0.945, 1200)}


def run_visionkit(recipe: str, seed: int, out: Path) -> dict:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "visionkit", "train", "--data", "fashion-mnist", "--recipe", recipe,
           "--seed", str(seed), "--out", str(out), "--quiet"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    s = json.loads((out / "summary.json").read_text())
    return {"recipe": recipe, "seed": seed, "test_acc1": s["test"]["acc1"], "wall_s": wall,
            "epochs": s["epochs_run"]}


def run_peer(seed: int) -> dict | None:
    peer = ROOT.parent / "shared" / "peers" / "fm_plain.py"
    if not peer.exists():
        print("peer baseline not found (../shared/peers/fm_plain.py): skipped")
        return None
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(peer), "32", "5"], capture_output=True, text=True, check=True)
    acc = float(re.findall(r"test_acc=([0-9.]+)", r.stdout)[-1])
    return {"recipe": "peer fm_plain.py 32 5", "seed": 0, "test_acc1": acc, "wall_s": time.perf_counter() - t0}


def ms(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", nargs="+", default=["fast-cpu", "fast-cpu-long"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--peer", action="store_true")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "out" / "fashion_mnist.json"))
    a = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as d:
        for recipe in a.recipes:
            for seed in a.seeds:
                r = run_visionkit(recipe, seed, Path(d) / f"{recipe}-{seed}")
                print(f"{recipe} seed {seed}: test {r['test_acc1']:.4f}  wall {r['wall_s']:.0f}s", flush=True)
                results.append(r)
    if a.peer:
        p = run_peer(0)
        if p:
            print(f"peer: test {p['test_acc1']:.4f}  wall {p['wall_s']:.0f}s")
            results.append(p)
    print("\n| recipe | runs | test acc1 (mean ± std) | wall s (mean ± std) | target | met |\n|---|---|---|---|---|---|")
    table = []
    for recipe in dict.fromkeys(r["recipe"] for r in results):
        rs = [r for r in results if r["recipe"] == recipe]
        acc, wall = ms([r["test_acc1"] for r in rs]), ms([r["wall_s"] for r in rs])
        tgt = TARGETS.get(recipe)
        met = "" if not tgt else ("yes" if acc[0] >= tgt[0] and max(r["wall_s"] for r in rs) <= tgt[1] else "NO")
        tgt_s = f">= {tgt[0]:.1%} in {tgt[1]} s" if tgt else ""
        print(f"| {recipe} | {len(rs)} | {acc[0]:.2%} ± {acc[1]:.2%} | {wall[0]:.0f} ± {wall[1]:.0f} | {tgt_s} | {met} |")
        table.append({"recipe": recipe, "acc_mean": acc[0], "acc_std": acc[1], "wall_mean": wall[0],
                      "wall_std": wall[1], "met": met})
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": results, "table": table}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
