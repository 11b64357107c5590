"""The plain-PyTorch peer of `visionkit train --data seg-shapes`: torchvision's references/segmentation idiom.

What torchvision's ``references/segmentation/train.py`` does, kept as it is where it applies to a 64-px in-memory set:

* SGD, momentum 0.9, weight decay 1e-4 on every parameter (one param group; the reference adds a second group only
  for an aux classifier);
* the "poly" schedule ``(1 - iter / total_iters) ** 0.9``, stepped every iteration (``LambdaLR``), with the
  reference's optional linear warmup (``--lr-warmup-epochs``, start factor ``--lr-warmup-decay`` 0.01);
* ``criterion``: ``cross_entropy(ignore_index=255)`` on ``out``, plus ``0.5 *`` the same on ``aux`` when the model has
  an aux head (visionkit's ``unet`` has none);
* a plain train loop (``zero_grad``, ``backward``, ``step``, ``lr_scheduler.step()`` per iteration) and evaluation by
  a confusion matrix (``ConfusionMatrix.update`` with ``bincount``; IoU = diag / (rows + cols - diag)).

What differs, and why: the data are seg-shapes' uint8 tensors (``build_seg_data("seg-shapes")``: ``.images``
[N,3,64,64], ``.masks`` [N,64,64]) batched straight from memory, not files through a DataLoader; the reference's
RandomResize(0.5-2x) + RandomCrop are for 520-px photos, so the augmentation is its RandomHorizontalFlip(0.5) alone
(per sample). Normalisation is the model's own (``model.visionkit_cfg``: ImageNet mean/std for ``unet``, 0.5/0.5 for an
EfficientNet-Lite encoder), as visionkit's. The reference's lr
0.02 at global batch 32 (8 GPUs x 4) is the default here, scaled linearly for other batch sizes (``--lr``).

Prints per epoch: train seconds, images/s, val mIoU (and test mIoU with ``--eval-test-every-epoch``); at the end the
test mIoU of the last epoch's weights (the reference keeps the last weights, not a best-on-val). Writes JSON.

Usage::

    python benchmarks/peers/tv_seg_reference.py --base 8 --batch-size 32 --epochs 12 --seed 0 --json out.json
    python benchmarks/peers/tv_seg_reference.py --model unet-efficientnet_lite0 --pretrained \
        --model-kwargs '{"decoder_channels": [64, 48, 32, 16, 8]}' --batch-size 16 --epochs 7
    python benchmarks/peers/tv_seg_reference.py --epochs 1 --no-flip --no-eval      # throughput only
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def criterion(inputs: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """torchvision's references/segmentation criterion."""
    losses = {}
    for name, x in inputs.items():
        losses[name] = nn.functional.cross_entropy(x, target, ignore_index=255)
    if len(losses) == 1:
        return losses["out"]
    return losses["out"] + 0.5 * losses["aux"]


