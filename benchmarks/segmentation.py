"""seg-shapes on a CPU: `visionkit train --recipe seg-cpu` next to a plain torchvision-reference-style loop.

Three measurements, one script:

1. **recipe**: ``visionkit train --data seg-shapes --recipe seg-cpu --seed S`` for each seed, as a subprocess with a
   fresh ``--out`` in a temp dir; the whole command is timed (process start to exit). From the run: ``test.miou``
   (summary.json, best-on-val weights), the epochs the time budget chose (config.yaml) and the per-epoch
   val mIoU / training seconds (metrics.csv).
2. **peer**: ``benchmarks/peers/tv_seg_reference.py`` (torchvision references/segmentation idiom: SGD 0.9, wd 1e-4,
   poly lr, CE ignore 255, flip) training the same model (the recipe's, with its pretrained encoder) with its batch size
   for the same number of epochs the budget gave the recipe, for each seed; whole command timed too.
   Time-to-the-same-mIoU: for thresholds both reach (val mIoU, every seed), the cumulative *training* seconds to
   the first epoch at or above it (evaluation excluded on both sides); ratio = peer / recipe (> 1: the recipe
   gets there sooner).
3. **overhead**: training images/s of the engine over the plain loop for the same model, batch, optimizer (SGD
   momentum 0.9, wd 1e-4), precision and memory format, no augmentation on either side, a fixed number of epochs;
   the two alternate (peer, engine, peer, engine) so drift in machine load hits both. The engine's figure is its
   own per-epoch train time from metrics.csv (validation excluded), the peer's its own timed loop. Target >= 0.97.

The JSON records the CPU model and flags, torch version and threads, and the load average before and after every
run: on a shared machine the wall times move with the load, the mIoU does not.

Usage::

    python benchmarks/segmentation.py --seeds 3                 # the full benchmark (~30-40 min on 2 idle cores)
    python benchmarks/segmentation.py --quick                   # smoke run: 1 seed, a 1.5-minute budget, 1 epoch
    python benchmarks/segmentation.py --seeds 3 --env OMP_WAIT_POLICY=PASSIVE   # on a shared machine (see notes)
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT / "benchmarks" / "peers" / "tv_seg_reference.py"
RECIPE = ROOT / "visionkit" / "recipes" / "seg-cpu.yaml"
EXTRA_ENV: dict[str, str] = {}  # --env KEY=VALUE: set for every subprocess (recipe, peer, overhead runs alike)
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.875, 0.9, 0.925, 0.95)


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


def machine() -> dict:
    import torch
    info: dict = {"python": platform.python_version(), "torch": torch.__version__,
                  "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "uptime": uptime()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = re.search(r"^model name\s*:\s*(.*)$", text, re.MULTILINE)
        flags = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
        info["cpu_model"] = model.group(1).strip() if model else platform.processor()
        fl = flags.group(1).split() if flags else []
        info["cpu_simd_flags"] = sorted(f for f in fl if f.startswith(("avx", "amx", "fma", "sse4")))
        info["cpu_native_bf16"] = any(f in fl for f in ("avx512_bf16", "amx_bf16"))
    except OSError:
        info["cpu_model"] = platform.processor()
    try:
        from visionkit.core.runtime import amp_dtype
        info["amp_auto_on_cpu"] = str(amp_dtype("auto", torch.device("cpu"), warn=False))
    except Exception as e:  # noqa: BLE001 - informational
        info["amp_auto_on_cpu"] = f"unknown ({type(e).__name__})"
    return info


def run_cmd(cmd: list[str], log: Path, env: dict | None = None) -> tuple[int, float, dict]:
    """Run ``cmd`` (output to ``log``); (exit code, wall seconds, {load before, load after})."""
    before = load()
    env = {**os.environ, **EXTRA_ENV, **(env or {})}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, check=False).returncode
    wall = time.perf_counter() - t0
    return rc, wall, {"load_before": before, "load_after": load()}


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]


def visionkit_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("visionkit")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "visionkit"]


def recipe_run(seed: int, tmp: Path, overrides: list[str], logs: Path) -> dict:
    out = tmp / f"recipe-s{seed}"
    cmd = [*visionkit_cmd(), "train", "--data", "seg-shapes", "--recipe", "seg-cpu", "--seed", str(seed),
           "--out", str(out)]
    if overrides:
        cmd += ["--set", *overrides]
    print("$ " + " ".join(cmd), flush=True)
    rc, wall, ld = run_cmd(cmd, logs / f"recipe-s{seed}.log")
    if rc != 0:
        raise SystemExit(f"recipe run failed (exit {rc}); see {logs / f'recipe-s{seed}.log'}")
    summary = json.loads((out / "summary.json").read_text())
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    hist = read_metrics(out)
    cum, curve = 0.0, []
    for r in hist:
        cum += r["time"]
        curve.append({"epoch": int(r["epoch"]), "val_miou": r.get("val_miou"), "cum_train_s": cum})
    res = {"seed": seed, "command": " ".join(cmd), "command_wall_s": wall, **ld,
           "test_miou": summary["test"]["miou"], "summary_wall_seconds": summary.get("wall_seconds"),
           "epochs": cfg["train"]["epochs"], "batch_size": cfg["data"]["batch_size"],
           "model": cfg["model"]["name"], "model_kwargs": cfg["model"]["kwargs"],
           "channels_last": cfg["model"]["channels_last"], "train_seconds": cum,
           "train_images_per_s": (len(hist) * (2000 // cfg["data"]["batch_size"]) * cfg["data"]["batch_size"]) / cum
           if cum else None, "curve": curve}
    print(f"  recipe seed {seed}: test mIoU {res['test_miou']:.4f}, {res['epochs']} epochs, whole command "
          f"{wall:.1f} s, load {ld['load_before'][0]} -> {ld['load_after'][0]}", flush=True)
    return res


def peer_run(seed: int, tmp: Path, args: list[str], logs: Path, tag: str = "peer") -> dict:
    js = tmp / f"{tag}-s{seed}.json"
    cmd = [sys.executable, str(PEER), "--seed", str(seed), "--json", str(js), *args]
    print("$ " + " ".join(cmd), flush=True)
    rc, wall, ld = run_cmd(cmd, logs / f"{tag}-s{seed}.log")
    if rc != 0:
        raise SystemExit(f"peer run failed (exit {rc}); see {logs / f'{tag}-s{seed}.log'}")
    r = json.loads(js.read_text())
    res = {"seed": seed, "command": " ".join(cmd), "command_wall_s": wall, **ld,
           "test_miou": (r.get("test") or {}).get("miou"), "epochs": r["epochs"], "lr": r["lr"],
           "train_seconds": r["train_seconds"], "train_images_per_s": r["train_images_per_s"],
           "curve": [{"epoch": h["epoch"], "val_miou": h.get("val_miou"), "cum_train_s": h["cum_train_s"]}
                     for h in r["history"]]}
    if res["test_miou"] is not None:
        print(f"  peer seed {seed}: test mIoU {res['test_miou']:.4f}, {res['epochs']} epochs, whole command "
              f"{wall:.1f} s, load {ld['load_before'][0]} -> {ld['load_after'][0]}", flush=True)
    return res


def mean_std(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def time_to(curve: list[dict], thr: float) -> float | None:
    return next((c["cum_train_s"] for c in curve if c["val_miou"] is not None and c["val_miou"] >= thr), None)


def time_to_same_miou(recipe: list[dict], peer: list[dict]) -> dict:
    out: dict = {"basis": "cumulative training seconds to the first epoch with val mIoU >= threshold "
                          "(evaluation excluded), mean over seeds; ratio = peer / recipe", "thresholds": {}}
    best = None
    for thr in THRESHOLDS:
        tr = [time_to(r["curve"], thr) for r in recipe]
        tp = [time_to(p["curve"], thr) for p in peer]
        if any(t is None for t in tr + tp) or not tr or not tp:
            continue
        row = {"recipe_s": statistics.mean(tr), "peer_s": statistics.mean(tp)}
        row["ratio_peer_over_recipe"] = row["peer_s"] / row["recipe_s"]
        out["thresholds"][str(thr)] = row
        best = thr
    out["headline_threshold"] = best
    return out


def peer_model_args(cfg: dict) -> list[str]:
    """The recipe's model for the peer: name, keyword arguments, pretrained encoder."""
    m = cfg.get("model", {})
    name, kwargs = m.get("name", "unet"), dict(m.get("kwargs") or {})
    args = ["--model", name]
    if name == "unet":
        args += ["--base", str(kwargs.pop("base", 16))]
    if kwargs:
        args += ["--model-kwargs", json.dumps(kwargs)]
    return args + (["--pretrained"] if m.get("pretrained") else [])


