"""`visionkit` command line: a thin layer over visionkit.api. User mistakes print one line and exit 2."""
from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import json
import os
import sys
from pathlib import Path


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model (classify, segment or detect)",
                       description="Train an image classifier, a semantic segmentation model or an object detector.")
    _run_args(p)
    p.add_argument("--resume", help="run directory or checkpoint to continue")
    p.add_argument("--save-every", type=int, help="also checkpoint every N optimizer steps (mid-epoch resume)")
    g = p.add_argument_group("several devices or machines (torch.distributed; see docs/distributed.md)")
    g.add_argument("--devices", type=int, metavar="N", help="worker processes on this machine, one per GPU (or CPU "
                   "processes), started through torchrun's elastic agent; data.batch_size stays the global batch")
    g.add_argument("--nnodes", type=int, default=1, metavar="M", help="machines in the job (each runs this command)")
    g.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="rendezvous address every machine reaches (node 0's)")
    g.add_argument("--rdzv-timeout", type=float, default=60.0, metavar="S",
                   help="seconds to wait for the rendezvous and for every machine to join (default 60)")

    p = sub.add_parser("lr-find", help="learning-rate range test: loss-vs-lr plot and a suggested lr",
                       description="Sweep the lr exponentially over a few batches with the run's own set-up, plot loss "
                                   "against lr (lr_find.png in the run dir) and print the suggested lr.")
    _run_args(p)
    p.add_argument("--start-lr", type=float, default=1e-7)
    p.add_argument("--end-lr", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=100, help="sweep length in batches")


def _run_args(p) -> None:
    """The options train and lr-find share: what to train, on what, and how."""
    p.add_argument("--data", help="folder, CSV file or built-in name (see `visionkit datasets`)")
    p.add_argument("--task", help="classify | segment | detect (default: inferred from the data's layout)")
    p.add_argument("--model", help="model name (see `visionkit models [--task segment|detect]`)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--recipe", help="named recipe (see `visionkit recipes`)")
    g.add_argument("--config", help="YAML config file")
    p.add_argument("--epochs", type=int)
    p.add_argument("--budget-min", type=float, metavar="M", help="a time budget in minutes instead of --epochs: the "
                   "epochs that fit on this machine, evaluation included (measured on the first steps)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--out", help="run directory (default runs/<model>-<data>-<n>; never overwritten)")
    p.add_argument("--seed", type=int)
    p.add_argument("--deterministic", action="store_true", default=None)
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--pretrained", action="store_true", default=None,
                   help="start from the model's ImageNet weights (torchvision DEFAULT, timm's tag, packaged Lite0-2)")
    p.add_argument("--weights", metavar="FILE", help="start from local weights: state dict, .safetensors or a "
                   "visionkit checkpoint (a head of another size is re-initialised)")
    p.add_argument("--weights-strict", choices=["true", "false"], help="false: load what fits and list the rest")
    p.add_argument("--finetune", choices=["auto", "none", "linear-probe", "full", "partial", "staged", "gradual"],
                   help="what trains when (default auto: chosen from the data when starting from pretrained weights)")
    p.add_argument("--bad-images", choices=["fail", "skip"])
    p.add_argument("--val-split", type=float)
    p.add_argument("--img-size", type=int)
    p.add_argument("--quiet", action="store_true", default=None)
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="any config key, e.g. --set optim.name=sgd sched.warmup_epochs=1")


