"""Independent tasks spread over processes with one progress bar (pack, synth, inspect --verify).

Workers are forked on Linux, as PyTorch's DataLoader does: no start-up cost, and a script that
calls `pack_folder` or `write_synthetic` needs no `if __name__ == "__main__":` guard (with "spawn"
each worker re-runs the caller's script). The workers only run numpy and PIL, never torch, so
threads the parent may hold do not matter to them. Elsewhere "spawn" is used. A task's result
depends only on the task, so the output is the same for any number of workers.
"""

from __future__ import annotations

import multiprocessing
import sys
from typing import Any, Callable, Sequence, TypeVar

START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"
T = TypeVar("T")
R = TypeVar("R")


def cpu_count() -> int:
    """Cores this process may run on (respects CPU affinity and container limits)."""
    from cocoshard.machine import usable_cores

    return usable_cores()


def worker_count(requested: int, tasks: int) -> int:
    """Processes to start: `requested` (0 means one per core), never more than there are tasks."""
    wanted = requested if requested > 0 else cpu_count()
    return max(1, min(wanted, tasks))


def _indexed(call: tuple[Callable[[Any], Any], int, Any]) -> tuple[int, Any]:
    function, index, task = call
    return index, function(task)


def map_in_workers(
    function: Callable[[T], R],
    tasks: Sequence[T],
    *,
    workers: int = 0,
    sizes: Sequence[int] | None = None,
    progress: bool = False,
    desc: str = "",
    unit: str = "img",
) -> list[R]:
    """`[function(t) for t in tasks]`, computed by worker processes; results in task order.

    `function` must be a module-level function (it is pickled by name). `sizes` weights each task
    on the progress bar (e.g. images per task); one worker runs everything in this process.
    """
    from tqdm import tqdm

    weights = list(sizes) if sizes is not None else [1] * len(tasks)
    results: list[Any] = [None] * len(tasks)
    count = worker_count(workers, len(tasks))
    with tqdm(total=sum(weights), desc=desc, unit=unit, disable=not progress, dynamic_ncols=True) as bar:
        if count == 1:
            for index, task in enumerate(tasks):
                results[index] = function(task)
                bar.update(weights[index])
            return results
        calls = [(function, index, task) for index, task in enumerate(tasks)]
        with multiprocessing.get_context(START_METHOD).Pool(count) as pool:
            for index, result in pool.imap_unordered(_indexed, calls):
                results[index] = result
                bar.update(weights[index])
    return results