def overhead(tmp: Path, logs: Path, cfg: dict, epochs: int, repeats: int) -> dict:
    """Engine vs plain loop training images/s: same model, batch, optimizer, precision, memory format, no aug."""
    m = cfg.get("model", {})
    bs = cfg.get("data", {}).get("batch_size", 128)
    cl = bool(cfg.get("model", {}).get("channels_last", True))
    lr = 0.02 * bs / 32
    amp = "off"  # this comparison is fp32 (the fast path on CPUs without native bf16; the recipe's auto picks it)
    try:
        import torch

        from visionkit.core.runtime import amp_dtype
        if amp_dtype(cfg.get("train", {}).get("amp", "auto"), torch.device("cpu"), warn=False) is not None:
            amp = "bf16"
    except Exception as e:  # noqa: BLE001 - fp32 then
        print(f"note: could not resolve the recipe's amp ({e}); comparing in fp32", file=sys.stderr)
    eng_ips, peer_ips, runs = [], [], []
    for rep in range(repeats):
        p = peer_run(rep, tmp, [*peer_model_args(cfg), "--batch-size", str(bs), "--epochs", str(epochs), "--lr", str(lr),
                                "--no-flip", "--no-eval", "--amp", amp] + (["--channels-last"] if cl else []),
                     logs, tag=f"overhead-peer{rep}")
        peer_ips.append(p["train_images_per_s"])
        out = tmp / f"overhead-engine{rep}"
        cmd = [*visionkit_cmd(), "train", "--data", "seg-shapes", "--recipe", "seg-cpu", "--epochs", str(epochs),
               "--seed", str(rep), "--out", str(out), "--set", f"data.batch_size={bs}", "segment.loss=ce",
               "aug.preset=none", "optim.name=sgd", f"optim.lr={lr}", "optim.momentum=0.9", "optim.nesterov=false",
               "optim.weight_decay=0.0001", "sched.name=linear", f"train.amp={amp}", f"model.channels_last={cl}",
               "train.report=false", "train.budget_min=0"]
        print("$ " + " ".join(cmd), flush=True)
        rc, _wall, ld = run_cmd(cmd, logs / f"overhead-engine{rep}.log")
        if rc != 0:
            raise SystemExit(f"engine run failed (exit {rc}); see {logs / f'overhead-engine{rep}.log'}")
        hist = read_metrics(out)
        secs = sum(r["time"] for r in hist)
        ips = len(hist) * (2000 // bs) * bs / secs
        eng_ips.append(ips)
        runs.append({"repeat": rep, "peer_images_per_s": p["train_images_per_s"], "engine_images_per_s": ips,
                     "peer_load": [p["load_before"], p["load_after"]], "engine_load": [ld["load_before"],
                                                                                     ld["load_after"]]})
        print(f"  overhead repeat {rep}: peer {p['train_images_per_s']:.1f} img/s, engine {ips:.1f} img/s "
              f"(ratio {ips / p['train_images_per_s']:.3f})", flush=True)
    ratio = statistics.mean(eng_ips) / statistics.mean(peer_ips)
    ratios = [e / p for e, p in zip(eng_ips, peer_ips)]
    return {"model": m.get("name"), "kwargs": m.get("kwargs"), "pretrained": bool(m.get("pretrained")),
            "batch_size": bs, "epochs": epochs, "amp": amp, "channels_last": cl,
            "optimizer": f"sgd momentum 0.9 wd 1e-4 lr {lr:g}", "augmentation": "none (both)",
            "engine_images_per_s": eng_ips, "peer_images_per_s": peer_ips, "ratio_engine_over_peer": ratio,
            "ratio_per_pair": ratios, "target": 0.97, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="3", help="a count N (seeds 0..N-1) or a comma list of seeds")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 1.5-min budget, 1 overhead epoch")
    ap.add_argument("--peer-epochs", type=int, default=None, help="default: the epochs the recipe's budget chose")
    ap.add_argument("--overhead-epochs", type=int, default=None, help="default 2 (quick: 1)")
    ap.add_argument("--overhead-repeats", type=int, default=None, help="default 2 (quick: 1)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: recipe, peer, overhead")
    ap.add_argument("--set", nargs="*", default=[], help="extra --set overrides for the recipe runs")
    ap.add_argument("--json", default=None, help="default benchmarks/out/segmentation.json (quick: _quick)")
    ap.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE",
                    help="environment for every run, e.g. OMP_WAIT_POLICY=PASSIVE (see benchmarks/notes/seg_recipe.md)")
    ap.add_argument("--keep", default=None, help="keep run directories and logs here instead of a temp dir")
    a = ap.parse_args()

    EXTRA_ENV.update(dict(kv.split("=", 1) for kv in a.env))
    seeds = [int(s) for s in a.seeds.split(",")] if "," in a.seeds else list(range(int(a.seeds)))
    overrides = list(a.set)
    if a.quick:
        seeds = seeds[:1]
        overrides = ["train.budget_min=1.5", *overrides]
    skip = {s for s in a.skip.split(",") if s}
    ov_epochs = a.overhead_epochs or (1 if a.quick else 2)
    ov_repeats = a.overhead_repeats or (1 if a.quick else 2)
    out_json = Path(a.json or ROOT / "benchmarks" / "out" / ("segmentation_quick.json" if a.quick
                                                             else "segmentation.json"))
    recipe_cfg = yaml.safe_load(RECIPE.read_text())

    result: dict = {"benchmark": "seg-shapes: visionkit --recipe seg-cpu vs torchvision-reference-style loop",
                    "argv": sys.argv[1:], "quick": a.quick, "seeds": seeds, "machine": machine(),
                    "recipe_file": str(RECIPE.relative_to(ROOT)), "recipe": recipe_cfg, "recipe_overrides": overrides,
                    "env": dict(EXTRA_ENV),
                    "note": "shared machine: wall times move with the load average recorded next to each run; "
                            "mIoU does not (the budget turns load into fewer epochs, though)"}
    print(f"machine: {result['machine'].get('cpu_model')}, torch {result['machine']['torch']}, "
          f"{result['machine']['torch_threads']} threads; env {EXTRA_ENV or '-'}; {result['machine']['uptime']}",
          flush=True)
    ctx = tempfile.TemporaryDirectory(prefix="vk-segbench-") if a.keep is None else None
    tmp = Path(a.keep) if a.keep else Path(ctx.name)
    tmp.mkdir(parents=True, exist_ok=True)
    logs = tmp / "logs"
    logs.mkdir(exist_ok=True)
    t_all = time.perf_counter()

    def save() -> None:
        result["total_seconds"] = time.perf_counter() - t_all
        result["uptime_end"] = uptime()
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(result, indent=2))

    try:
        recipe, peer = [], []
        if "recipe" not in skip:
            for s in seeds:
                recipe.append(recipe_run(s, tmp, overrides, logs))
                result["recipe_runs"] = recipe
                save()
            result["recipe_summary"] = {"test_miou": mean_std([r["test_miou"] for r in recipe]),
                                        "command_wall_s": mean_std([r["command_wall_s"] for r in recipe]),
                                        "epochs": [r["epochs"] for r in recipe],
                                        "train_images_per_s": mean_std([r["train_images_per_s"] for r in recipe])}
        bs = recipe_cfg.get("data", {}).get("batch_size", 128)
        cl = bool(recipe_cfg.get("model", {}).get("channels_last", True))
        if "peer" not in skip:
            ep = a.peer_epochs or (round(statistics.median([r["epochs"] for r in recipe])) if recipe else 10)
            for s in seeds:
                peer.append(peer_run(s, tmp, [*peer_model_args(recipe_cfg), "--batch-size", str(bs), "--epochs", str(ep)]
                                     + (["--channels-last"] if cl else []), logs))
                result["peer_runs"] = peer
                save()
            result["peer_summary"] = {"test_miou": mean_std([p["test_miou"] for p in peer]),
                                      "command_wall_s": mean_std([p["command_wall_s"] for p in peer]),
                                      "epochs": ep, "train_images_per_s": mean_std([p["train_images_per_s"]
                                                                                    for p in peer])}
        if recipe and peer:
            result["time_to_same_miou"] = time_to_same_miou(recipe, peer)
            save()
        if "overhead" not in skip:
            result["overhead"] = overhead(tmp, logs, recipe_cfg, ov_epochs, ov_repeats)
            save()
    finally:
        save()
        if ctx is not None:
            ctx.cleanup()

    # ---- table
    print("\n| | test mIoU (mean ± std) | whole command s | epochs | train img/s |")
    print("|---|---|---|---|---|")
    for name, key in (("visionkit --recipe seg-cpu", "recipe_summary"), ("torchvision-reference loop", "peer_summary")):
        sm = result.get(key)
        if not sm:
            continue
        t, w, ips = sm["test_miou"], sm["command_wall_s"], sm["train_images_per_s"]
        print(f"| {name} | {t['mean']:.4f} ± {t['std']:.4f} (n={t['n']}) | {w['mean']:.1f} ± {w['std']:.1f} | "
              f"{sm['epochs']} | {ips['mean']:.1f} |")
    tt = result.get("time_to_same_miou")
    if tt and tt["headline_threshold"] is not None:
        row = tt["thresholds"][str(tt["headline_threshold"])]
        print(f"\ntime to val mIoU >= {tt['headline_threshold']}: recipe {row['recipe_s']:.1f} s, peer "
              f"{row['peer_s']:.1f} s of training (peer / recipe = {row['ratio_peer_over_recipe']:.2f})")
    ov = result.get("overhead")
    if ov:
        print(f"overhead: engine {statistics.mean(ov['engine_images_per_s']):.1f} img/s vs plain loop "
              f"{statistics.mean(ov['peer_images_per_s']):.1f} img/s -> ratio {ov['ratio_engine_over_peer']:.3f} "
              f"(target >= 0.97; per pair {', '.join(f'{r:.3f}' for r in ov['ratio_per_pair'])})")
    print(f"\nwrote {out_json} ({result['total_seconds']:.0f} s); {uptime()}")


if __name__ == "__main__":
    main()