def _ensemble_args(p) -> None:
    p.add_argument("--ensemble", default="mean", choices=["mean", "vote", "weighted"],
                   help="with several checkpoints: average probabilities, majority vote, or a weighted average with "
                        "weights fitted on the validation split")
    p.add_argument("--tta", default="none", choices=["none", "flip", "flip+crops"],
                   help="test-time augmentation: + mirror image; + four corner and centre crops (each mirrored)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="visionkit", description="Train, evaluate and use image classifiers, "
                                 "segmentation models and object detectors.")
    ap.add_argument("--version", action="store_true", help="print the version")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")
    _train_parser(sub)

    p = sub.add_parser("eval", help="score a checkpoint (or an ensemble of several) on a data split",
                       description="Score checkpoints on a split; with several, each member, the ensemble and the "
                                   "TTA gain side by side.")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="checkpoint file(s) or run directories")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    _ensemble_args(p)
    p.add_argument("--format", default="table", choices=["table", "json"])
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int)

    p = sub.add_parser("predict", help="predict image files (classes; masks for a segmentation model; boxes for "
                                       "a detector)")
    p.add_argument("inputs", nargs="+", metavar="CHECKPOINT... PATH...",
                   help="one or more checkpoints (.pt files or run directories), then image files or folders")
    p.add_argument("--topk", type=int, default=5)
    _ensemble_args(p)
    p.add_argument("--format", default="table", choices=["table", "json", "csv"])
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="segmentation: folder for the index-PNG masks and colour overlays; detection: for "
                   "the images with their boxes drawn (never overwritten)")
    p.add_argument("--conf", type=float, default=0.25, help="detection: lowest score kept (default 0.25)")
    p.add_argument("--iou", type=float, default=0.5, help="detection: per-class NMS IoU threshold (default 0.5)")
    p.add_argument("--max-det", type=int, default=100, help="detection: most boxes per image (default 100)")

    p = sub.add_parser("report", help="write the HTML report of a run (also written at the end of train)")
    p.add_argument("run_dir")
    p.add_argument("--out", help="HTML file to write (default RUN_DIR/report.html)")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("explain", help="class activation maps (Grad-CAM family) or ViT attention maps as overlays")
    p.add_argument("checkpoint")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--method", default="gradcam",
                   choices=["gradcam", "gradcam++", "scorecam", "eigencam", "layercam", "hirescam", "attention",
                            "rollout"], help="a CAM method, or attention / rollout for ViTs")
    p.add_argument("--layer", default="auto", help="module name (auto: the last conv stage / last ViT block)")
    p.add_argument("--target", help="class label to explain (default: the predicted class)")
    p.add_argument("--out", default="explain", help="folder for the overlays (existing files are kept)")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("features", help="grid of a layer's feature maps for one image")
    p.add_argument("checkpoint")
    p.add_argument("image")
    p.add_argument("--layer", help="module name (default: the layer CAMs use)")
    p.add_argument("--out", help="PNG file (default: <image stem>_features_<layer>.png here)")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("models", help="list models and where each name resolves")
    p.add_argument("pattern", nargs="?", help="filter, e.g. 'resnet*' or 'efficientnet'")
    p.add_argument("--task", default="classify", help="classify (default), segment or detect")
    sub.add_parser("recipes", help="list recipes")
    sub.add_parser("datasets", help="list built-in data sets")
    p = sub.add_parser("demo", help="train on a built-in data set that works offline and show where results are")
    p.add_argument("--out", default=None)
    return ap


def _run_overrides(a) -> dict:
    from .config import parse_set
    flat = parse_set(a.set)
    for flag, key in [("task", "task"), ("budget_min", "train.budget_min"), ("pretrained", "model.pretrained"), ("img_size", "data.img_size"), ("weights", "model.weights"),
                      ("weights_strict", "model.weights_strict"), ("finetune", "finetune.strategy")]:
        if getattr(a, flag) is not None:
            flat[key] = getattr(a, flag)
    if a.data is None and getattr(a, "resume", None) is None and a.config is None and "data.source" not in flat:
        raise SystemExit("error: --data is required (a folder, a CSV file or a built-in name; see `visionkit datasets`)")
    return flat


def _shortcuts(a) -> dict:
    return {"epochs": a.epochs, "batch_size": a.batch_size, "lr": a.lr, "seed": a.seed, "device": a.device,
            "quiet": a.quiet, "deterministic": a.deterministic, "val_split": a.val_split, "bad_images": a.bad_images}


