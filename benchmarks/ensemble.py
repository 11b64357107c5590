"""Ensembles and test-time augmentation on Fashion-MNIST: does combining differently seeded models, or TTA, help?

Claim (issue #4): an ensemble of two differently seeded models scores at least as well as its best member on the
held-out test split (10,000 images, seen by neither model nor by any fitting), and the TTA gain is recorded.

Each member is a real `visionkit train` subprocess (recipe fast-cpu, the same validation hold-out through
`data.split_seed`). fast-cpu holds out no validation images, so the weighted ensemble's weights are fitted on the
test split out of fold (each half scored with the weights fitted on the other half); no member trained on it. Then every
combination is scored with `visionkit.tasks.classify.evaluate.evaluate_checkpoints` on the test split: each member, the mean,
vote and weighted ensembles, without TTA, with flip and with flip+crops.

Usage: python benchmarks/ensemble.py [--seeds 0 1] [--recipe fast-cpu] [--json benchmarks/out/ensemble.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def train(recipe: str, seed: int, out: Path) -> dict:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "visionkit", "train", "--data", "fashion-mnist", "--recipe", recipe,
                    "--seed", str(seed), "--out", str(out), "--quiet", "--set", "data.split_seed=0",
                    "train.report=false"], check=True, cwd=ROOT)
    s = json.loads((out / "summary.json").read_text())
    return {"seed": seed, "dir": str(out), "wall_s": time.perf_counter() - t0, "summary_test_acc1": s["test"]["acc1"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--recipe", default="fast-cpu")
    ap.add_argument("--runs", help="reuse run directories from an earlier invocation (one per seed)", nargs="*")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "out" / "ensemble.json"))
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from visionkit.tasks.classify.evaluate import evaluate_checkpoints

    tmp = Path(tempfile.mkdtemp(prefix="vk-ens-"))
    if a.runs:
        members = [{"seed": None, "dir": d} for d in a.runs]
    else:
        members = [train(a.recipe, s, tmp / f"seed{s}") for s in a.seeds]
    ckpts = [str(Path(m["dir"]) / "best.pt") for m in members]

    rows, results = [], {}
    for tta in ("none", "flip", "flip+crops"):
        for method in ("mean", "vote", "weighted"):
            t0 = time.perf_counter()
            res = evaluate_checkpoints(ckpts, "fashion-mnist", split="test", ensemble=method, tta=tta, device="cpu")
            results[f"{method}/{tta}"] = {k: res[k] for k in ("members", "ensemble", "acc1")} | {
                "eval_s": time.perf_counter() - t0}
            ens = res["ensemble"]["tta" if tta != "none" else "plain"]
            mem = [m["tta"]["acc1"] if tta != "none" else m["acc1"] for m in res["members"]]
            rows.append((method, tta, mem, ens["acc1"], max(mem), res["ensemble"].get("weights")))

    print(f"\n{'ensemble':<9} {'tta':<11} {'members acc1':<24} {'ensemble':>8} {'vs best':>8}  weights")
    for method, tta, mem, acc, best, w in rows:
        print(f"{method:<9} {tta:<11} {' '.join(f'{x:.4f}' for x in mem):<24} {acc:8.4f} {100 * (acc - best):+7.2f}p"
              f"  {w or ''}")
    out = {"recipe": a.recipe, "members": members, "split": "test", "results": results,
           "table": [{"ensemble": r[0], "tta": r[1], "members_acc1": r[2], "ensemble_acc1": r[3],
                      "gain_vs_best_member": r[3] - r[4], "weights": r[5]} for r in rows]}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
