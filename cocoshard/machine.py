"""The machine this process runs on: the cores it may use and the host memory it may take.

Every part of cocoshard that sizes itself to the machine (worker processes, threads, resident
memory) asks here, so that CPU affinity, container limits and torchrun's local world size are
respected in one place.
"""

from __future__ import annotations

import os


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
    import time

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