def cmd_lr_find(a) -> int:
    from .api import lr_find
    run_dir, res = lr_find(a.data, a.model, recipe=a.recipe, config=a.config, out=a.out, overrides=_run_overrides(a),
                           start_lr=a.start_lr, end_lr=a.end_lr, num_steps=a.steps, **_shortcuts(a))
    others = ", ".join(f"{k} {v:.2e}" for k, v in res.suggestions.items() if k != "valley")
    print(f"suggested lr {res.suggestion:.2e} (valley; {others}); plot: {run_dir / 'lr_find.png'}")
    if res.stopped_early:
        print(f"the loss diverged at lr {res.lrs[-1]:.2e}", file=sys.stderr)
    return 0


def _launch(a) -> int:
    """``--devices N`` / ``--nnodes M``: check what can be checked here, then start the workers through torchrun's
    elastic agent running this same command (each worker finds its place in torchrun's environment)."""
    from .api import check_world, resolve_run
    from .engine import distributed
    from .engine.distributed import DistError
    if a.nnodes < 1:
        raise DistError(f"--nnodes must be at least 1, got {a.nnodes}")
    if a.rdzv_timeout <= 0:
        raise DistError("--rdzv-timeout must be positive (seconds)")
    nproc = a.devices or 1
    cfg, ckpt = resolve_run(a.data, a.model, a.recipe, a.config, a.resume, _run_overrides(a),
                         {k: v for k, v in {**_shortcuts(a), "save_every": a.save_every}.items() if v is not None})
    kind = distributed.plan_local(nproc, cfg.train.device)
    check_world(cfg, nproc * a.nnodes, kind)
    if ckpt is None and a.out and Path(a.out).exists() and (not Path(a.out).is_dir() or any(Path(a.out).iterdir())):
        raise DistError(f"run directory {a.out} already exists and is not empty; choose another --out "
                        f"or continue it with --resume {a.out}")
    return distributed.launch(a.argv, nproc, a.nnodes, a.rdzv_endpoint, a.rdzv_timeout, run_dir=a.resume or a.out)


def cmd_train(a) -> int:
    from .engine import distributed
    from .engine.distributed import DistError
    d = distributed.from_env()
    if d is not None:  # a worker started by torchrun (or by --devices below)
        if a.devices is not None and a.devices != d.local_world:
            raise DistError(f"--devices {a.devices} under torchrun, which started {d.local_world} workers here; "
                            f"give the count to torchrun (--nproc-per-node) only")
    elif (a.devices or 1) > 1 or a.nnodes > 1 or a.rdzv_endpoint:
        return _launch(a)
    from .api import train
    run = train(a.data, a.model, recipe=a.recipe, config=a.config, out=a.out, resume=a.resume,
                overrides=_run_overrides(a), save_every=a.save_every, **_shortcuts(a))
    s = run.summary
    if not s:  # a worker of rank > 0: rank 0 reports
        return 0
    best = s.get("best", {})
    line = f"done: {run.dir}  best epoch {best.get('epoch')}"
    mon = best.get("monitor")
    if mon == "epoch":  # the latest epoch was kept (a linear probe): show its headline validation number
        mon = next((k for k in ("val_acc1", "val_miou", "val_map") if k in best), None)
    if mon in best and mon != "train_loss":
        line += f"  {mon} {best[mon]:.4f}"
    test = s.get("test", {})
    for k in ("acc1", "miou", "map"):  # the task's headline number
        if k in test:
            line += f"  test_{k} {test[k]:.4f}"
    if (run.dir / "report.html").is_file():
        line += f"  report {run.dir / 'report.html'}"
    print(line)
    return 0


