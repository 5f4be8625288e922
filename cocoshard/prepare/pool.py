"""Independent tasks spread over worker processes with one progress bar (pack, synth, inspect --verify).

    results = map_in_workers(write_shard, tasks, workers=None, sizes=[800, 800, 347], progress=True)

`workers`: None starts one process per usable core, 0 runs every task in this process, N starts N
(never more than there are tasks). A task's result depends only on the task, so the output is the
same for any number of workers.

Workers are forked on Linux, as PyTorch's DataLoader does: no start-up cost, and a script that
calls `pack_folder` or `write_synthetic` needs no `if __name__ == "__main__":` guard (with "spawn"
each worker re-runs the caller's script). Elsewhere "spawn" is used. The pool is
`concurrent.futures.ProcessPoolExecutor`, which notices a worker that dies (the OOM killer,
kill -9): the run stops at once with `WorkerDied` naming what was lost, never waits forever for a
task that will not come back (`multiprocessing.Pool` does).
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from cocoshard.errors import UserError
from cocoshard.machine import usable_cores

START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"
T = TypeVar("T")
R = TypeVar("R")


class WorkerDied(UserError):
    """A worker process ended without finishing its task (killed, out of memory)."""


def _quiet_worker() -> None:
    """In each worker: Ctrl-C is the main process's to handle (it stops the workers), and the SIGTERM
    the pool sends its workers when one of them died just ends them (not the CLI's handler, which
    would print a traceback from every worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _stop_now(pool: ProcessPoolExecutor) -> None:
    """Drop the queued tasks and end the running ones: what is half-written is the caller's to clean.

    `terminate_workers` is public from Python 3.14; before it, the executor's own table of its
    processes (a private attribute, present since 3.2) is the only way to reach them."""
    terminate = getattr(pool, "terminate_workers", None)
    if terminate is not None:
        terminate()
        return
    processes = list((getattr(pool, "_processes", None) or {}).values())  # shutdown() forgets them
    manager = getattr(pool, "_executor_manager_thread", None)  # and this
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    if manager is not None:
        # Its end closes the pipe that wakes it: left running, the interpreter's exit could wake it
        # as it closes the pipe, and print "Exception ignored ... Bad file descriptor" after our message.
        manager.join(timeout=10)


def worker_count(requested: int | None, tasks: int) -> int:
    """Processes to start: one per usable core when unset, `requested` otherwise, never more than tasks."""
    wanted = usable_cores() if requested is None else requested
    return max(0, min(wanted, tasks))


def map_in_workers(
    function: Callable[[T], R],
    tasks: Sequence[T],
    *,
    workers: int | None = None,
    sizes: Sequence[int] | None = None,
    progress: bool = False,
    desc: str = "",
    unit: str = "img",
    describe: Callable[[T], str] = str,
) -> list[R]:
    """`[function(t) for t in tasks]`, computed by worker processes; results in task order.

    `function` must be a module-level function (it is pickled by name). `sizes` weights each task
    on the progress bar (e.g. images per task); `describe(task)` names a task in the message
    raised when a worker dies with it.
    """
    from tqdm import tqdm

    weights = list(sizes) if sizes is not None else [1] * len(tasks)
    results: list[Any] = [None] * len(tasks)
    count = worker_count(workers, len(tasks))
    with tqdm(total=sum(weights), desc=desc, unit=unit, disable=not progress, dynamic_ncols=True) as bar:
        if count == 0:
            for index, task in enumerate(tasks):
                results[index] = function(task)
                bar.update(weights[index])
            return results
        context = multiprocessing.get_context(START_METHOD)
        with ProcessPoolExecutor(max_workers=count, mp_context=context, initializer=_quiet_worker) as pool:
            pending = {pool.submit(function, task): index for index, task in enumerate(tasks)}
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        index = pending.pop(future)
                        results[index] = future.result()
                        bar.update(weights[index])
            except BrokenProcessPool:
                lost = sorted(pending.values())
                names = ", ".join(describe(tasks[i]) for i in lost[:3]) + (" ..." if len(lost) > 3 else "")
                raise WorkerDied(
                    f"a {desc or 'worker'} process died before finishing (killed, or out of memory?); "
                    f"{len(lost)} task(s) unfinished: {names}. Nothing half-done was kept: run the command "
                    "again" + (" with fewer --workers" if count > 1 else "")
                ) from None
            except BaseException:  # a task's error, Ctrl-C, SIGTERM: stop now, not when every task is done
                _stop_now(pool)
                raise
    return results
