"""The device a run uses, its precision (the ONE autocast builder), seeding and the environment record.

Example::

    device = resolve_device("auto")
    dtype = amp_dtype("auto", device)      # None (fp32), torch.bfloat16 or torch.float16
    with autocast_for(device, dtype)():
        ...
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import random
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from ..config import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` (a GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``; a one-line error for what is not here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for, but no CUDA GPU is available here; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None


def cpu_has_bf16() -> bool:
    """Native bf16 matrix units (AVX512-BF16 or AMX): there bf16 autocast ran a training loop 1.5x and an
    EfficientNet forward 3x faster than fp32 (benchmarks/RESULTS.md); elsewhere it is emulated and far slower."""
    probe = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(f() for f in probe if f is not None)


@functools.lru_cache(maxsize=1)
def cpu_bf16_slowdown() -> float:
    """How many times slower a 512x512 matmul runs in bf16 than in fp32 on this CPU (measured once, ~1 s where bf16 is
    emulated; smaller products understate the gap, which grows with size: ~270x at 2048 on an AVX2 EPYC)."""
    a = torch.randn(512, 512)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = a.to(dtype)
        x @ x  # warm-up
        t0 = time.perf_counter()
        x @ x
        times[dtype] = time.perf_counter() - t0
    return times[torch.bfloat16] / max(times[torch.float32], 1e-9)


def warn_slow_bf16() -> None:
    """``train.amp=bf16`` asked for on a CPU that emulates bf16: say so loudly, with the measured factor."""
    cap = torch.backends.cpu.get_cpu_capability()
    print(f"WARNING: train.amp=bf16 on a CPU without native bf16 ({cap}, no AVX512-BF16/AMX): a bf16 matmul runs "
          f"{cpu_bf16_slowdown():.0f}x slower than fp32 here, so training will be far slower. Use --set train.amp=auto "
          f"(fp32 on this CPU) unless you mean it", file=sys.stderr)


def amp_dtype(mode: str, device: torch.device, warn: bool = True) -> torch.dtype | None:
    """auto: bf16 on CUDA when supported (else fp16); on CPU bf16 where it has native bf16 units, else off (fp32).

    An explicit ``bf16`` on a CPU that only emulates it is honoured with a loud warning (``warn``)."""
    if mode == "off":
        return None
    if mode == "auto" and device.type == "cpu":
        return torch.bfloat16 if cpu_has_bf16() else None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "fp16" and device.type == "cpu":
        raise ConfigError("fp16 autocast is for CUDA; on CPU use --set train.amp=bf16")
    if mode == "bf16" and device.type == "cpu" and warn and not cpu_has_bf16():
        warn_slow_bf16()
    return torch.bfloat16 if mode == "bf16" else torch.float16


def autocast_for(device: torch.device, dtype: torch.dtype | None) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of autocast contexts for ``dtype`` on ``device`` (a null context for fp32): the one place a run's
    mixed precision is built, used by the loop, eval, predict, lr-find and the report alike."""
    if dtype is None:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device.type, dtype=dtype)


def run_autocast(amp: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """The autocast a run trained with, rebuilt for eval/predict on ``device`` (fp16 runs evaluate in fp32 on a CPU)
    so that the numbers they give match those training reported."""
    if amp == "fp16" and device.type == "cpu":
        return contextlib.nullcontext
    return autocast_for(device, amp_dtype(amp, device, warn=False))


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def environment(device: torch.device, seed: int, fingerprint: str, dist=None) -> dict:
    """env.json: versions, machine, device, seed, data fingerprint, command and world size of a run."""
    import timm
    import torchvision

    from .. import __version__
    return {"visionkit": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": timm.__version__, "platform": platform.platform(),
            "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_bf16": cpu_has_bf16(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "seed": seed, "data_fingerprint": fingerprint,
            "command": " ".join(sys.argv), "cwd": os.getcwd(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "world_size": dist.world if dist else 1, "backend": dist.backend if dist and dist.enabled else None}