def cmd_eval(a) -> int:
    from .api import evaluate_checkpoint
    res = evaluate_checkpoint(a.checkpoints, a.data, split=a.split, device=a.device, batch_size=a.batch_size,
                              ensemble=a.ensemble, tta=a.tta)
    if a.format == "json":
        print(json.dumps(res))
        return 0
    if "miou" in res:
        return _print_segment_eval(a.split, res)
    if "map" in res:
        return _print_detect_eval(a.split, res)
    if len(res["members"]) > 1 or a.tta != "none":
        _print_side_by_side(res)
    loss = f"  loss={res['loss']:.4f}  ece={res['ece']:.4f}" if "loss" in res else ""
    print(f"{a.split}: n={res['n']}  acc1={res['acc1']:.4f}  acc5={res['acc5']:.4f}{loss}  "
          f"macro_f1={res['macro_f1']:.4f}")
    w = max(len(c) for c in res["classes"])
    print(f"{'class':<{w}}  precision  recall     f1  support")
    for c, r in zip(res["classes"], res["per_class"]):
        print(f"{c:<{w}}  {r['precision']:9.4f}  {r['recall']:6.4f}  {r['f1']:5.4f}  {r['support']:7d}")
    return 0


def _print_segment_eval(split: str, res: dict) -> int:
    print(f"{split}: n={res['n']}  mIoU={res['miou']:.4f}  pixel_acc={res['pixel_acc']:.4f}  "
          f"mean_acc={res['mean_acc']:.4f}  dice={res['dice']:.4f}  fwIoU={res['fwiou']:.4f}")
    w = max(len(r["class"]) for r in res["per_class"])
    print(f"{'class':<{w}}     IoU     acc  support(px)")
    for r in res["per_class"]:
        iou = "      -" if r["iou"] is None else f"{r['iou']:7.4f}"
        acc = "      -" if r["acc"] is None else f"{r['acc']:7.4f}"
        print(f"{r['class']:<{w}}  {iou} {acc}  {r['support']:11d}")
    return 0


def _print_detect_eval(split: str, res: dict) -> int:
    def f(v) -> str:
        return "      -" if v is None else f"{v:7.4f}"
    print(f"{split}: n={res['n']}  mAP={res['map']:.4f}  mAP50={res['map50']:.4f}  mAP75={res['map75']:.4f}  "
          f"AR100={res['mar100']:.4f}  (small {f(res['map_small']).strip()}, medium {f(res['map_medium']).strip()}, "
          f"large {f(res['map_large']).strip()})")
    w = max(len(r["class"]) for r in res["per_class"])
    print(f"{'class':<{w}}  AP@.5:.95    AP@.5  objects  detections")
    for r in res["per_class"]:
        print(f"{r['class']:<{w}}    {f(r['ap'])}  {f(r['ap50'])}  {r['support']:7d}  {r['detections']:10d}")
    return 0


def _print_side_by_side(res: dict) -> None:
    """Each member, the ensemble, plain and with TTA: acc1 / log loss."""
    tta = res["tta_mode"] != "none"
    rows = [(Path(m["checkpoint"]).parent.name + "/" + Path(m["checkpoint"]).name, m, m.get("tta"))
            for m in res["members"]]
    if "ensemble" in res:
        e = res["ensemble"]
        label = f"ensemble ({e['method']}" + (f", weights {e['weights']}" if "weights" in e else "") + ")"
        rows.append((label, e["plain"], e.get("tta")))
    w = max(len(r[0]) for r in rows)

    def cell(s: dict | None) -> str:
        if s is None:
            return f"{'':>17}"
        return f"{s['acc1']:7.4f} " + (f"{s['loss']:9.4f}" if "loss" in s else f"{'-':>9}")
    head = f"{'':<{w}}  {'acc1':>7} {'loss':>9}" + (f"  {'acc1 +tta':>9} {'loss':>7}" if tta else "")
    print(head)
    for name, plain, with_tta in rows:
        print(f"{name:<{w}}  {cell(plain)}" + (f"  {cell(with_tta)}" if tta else ""))
    if tta:
        print(f"TTA ({res['tta_mode']}) gain: {100 * res['tta_gain']:+.2f} points acc1")
    if res.get("ensemble", {}).get("weights_fitted_on"):
        print(f"weights fitted on: {res['ensemble']['weights_fitted_on']}")


