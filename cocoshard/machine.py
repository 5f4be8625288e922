"""The machine this process runs on, and how a command shares its cores (`thread_plan`).

    plan = thread_plan("train", device_type="cuda", workers=None, threads=None)
    plan.apply()                     # this process's intra-op threads, once
    LoaderSpec(..., workers=plan.workers, threads=plan.loader)

Every part of cocoshard that sizes itself to the machine (worker processes, threads, resident
memory, shared memory) asks here, so that CPU affinity, container limits and torchrun's local world
size are respected in one place, and the CPU threads of a run are decided once, by `thread_plan`,
and passed down: loaders and augmentation take the counts they are given.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Literal

SHARED_MEMORY = "/dev/shm"  # where torch's shared tensors live on Linux (64 MB in a default Docker container)


def usable_cores() -> int:
    """Cores this process may run on (CPU affinity, as set by taskset, cgroups or a scheduler)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def local_world_size() -> int:
    """Processes torchrun started on this machine (1 outside torchrun)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))))


def cores_per_process() -> int:
    """This process's share of the usable cores when torchrun runs several on this machine."""
    return max(1, usable_cores() // local_world_size())


def host_available_bytes() -> int:
    """Memory the kernel says new allocations can have (MemAvailable), in bytes."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def busy_cores(window_s: float = 0.25) -> float:
    """How many cores other work keeps busy right now: the machine's non-idle CPU time over a short
    window, in cores (0.0 where /proc/stat cannot be read). Call it before this process gets busy."""

    def totals() -> tuple[float, float]:
        with open("/proc/stat") as handle:
            fields = [float(v) for v in handle.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
        return sum(fields), idle

    try:
        total0, idle0 = totals()
        time.sleep(window_s)
        total1, idle1 = totals()
    except (OSError, ValueError, IndexError):
        return 0.0
    if total1 <= total0:
        return 0.0
    cores = os.cpu_count() or 1  # /proc/stat sums every core of the machine, not only this process's
    return max(0.0, (1.0 - (idle1 - idle0) / (total1 - total0)) * cores)


def shared_memory_available() -> int | None:
    """Bytes free for shared memory (`/dev/shm`), or None where there is no such file system."""
    try:
        stats = os.statvfs(SHARED_MEMORY)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


# ----------------------------------------------------------------------------- the thread plan


@dataclass(frozen=True)
class ThreadPlan:
    """How a command shares this process's cores, decided once (`thread_plan`).

    `workers` loader processes take one core each (one intra-op thread apiece); `compute` is this
    process's intra-op threads (the model's step); `loader` is the threads this process gives the
    loader's own CPU work (augmentation in the training process when it has no workers, loading a
    resident split), never at the same time as the step. `why` says how it was chosen."""

    cores: int
    workers: int
    compute: int
    loader: int
    busy: float
    why: str

    def apply(self) -> None:
        """Set this process's intra-op threads to `compute`."""
        import torch

        torch.set_num_threads(self.compute)


def thread_plan(
    purpose: Literal["train", "predict"],
    *,
    device_type: str,
    workers: int | None,
    threads: int | None,
    loader_mode: str = "stream",
    measure_busy: bool = True,
) -> ThreadPlan:
    """Loader workers and threads for a command, from what was given and the cores it may use.

    Workers, unless given: for training, none on a CPU (training there already uses every core;
    loader processes beside it stall the compute threads, as each parallel region waits for its
    slowest thread), none for a resident split (nothing to decode after loading; the cores load
    it) and one per core for a stream on a GPU (the step runs on the device, the cores decode); for
    predict, one per core (decoding is the work). Compute threads, unless given: the cores less the
    workers and less the cores other processes keep busy at the start, at least one. Measured
    (cocoshard_tiny, 96 px, 2-core x86 CPU): idle, 2 threads trained at 494 img/s and 1 at 338;
    with one core busy elsewhere, 2 threads fell to 158 img/s while 1 kept 336."""
    cores = cores_per_process()
    if workers is None:
        idle = purpose == "train" and (device_type == "cpu" or loader_mode == "resident")
        workers = 0 if idle else cores
    busy = busy_cores() if threads is None and measure_busy else 0.0
    if threads is not None:
        compute, why = threads, "given"
    else:
        compute = max(1, cores - workers - int(round(busy)))
        why = f"{cores} cores, {workers} loader workers, {busy:.1f} busy elsewhere at start"
    return ThreadPlan(cores, workers, compute, loader=compute, busy=busy, why=why)