class ConfusionMatrix:
    """torchvision's references/segmentation/utils.py ConfusionMatrix (single process)."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.mat: torch.Tensor | None = None

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        n = self.num_classes
        if self.mat is None:
            self.mat = torch.zeros((n, n), dtype=torch.int64, device=a.device)
        with torch.inference_mode():
            k = (a >= 0) & (a < n)
            inds = n * a[k].to(torch.int64) + b[k]
            self.mat += torch.bincount(inds, minlength=n**2).reshape(n, n)

    def compute(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.mat.float()
        acc_global = torch.diag(h).sum() / h.sum()
        acc = torch.diag(h) / h.sum(1)
        iu = torch.diag(h) / (h.sum(1) + h.sum(0) - torch.diag(h))
        return acc_global, acc, iu


class Normalize:
    """uint8 [B,3,H,W] -> float32 normalised (the reference's ToDtype(scale=True) + Normalize, batched)."""

    def __init__(self, channels_last: bool, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        self.scale = 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1))
        self.shift = -torch.tensor(mean).view(1, 3, 1, 1) / torch.tensor(std).view(1, 3, 1, 1)
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() * self.scale + self.shift
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def train_batches(images: torch.Tensor, masks: torch.Tensor, batch_size: int, flip: bool, g: torch.Generator):
    """Shuffled batches (drop_last, as the reference's train loader), RandomHorizontalFlip(0.5) per sample."""
    perm = torch.randperm(len(images), generator=g)
    for i in range(len(images) // batch_size):
        idx = perm[i * batch_size:(i + 1) * batch_size]
        x, y = images[idx], masks[idx].long()
        if flip:
            f = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(f.view(-1, 1, 1, 1), x.flip(3), x)
            y = torch.where(f.view(-1, 1, 1), y.flip(2), y)
        yield x, y


def evaluate(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, norm: Normalize, num_classes: int,
             batch_size: int, autocast) -> dict:
    model.eval()
    confmat = ConfusionMatrix(num_classes)
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            with autocast():
                output = model(norm(images[i:i + batch_size]))["out"]
            confmat.update(masks[i:i + batch_size].long().flatten(), output.argmax(1).flatten())
    acc_global, _acc, iu = confmat.compute()
    return {"miou": iu.mean().item(), "pixel_acc": acc_global.item(), "iou": [round(v, 5) for v in iu.tolist()]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="unet")
    ap.add_argument("--base", type=int, default=16, help="unet width (visionkit's model.kwargs.base)")
    ap.add_argument("--model-kwargs", default="{}", help="JSON keyword arguments of the model (visionkit's "
                    "model.kwargs), e.g. '{\"decoder_channels\": [64, 48, 32, 16, 8]}'")
    ap.add_argument("--pretrained", action="store_true", help="the encoder's ImageNet weights (visionkit's "
                    "--pretrained: offline for efficientnet_lite0/1/2)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--eval-batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=None, help="default: the reference's 0.02 at batch 32, scaled")
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--wd", "--weight-decay", type=float, default=1e-4, dest="weight_decay")
    ap.add_argument("--lr-warmup-epochs", type=float, default=0.0)
    ap.add_argument("--lr-warmup-decay", type=float, default=0.01)
    ap.add_argument("--aux-loss", action="store_true", help="an aux head (models that have one; not unet)")
    ap.add_argument("--no-flip", action="store_true", help="no augmentation at all (throughput comparisons)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--amp", choices=("off", "bf16"), default="off", help="bf16 autocast (CPUs with native bf16)")
    ap.add_argument("--no-eval", action="store_true", help="no evaluation at all (throughput only)")
    ap.add_argument("--eval-test-every-epoch", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    from visionkit.tasks.segment.data import build_seg_data
    from visionkit.tasks.segment.models import create_seg_model

    bundle = build_seg_data("seg-shapes")
    num_classes = len(bundle.classes)
    tr, va, te = bundle.train, bundle.val, bundle.test
    torch.manual_seed(args.seed)
    kw = {"base": args.base} if args.model == "unet" else {}
    kw.update(json.loads(args.model_kwargs))
    model = create_seg_model(args.model, num_classes=num_classes, aux_loss=args.aux_loss, pretrained=args.pretrained,
                             **kw)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    mcfg = model.visionkit_cfg  # the normalisation the encoder was trained with (Lite0: mean = std = 0.5)
    norm = Normalize(args.channels_last, mcfg.get("mean", IMAGENET_MEAN), mcfg.get("std", IMAGENET_STD))
    lr = args.lr if args.lr is not None else 0.02 * args.batch_size / 32
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.amp == "bf16" else \
        (lambda: torch.autocast("cpu", enabled=False))

    params_to_optimize = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    optimizer = torch.optim.SGD(params_to_optimize, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    iters_per_epoch = len(tr) // args.batch_size
    warmup_iters = round(iters_per_epoch * args.lr_warmup_epochs)
    main_iters = iters_per_epoch * args.epochs - warmup_iters
    main_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda x: (1 - x / main_iters) ** 0.9)
    if warmup_iters > 0:
        warm = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=args.lr_warmup_decay, total_iters=warmup_iters)
        lr_scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, main_sched], milestones=[warmup_iters])
    else:
        lr_scheduler = main_sched

    g = torch.Generator().manual_seed(args.seed)
    epochs, train_s, n_seen = [], 0.0, 0
    print(f"peer: {args.model} {kw}{' pretrained' if args.pretrained else ''}, bs {args.batch_size}, lr {lr:g}, "
          f"{args.epochs} epochs, "
          f"{iters_per_epoch} it/epoch, threads {torch.get_num_threads()}, amp {args.amp}, "
          f"channels_last {args.channels_last}, setup {time.perf_counter() - t_start:.1f} s", flush=True)
    for epoch in range(args.epochs):
        model.train()
        t0 = time.perf_counter()
        n, loss_sum = 0, 0.0
        for image, target in train_batches(tr.images, tr.masks, args.batch_size, not args.no_flip, g):
            with autocast():
                output = model(norm(image))
            loss = criterion({k: v.float() for k, v in output.items()}, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            lr_scheduler.step()
            n += len(image)
            loss_sum += loss.item() * len(image)
        dt = time.perf_counter() - t0
        train_s += dt
        n_seen += n
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(n, 1), "time": dt, "images_per_s": n / dt,
               "cum_train_s": train_s, "lr": optimizer.param_groups[0]["lr"]}
        if not args.no_eval:
            t1 = time.perf_counter()
            row["val_miou"] = evaluate(model, va.images, va.masks, norm, num_classes, args.eval_batch_size,
                                       autocast)["miou"]
            if args.eval_test_every_epoch:
                row["test_miou"] = evaluate(model, te.images, te.masks, norm, num_classes, args.eval_batch_size,
                                            autocast)["miou"]
            row["eval_s"] = time.perf_counter() - t1
        row["wall_s"] = time.perf_counter() - t_start
        row["load1"] = os.getloadavg()[0]
        epochs.append(row)
        print(f"epoch {epoch + 1}/{args.epochs}: train {dt:.1f} s ({n / dt:.1f} img/s), loss {row['train_loss']:.4f}"
              + (f", val mIoU {row['val_miou']:.4f}" if "val_miou" in row else "")
              + (f", test mIoU {row['test_miou']:.4f}" if "test_miou" in row else "")
              + f", load {row['load1']:.1f}", flush=True)
    result = {"peer": "torchvision references/segmentation idiom", "model": args.model, "model_kwargs": kw,
              "pretrained": args.pretrained,
              "epochs": args.epochs, "batch_size": args.batch_size, "lr": lr, "momentum": args.momentum,
              "weight_decay": args.weight_decay, "flip": not args.no_flip, "channels_last": args.channels_last,
              "amp": args.amp, "seed": args.seed, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "python": platform.python_version(), "train_seconds": train_s,
              "train_images_per_s": n_seen / train_s if train_s else None, "history": epochs}
    if not args.no_eval:
        test = evaluate(model, te.images, te.masks, norm, num_classes, args.eval_batch_size, autocast)
        result["test"] = test
        print(f"test mIoU {test['miou']:.4f} (pixel acc {test['pixel_acc']:.4f})", flush=True)
    result["wall_seconds"] = time.perf_counter() - t_start
    print(f"wall {result['wall_seconds']:.1f} s, training {train_s:.1f} s, "
          f"{result['train_images_per_s']:.1f} train img/s", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