def _expand(paths: list[str]) -> list[str]:
    from torchvision.datasets.folder import IMG_EXTENSIONS
    out = []
    for p in paths:
        q = Path(p)
        if q.is_dir():
            out += sorted(str(f) for f in q.rglob("*") if f.suffix.lower() in IMG_EXTENSIONS)
        else:
            out.append(p)
    return out


def _split_checkpoints(inputs: list[str]) -> tuple[list[str], list[str]]:
    """`predict CKPT... PATH...`: the leading .pt files and run directories (holding best.pt/last.pt) are models."""
    n = 0
    while n < len(inputs) and (inputs[n].endswith(".pt") or (Path(inputs[n]) / "config.yaml").is_file()):
        n += 1
    if n == 0:
        from .engine.checkpoint import CheckpointError
        raise CheckpointError(f"{inputs[0]} is not a checkpoint: give a .pt file or a run directory first, then "
                              "the images")
    return inputs[:n], inputs[n:]


def cmd_predict(a) -> int:
    from .api import load
    from .data import DataError
    checkpoints, inputs = _split_checkpoints(a.inputs)
    if not inputs:
        raise DataError("no images given: visionkit predict CHECKPOINT... IMAGE_OR_FOLDER...")
    paths = _expand(inputs)
    if not paths:
        raise DataError(f"no images found in {' '.join(inputs)}")
    predictor = load(checkpoints, a.device, ensemble=a.ensemble, tta=a.tta)
    if getattr(predictor, "task", "classify") == "segment":
        return _print_segment_predictions(predictor.predict(paths, out=a.out), a.format, predictor.classes)
    if getattr(predictor, "task", "classify") == "detect":
        return _print_detections(predictor.predict(paths, conf=a.conf, iou=a.iou, max_det=a.max_det, out=a.out),
                                 a.format)
    res = predictor.predict(paths, topk=a.topk)
    if a.format == "json":
        print(json.dumps(res))
    elif a.format == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["path"] + [x for i in range(1, len(res[0]["topk"]) + 1) for x in (f"label{i}", f"prob{i}")])
        for r in res:
            w.writerow([r["path"]] + [x for t in r["topk"] for x in (t["label"], f"{t['prob']:.6f}")])
        print(buf.getvalue(), end="")
    else:
        for r in res:
            print(r["path"] + "  " + "  ".join(f"{t['label']} {t['prob']:.3f}" for t in r["topk"]))
    return 0


def _print_segment_predictions(res: list[dict], fmt: str, classes: list[str]) -> int:
    """Per image: the mask and overlay files written and each class's pixel fraction."""
    if fmt == "json":
        print(json.dumps(res))
    elif fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["path", "mask", "overlay", *classes])
        for r in res:
            w.writerow([r["path"], r.get("mask", ""), r.get("overlay", ""),
                        *(f"{r['fractions'].get(c, 0.0):.6f}" for c in classes)])
        print(buf.getvalue(), end="")
    else:
        for r in res:
            top = sorted(r["fractions"].items(), key=lambda kv: -kv[1])[:4]
            where = f"  -> {r['mask']}" if r.get("mask") else ""
            print(r["path"] + "  " + "  ".join(f"{c} {f:.3f}" for c, f in top) + where)
    return 0


