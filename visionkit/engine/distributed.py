"""Training on several processes with PyTorch's own distributed engine: torch.distributed + DistributedDataParallel,
launched by ``torchrun`` (or ``visionkit train --devices N``, which runs torchrun's elastic agent in-process).

What this module holds, and why each piece is here:

* ``Dist``: rank, world size and local rank, passed around explicitly (never read into module globals).
* ``from_env`` / ``init``: a worker started by torchrun reads its place from the environment; ``init`` picks its
  device, checks through the rendezvous store that every rank agrees on the device type (a clear error instead of a
  hang when CPU and GPU ranks are mixed) and opens the process group (NCCL for GPUs, Gloo for CPUs).
* small collectives (sum, broadcast, gather) used by the loop, the metrics and the run-directory set-up.
* ``launch``: torchrun's ``elastic_launch`` with one-line errors for an unreachable rendezvous or a failed worker.

Scaling rule: ``data.batch_size`` is the *global* batch. Each of W workers takes batch_size / W samples of every
global batch, so a recipe means the same optimisation on 1 or 8 devices and no learning-rate scaling is needed.
"""
from __future__ import annotations

import os
import pickle
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Dist:
    """This process's place in the job. ``Dist()`` is a single process with no process group.

    Example::

        d = Dist()            # single process
        d.is_main, d.world    # (True, 1)
    """
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    enabled: bool = False  # a process group is open (torchrun started us), even with world == 1
    backend: str = ""

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs, checkpoints and the report."""
        return self.rank == 0


def under_torchrun(env: dict | None = None) -> bool:
    env = os.environ if env is None else env
    return all(k in env for k in TORCHRUN_VARS)


def from_env(env: dict | None = None) -> Dist | None:
    """The Dist torchrun's environment describes, or None when this process was not started by torchrun."""
    env = os.environ if env is None else env
    if not under_torchrun(env):
        return None
    world = int(env["WORLD_SIZE"])
    return Dist(rank=int(env["RANK"]), world=world, local_rank=int(env["LOCAL_RANK"]),
                local_world=int(env.get("LOCAL_WORLD_SIZE", world)))


class DistError(ValueError):
    """A distributed set-up a user can fix (too many devices, unreachable rendezvous, mixed devices): one line."""


class WorkerLost(RuntimeError):
    """Another worker stopped answering mid-run (it died, or its machine did): the job cannot go on."""


def is_comm_failure(e: BaseException) -> bool:
    """A collective that failed because a peer is gone (Gloo/NCCL errors), not a bug in this process."""
    import torch.distributed as tdist
    text = str(e)
    return isinstance(e, getattr(tdist, "DistError", ())) or any(
        s in text for s in ("gloo/transport", "NCCL", "Connection reset by peer", "Connection closed by peer"))


# ------------------------------------------------------------------------------------------------ devices
def worker_device(requested: str, local_rank: int) -> str:
    """The device of the worker with this local rank: ``cuda:LOCAL_RANK`` on GPUs, else ``cpu``.

    Returns a device string, or ``"error: ..."`` when this rank cannot have the device asked for (the error is
    shared with every rank before anyone raises, so that all of them stop with the same message).
    """
    if requested == "cpu":
        return "cpu"
    if requested not in ("auto", "cuda"):
        return (f"error: --device {requested} names one device; under torchrun every worker takes cuda:LOCAL_RANK, "
                f"so use --device cuda (or auto, or cpu)")
    if not torch.cuda.is_available():
        return "cpu" if requested == "auto" else "error: --device cuda asked for, but a worker sees no CUDA GPU"
    n = torch.cuda.device_count()
    if local_rank >= n:
        return f"error: local rank {local_rank} has no GPU: this machine has {n}; start at most {n} workers on it"
    return f"cuda:{local_rank}"


def check_devices(devices: list[str]) -> None:
    """Every rank's device, indexed by rank: one error naming the problem when they cannot train together."""
    errors = [d for d in devices if d.startswith("error: ")]
    if errors:
        raise DistError(errors[0][len("error: "):])
    kinds = [d.split(":")[0] for d in devices]
    if len(set(kinds)) > 1:
        where = ", ".join(f"{k}: ranks {_ranges([r for r, x in enumerate(kinds) if x == k])}" for k in sorted(set(kinds)))
        raise DistError(f"mixed CPU and GPU workers ({where}); give every node GPUs, or train on CPUs only "
                        f"with --device cpu")


def _ranges(ranks: list[int]) -> str:
    return ",".join(str(r) for r in ranks[:8]) + ("..." if len(ranks) > 8 else "")


