"""Engine overhead: images/s of `visionkit.train` versus a minimal hand-written loop, side by side.

Claim: the engine (progress bar, logging, checkpoints, events, running metrics) costs < 3% of training throughput:
ratio visionkit / hand loop >= 0.97.

Both sides use the same model (fastnet), batch size, optimizer (SGD Nesterov, one-cycle), bf16 autocast and the same
data path (the whole set as one uint8 tensor, batches gathered by index and normalised on the fly, no augmentation,
so that only the loop differs). The runs alternate (hand, visionkit, hand, visionkit, ...) so drift in machine load
hits both. visionkit's figure is its own per-epoch train time from metrics.csv (the validation pass is off).

Usage: python benchmarks/overhead.py [--repeats 3] [--epochs 1] [--data fashion-mnist|fake] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def hand_loop(images: torch.Tensor, targets: torch.Tensor, model_name: str, batch: int, epochs: int,
              mean: list[float], std: list[float], lr: float) -> float:
    """The loop a user writes by hand: returns training images/s."""
    from visionkit.models import create_model
    torch.manual_seed(0)
    net = create_model(model_name, num_classes=10, in_chans=images.shape[1]).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = epochs * (len(images) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.25)
    m = torch.tensor(mean).view(1, -1, 1, 1) * 255
    s = torch.tensor(std).view(1, -1, 1, 1) * 255
    net.train()
    t0 = time.perf_counter()
    n = 0
    for ep in range(epochs):
        perm = torch.randperm(len(images))
        for i in range(len(images) // batch):
            idx = perm[i * batch:(i + 1) * batch]
            x = ((images[idx].float() - m) / s).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(net(x).float(), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            n += len(idx)
    return n / (time.perf_counter() - t0)


def visionkit_run(data: str, model_name: str, batch: int, epochs: int, lr: float) -> float:
    import csv

    from visionkit import train
    with tempfile.TemporaryDirectory() as d:
        run = train(data, model_name, out=str(Path(d) / "run"), epochs=epochs, batch_size=batch, lr=lr, quiet=True,
                    overrides={"data.val_split": 0.0, "aug.preset": "none", "optim.name": "sgd",
                               "optim.weight_decay": 5e-4, "sched.name": "onecycle", "train.amp": "bf16"})
        with open(run.dir / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        n_train = run.summary.get("n_train")
        secs = sum(float(r["time"]) for r in rows)
    return n_train * epochs / secs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--model", default="fastnet")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--json", default="benchmarks/out/overhead.json")
    a = ap.parse_args()

    from visionkit.data import build_data
    from visionkit.models import create_model
    b = build_data(a.data, val_split=0.0)
    cfg = create_model(a.model, num_classes=10, in_chans=b.in_chans).visionkit_cfg
    images, targets = b.train.images, b.train.targets
    hand, vk = [], []
    for r in range(a.repeats):
        hand.append(hand_loop(images, targets, a.model, a.batch, a.epochs, list(cfg["mean"]), list(cfg["std"]), a.lr))
        vk.append(visionkit_run(a.data, a.model, a.batch, a.epochs, a.lr))
        print(f"repeat {r + 1}: hand {hand[-1]:.0f} img/s  visionkit {vk[-1]:.0f} img/s  ratio {vk[-1] / hand[-1]:.3f}",
              flush=True)
    ratios = [v / h for v, h in zip(vk, hand)]

    def ms(xs):
        return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)
    print(f"\n| loop | images/s (mean ± std over {a.repeats}) |\n|---|---|")
    print(f"| hand-written | {ms(hand)[0]:.0f} ± {ms(hand)[1]:.0f} |")
    print(f"| visionkit train | {ms(vk)[0]:.0f} ± {ms(vk)[1]:.0f} |")
    print(f"\nratio visionkit / hand: {ms(ratios)[0]:.3f} ± {ms(ratios)[1]:.3f}")
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "hand_img_s": hand, "visionkit_img_s": vk, "ratios": ratios,
                               "ratio_mean": ms(ratios)[0], "ratio_std": ms(ratios)[1],
                               "torch": torch.__version__, "threads": torch.get_num_threads()}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
