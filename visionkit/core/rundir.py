"""The run directory's contract in one place: its file names, the ONE atomic writer, and a fresh directory.

A run directory holds::

    config.yaml    the resolved config (task, data, model, ... sections)
    classes.json   class names, index i = class id i
    env.json       versions, machine, device, seed, data fingerprint, command
    data.json      data summary and the files skipped under --bad-images skip
    finetune.json  the fine-tuning strategy and why (classification)
    metrics.csv    one row per epoch; the columns are the union of what the task logged
    summary.json   best / final epochs, monitor, wall time, and the test split's scores under "test"
    last.pt best.pt
    report.html    tb/

Every file is written to a temp file in the same folder and renamed over the target, so a crash leaves the old
file or the new one, never half of one.

Example::

    d = new_run_dir("runs/x", "lenet-digits")
    write(d / SUMMARY, {"best": {}})
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import yaml

from ..config import ConfigError

CONFIG, CLASSES, ENV, DATA, FINETUNE = "config.yaml", "classes.json", "env.json", "data.json", "finetune.json"
METRICS, SUMMARY, LAST, BEST, REPORT = "metrics.csv", "summary.json", "last.pt", "best.pt", "report.html"


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, fsync: bool = False) -> Iterator[BinaryIO]:
    """A binary file that replaces ``path`` only when the block ends without an error (optionally fsync'd first,
    for checkpoints: a crash, even SIGKILL, then leaves the old file or the new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def write(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as YAML (``.yaml``), JSON (``.json``) or text (``str``)."""
    path = Path(path)
    if isinstance(obj, str):
        text = obj
    elif path.suffix == ".yaml":
        text = yaml.safe_dump(obj, sort_keys=False)
    else:
        text = json.dumps(obj, indent=2)
    atomic_write_bytes(path, text.encode())


def remove_stale_temps(run_dir: Path) -> None:
    """Temp files of a writer that was killed mid-write (resume removes them)."""
    for stale in Path(run_dir).glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def new_run_dir(out: str | None, name: str) -> Path:
    """A fresh run directory; never reuses one that holds anything."""
    if out:
        p = Path(out)
        if p.exists() and (not p.is_dir() or any(p.iterdir())):
            raise ConfigError(f"run directory {p} already exists and is not empty; choose another --out "
                              f"or continue it with --resume {p}")
        p.mkdir(parents=True, exist_ok=True)
        return p
    base = Path("runs")
    base.mkdir(exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"
    n = 1
    while True:
        p = base / f"{name}-{n}"
        try:
            p.mkdir()
            return p
        except FileExistsError:
            n += 1