def plan_local(devices: int, requested: str) -> str:
    """Check ``--devices N`` on this machine before launching; returns the device kind the workers will use."""
    if devices < 1:
        raise DistError(f"--devices must be at least 1, got {devices}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested in ("auto", "cuda") and gpus:
        if devices > gpus:
            raise DistError(f"--devices {devices} asks for more GPUs than this machine has ({gpus})")
        return "cuda"
    if requested == "cuda" or requested.startswith("cuda:"):
        raise DistError(f"--device {requested} with --devices {devices}: this machine has no CUDA GPU; "
                        f"use --device cpu" if not gpus else f"--device {requested} names one GPU; use --device cuda")
    if requested not in ("auto", "cpu"):
        raise DistError(f"unknown device {requested!r}; use auto, cpu or cuda")
    cores = os.cpu_count() or 1
    if devices > cores:
        raise DistError(f"--devices {devices} CPU workers on a machine with {cores} cores"
                        + (" and no GPU" if not gpus else "") + f"; use at most --devices {cores}")
    return "cpu"


# ------------------------------------------------------------------------------------------------ process group
def init(d: Dist, requested_device: str, backend: str = "auto", timeout: float = 600.0) -> tuple[Dist, torch.device]:
    """Open the process group for this worker; returns the Dist (with its backend) and the worker's device.

    Before any backend exists, every rank posts its device to the rendezvous store and reads the others': mixed
    CPU/GPU ranks, or a rank without a GPU, stop every rank with the same one-line error instead of a hang.
    """
    import torch.distributed as tdist

    mine = worker_device(requested_device, d.local_rank)
    store, rank, world = next(tdist.rendezvous("env://", rank=d.rank, world_size=d.world,
                                               timeout=timedelta(seconds=timeout)))
    prefix = f"visionkit/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/device/"
    store.set(prefix + str(rank), mine)
    keys = [prefix + str(r) for r in range(world)]
    store.wait(keys, timedelta(seconds=timeout))
    check_devices([store.get(k).decode() for k in keys])

    device = torch.device(mine)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise DistError("dist.backend nccl needs GPUs; on CPU use gloo (or auto)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # CPU tensors (metrics, objects) go through gloo, CUDA tensors through the backend asked for
        pg_backend = f"cpu:gloo,cuda:{backend}"
    else:
        pg_backend = backend
    tdist.init_process_group(pg_backend, store=store, rank=rank, world_size=world,
                             timeout=timedelta(seconds=timeout), device_id=device if device.type == "cuda" else None)
    return Dist(rank, world, d.local_rank, d.local_world, True, backend), device


def shutdown(d: Dist) -> None:
    import torch.distributed as tdist
    if d.enabled and tdist.is_initialized():
        tdist.destroy_process_group()


def seed_rank(seed: int, d: Dist) -> None:
    """Different random streams per rank (dropout, MixUp draws) once the shared set-up is done; rank 0 keeps the
    single-process stream. Data order and augmentation never use these: they are seeded per batch."""
    if d.rank == 0:
        return
    from ..data.loaders import mix_seed
    s = mix_seed(seed, d.rank, 0xD157)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


# ------------------------------------------------------------------------------------------------ collectives
def all_sum(d: Dist, values: list[float]) -> list[float]:
    """Sum numbers over ranks exactly (float64 on CPU: through gloo even when training on NCCL)."""
    if not d.enabled or d.world == 1:
        return [float(v) for v in values]
    import torch.distributed as tdist
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    tdist.all_reduce(t)
    return t.tolist()


def gather(d: Dist, obj: T) -> list[T]:
    """Every rank's ``obj``, indexed by rank, on every rank."""
    if not d.enabled or d.world == 1:
        return [obj]
    import torch.distributed as tdist
    out: list = [None] * d.world
    tdist.all_gather_object(out, obj)
    return out


def broadcast(d: Dist, obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not d.enabled or d.world == 1:
        return obj
    import torch.distributed as tdist
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(d: Dist, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank. A user error there (ValueError subclasses with
    one-line messages) is raised on every rank, so no rank is left waiting for a result that will never come."""
    result, error = None, None
    if d.is_main:
        try:
            result = fn()
        except ValueError as e:
            error = e
    if not d.enabled or d.world == 1:
        if error is not None:
            raise error
        return result
    result, error = broadcast(d, (result, _picklable(error)))
    if error is not None:
        raise error
    return result


def _picklable(e: BaseException | None) -> BaseException | None:
    if e is None:
        return None
    try:
        pickle.dumps(e)
        return e
    except Exception:  # noqa: BLE001 - an exception with unpicklable state still travels as its message
        return DistError(str(e))


def broadcast_module(d: Dist, module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (before an EMA copy is taken, so that it starts equal too)."""
    if not d.enabled or d.world == 1:
        return
    import torch.distributed as tdist
    with torch.no_grad():
        for t in module.state_dict().values():
            if torch.is_tensor(t):
                tdist.broadcast(t, src=0)


def average_norm_stats(d: Dist, *modules: torch.nn.Module | None) -> None:
    """BatchNorm running statistics averaged over ranks (timm's ``distribute_bn``): every rank evaluates and saves
    the same weights. Without SyncBatchNorm each rank's statistics come from its own part of the batch."""
    if not d.enabled or d.world == 1:
        return
    from timm.utils import distribute_bn
    for m in modules:
        if m is not None:
            distribute_bn(m, d.world, reduce=True)


# ------------------------------------------------------------------------------------------------ launcher
def launch(argv: list[str], nproc: int, nnodes: int = 1, rdzv_endpoint: str | None = None, rdzv_timeout: float = 60.0,
           run_id: str | None = None, run_dir: str | None = None) -> int:
    """Start ``nproc`` workers on this machine running ``python -m visionkit ARGV`` through torchrun's elastic agent
    (the code torchrun itself runs; no temp scripts). With ``nnodes > 1`` this machine joins the rendezvous at
    ``rdzv_endpoint``. Returns the exit code: 0, 2 for a user error a worker already printed, 1 otherwise.
    """
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nnodes > 1 and not rdzv_endpoint:
        raise DistError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT (an address of node 0 every node reaches)")
    if rdzv_endpoint and ":" not in rdzv_endpoint:
        raise DistError(f"--rdzv-endpoint must be HOST:PORT, got {rdzv_endpoint!r}")
    # torch's own threads per worker: the cores shared out (torchrun would set 1 and warn)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    standalone = nnodes == 1 and not rdzv_endpoint
    config = LaunchConfig(
        min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=nproc, max_restarts=0, rdzv_backend="c10d",
        rdzv_endpoint="localhost:0" if standalone else rdzv_endpoint,
        run_id=run_id or (str(uuid.uuid4()) if standalone else "visionkit"),
        rdzv_configs={"join_timeout": rdzv_timeout, "read_timeout": rdzv_timeout, "timeout": rdzv_timeout})
    for name in list(logging.root.manager.loggerDict):  # the agent's own log lines: our summary replaces them
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, sys.executable)("-u", "-m", "visionkit", *argv)
    except RendezvousError as e:
        cause = f" ({type(e).__name__})"
        if "timed out" in str(e).lower() or type(e).__name__ == "RendezvousTimeoutError":
            cause = f": not every node joined within {rdzv_timeout:g} s"
        elif e.__cause__ is not None:
            cause = f": {(str(e.__cause__).splitlines() or [''])[0][:160]}"
        raise DistError(f"rendezvous at {rdzv_endpoint} failed{cause}; check that every node runs the same "
                        f"command with --nnodes {nnodes} and that HOST:PORT is reachable (--rdzv-timeout "
                        f"sets the wait)") from None
    except ChildFailedError as e:
        return _report_failure(e, run_dir)
    except SignalException as e:  # Ctrl-C (the workers got it too, and rank 0 said so) or a kill of the launcher
        import signal
        if e.sigval != signal.SIGINT:
            print(f"error: stopped by {signal.Signals(e.sigval).name}; the last checkpoint is intact: continue with "
                  f"`visionkit train --resume {run_dir or 'RUN_DIR'}`", file=sys.stderr)
        return 128 + int(e.sigval)
    return 0


def _report_failure(e, run_dir: str | None = None) -> int:
    """One line for a failed job. A worker's own user error (exit 2) has been printed by that worker already."""
    # the cause first: the agent stops the surviving workers with SIGTERM once one has failed
    failures = sorted(e.failures.items(), key=lambda rf: (rf[1].exitcode == -15, rf[0]))
    if any(f.exitcode == 2 for _, f in failures):
        return 2
    rank, f = failures[0]
    if f.exitcode < 0:
        import signal
        try:
            how = f"was killed by {signal.Signals(-f.exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-f.exitcode}"
    else:
        how = f"exited with code {f.exitcode}"
    print(f"error: worker rank {rank} {how}; the job was stopped. Its last checkpoint is intact: continue with "
          f"`visionkit train --resume {run_dir or 'RUN_DIR'}` (on any number of devices)", file=sys.stderr)
    return 1


__all__ = [
    "Dist",
    "DistError",
    "WorkerLost",
    "all_sum",
    "average_norm_stats",
    "broadcast",
    "broadcast_module",
    "check_devices",
    "from_env",
    "gather",
    "init",
    "is_comm_failure",
    "launch",
    "on_main",
    "plan_local",
    "seed_rank",
    "shutdown",
    "under_torchrun",
    "worker_device",
]