def _print_detections(res: list[dict], fmt: str) -> int:
    """Per image: its boxes (class, score, x1 y1 x2 y2 in the image's pixels), best first."""
    if fmt == "json":
        print(json.dumps(res))
    elif fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["path", "class", "score", "xmin", "ymin", "xmax", "ymax"])
        for r in res:
            for d in r["detections"]:
                w.writerow([r["path"], d["class"], f"{d['score']:.4f}", *d["box"]])
        print(buf.getvalue(), end="")
    else:
        for r in res:
            dets = "  ".join(f"{d['class']} {d['score']:.2f} [{', '.join(f'{v:.0f}' for v in d['box'])}]"
                             for d in r["detections"][:8])
            more = f"  (+{len(r['detections']) - 8} more)" if len(r["detections"]) > 8 else ""
            where = f"  -> {r['drawn']}" if r.get("drawn") else ""
            print(f"{r['path']}  {len(r['detections'])} boxes  {dets}{more}{where}")
    return 0


def cmd_report(a) -> int:
    from .api import build_report
    path = build_report(a.run_dir, out=a.out, device=a.device)
    print(f"report: {path}")
    return 0


def cmd_explain(a) -> int:
    from .explain import explain
    for r in explain(a.checkpoint, a.images, method=a.method, layer=a.layer, target=a.target, out=a.out,
                     device=a.device):
        print(f"{r['path']}: predicted {r['label']} {r['prob']:.3f}, explained {r['target']} -> {r['out']}")
    return 0


def cmd_features(a) -> int:
    from .explain import features
    print(f"features: {features(a.checkpoint, a.image, layer=a.layer, out=a.out, device=a.device)}")
    return 0


def cmd_models(a) -> int:
    """One row per model: the name to type (bare when the bare name picks this model), its source, a description."""
    from .tasks import task_name
    if task_name(a.task) in ("segment", "detect"):
        if task_name(a.task) == "segment":
            from .tasks.segment.models import list_seg_models as lister
        else:
            from .tasks.detect.models import list_det_models as lister
        rows = [r for r in lister()
                if not a.pattern or fnmatch.fnmatch(r["name"], a.pattern) or a.pattern in r["name"]]
        for r in rows:
            print(f"{r['name']:<28}  {r.get('description', '')[:90]}".rstrip())
        return 0 if rows else 1
    from .models import list_models
    rows = list_models(a.pattern)
    if not rows:
        print(f"no model matches {a.pattern!r}")
        return 1
    shown = []
    for r in rows:
        bare = r["name"].split(":")[-1]
        if r["source"] == "packaged":
            shown.append((bare, r["resolves_to"], r.get("description", "")))
        elif r["resolves_to"] == r["name"]:
            shown.append((bare, r["name"], r.get("description", "")))
        else:
            shown.append((r["name"], r["name"], f"(bare '{bare}' is {r['resolves_to']}) " + r.get("description", "")))
    w = max(len(n) for n, _, _ in shown)
    print(f"{'NAME':<{w}}  {'RESOLVES TO':<28}  DESCRIPTION")
    for name, full, desc in shown:
        print(f"{name:<{w}}  {full:<28}  {desc[:90]}".rstrip())
    return 0


def cmd_recipes(a) -> int:
    from .config import list_recipes
    for name, desc in list_recipes().items():
        print(f"{name:<14} {desc}")
    return 0


def cmd_datasets(a) -> int:
    from .data import list_datasets
    from .tasks.detect.data import DET_SHAPES_CLASSES
    from .tasks.segment.data import SEG_SHAPES_CLASSES
    for d in list_datasets():
        where = "local" if d.get("local") else "download"
        print(f"{d['name']:<14} {d.get('classes', ''):>4} classes  {where:<8}  classify: {d.get('note', '')}")
    print(f"{'seg-shapes':<14} {len(SEG_SHAPES_CLASSES):>4} classes  {'local':<8}  segment: generated 64 px shapes with "
          f"textures on real photos (skimage), train 2000 / val 300 / test 500")
    print(f"{'det-shapes':<14} {len(DET_SHAPES_CLASSES):>4} classes  {'local':<8}  detect: generated 128 px images, 0-6 "
          f"textured shapes of 8-60 px on real photos (skimage), train 2000 / val 300 / test 500")
    return 0


