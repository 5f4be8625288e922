"""Worker processes for independent tasks (pack, synth, inspect --verify): a task's error stops them
at once, and nothing of the pool is left running behind the error."""

from __future__ import annotations

import threading
import time

import pytest

from cocoshard.prepare.pool import map_in_workers


def _fails_on_three(task: int) -> int:
    if task == 3:
        raise ValueError("task 3 cannot be done")
    time.sleep(0.2)  # the others are still running when it fails
    return task * 2


def test_tasks_are_computed_in_order_by_any_number_of_workers() -> None:
    tasks = [5, 1, 4, 0, 2]
    assert map_in_workers(abs, tasks, workers=2) == map_in_workers(abs, tasks, workers=0) == tasks


@pytest.mark.parametrize("attempt", range(3))
def test_a_task_error_stops_the_pool_and_leaves_no_thread_of_it_running(attempt: int) -> None:
    """The error comes back as it was raised, and the executor's manager thread has ended by then:
    left running, the interpreter's exit wakes it while it closes its pipe, and a user whose pack
    failed (a full disk) read a "Bad file descriptor" traceback after the error's message."""
    before = set(threading.enumerate())
    with pytest.raises(ValueError, match="task 3 cannot be done"):
        map_in_workers(_fails_on_three, list(range(12)), workers=2)
    left = [thread for thread in set(threading.enumerate()) - before if thread.is_alive()]
    assert not left, left