def cmd_demo(a) -> int:
    """Fashion-MNIST with the fast-cpu recipe when its files are here, otherwise scikit-learn's digits."""
    from .api import train
    from .data import list_datasets
    fm = next((d for d in list_datasets() if d["name"] == "fashion-mnist"), {})
    if fm.get("local"):
        print("demo: Fashion-MNIST (local copy found), recipe fast-cpu", file=sys.stderr)
        run = train("fashion-mnist", recipe="fast-cpu", out=a.out)
    else:
        print("demo: scikit-learn digits (no local Fashion-MNIST), recipe fast-cpu", file=sys.stderr)
        # 8-px digits shown at 32 px; no flips (a mirrored 2 is not a 2)
        run = train("digits", recipe="fast-cpu", out=a.out, overrides={
            "data.img_size": 32, "train.epochs": 15, "aug.hflip": 0.0, "data.val_split": 0.2})
    s = run.summary
    print(f"\nresults in {run.dir}/")
    for f in ("report.html", "summary.json", "metrics.csv", "config.yaml", "best.pt", "last.pt", "tb/"):
        print(f"  {f}")
    if "test" in s:
        print(f"test accuracy {s['test']['acc1']:.4f} on {s['test']['n']} images")
    return 0


COMMANDS = {"train": cmd_train, "lr-find": cmd_lr_find, "eval": cmd_eval, "predict": cmd_predict, "report": cmd_report,
            "explain": cmd_explain, "features": cmd_features, "models": cmd_models, "recipes": cmd_recipes,
            "datasets": cmd_datasets, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.version:
        from . import __version__
        print(__version__)
        return 0
    if not a.cmd:
        ap.print_help()
        return 2
    a.argv = list(sys.argv[1:] if argv is None else argv)
    # torchrun's variables, read without importing torch (see below)
    worker = {k: int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ}
    worker = worker if len(worker) == 3 else None
    launching = a.cmd == "train" and worker is None and ((a.devices or 1) > 1 or a.nnodes > 1 or a.rdzv_endpoint)
    if launching and "torch" not in sys.modules:
        # the launcher's own C++ logging (c10d socket retries) would bury its one-line errors; read when torch loads,
        # so it is set around that import only and the workers keep the default
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
        import torch  # noqa: F401
        if os.environ.get("TORCH_CPP_LOG_LEVEL") == "FATAL":
            del os.environ["TORCH_CPP_LOG_LEVEL"]
    from .config import ConfigError  # every user-facing error class is a ValueError subclass with a one-line message
    try:
        if worker is not None and worker["WORLD_SIZE"] > 1 and a.cmd != "train":
            raise ConfigError(f"only `visionkit train` runs on several processes; run `visionkit {a.cmd}` without "
                              f"torchrun")
        return COMMANDS[a.cmd](a)
    except BrokenPipeError:  # `visionkit models | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        if worker is None or worker["RANK"] == 0:
            print("\ninterrupted: the last checkpoint is saved; continue with --resume RUN_DIR", file=sys.stderr)
        return 130
    except RuntimeError as e:
        from .engine.distributed import WorkerLost
        if not isinstance(e, WorkerLost):
            raise
        if worker is None or worker["RANK"] == 0:  # the launcher (or torchrun) names the worker that failed
            print(f"error: {e}", file=sys.stderr)
        return 1
    except (ConfigError, *_user_errors()) as e:
        if worker is None or worker["RANK"] == 0:  # under torchrun every rank meets the same error: rank 0 says it
            print(f"error: {e}", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type, ...]:
    """Every error class a user mistake raises: each is a ValueError with a one-line message."""
    from .data import DataError
    from .engine.checkpoint import CheckpointError
    from .engine.distributed import DistError
    from .models import ModelError
    return CheckpointError, DataError, DistError, ModelError


if __name__ == "__main__":
    sys.exit(main())
