"""The trainer's side of batch production: worker processes (`WorkerPool`) or this process
(`InProcess`), behind one interface (`Producer`).

    producer = WorkerPool(source, workers=4, shapes=source.slot_shapes(), slots_per_worker=3)
    producer.begin(epoch, starts)           # each worker's first batch
    filled = producer.receive(worker)       # Filled(slot, size, keys, ...) or None at its end
    producer.give_back(worker, filled.slot)
    producer.close()

Each worker owns a few slots: shared-memory tensors made here before the workers start, so they
are mapped in both once and nothing is pickled, copied or passed per batch; a message carries only
the slot number, the sample count and the keys. What a worker does runs in its own process
(`cocoshard.loading.worker_side`). A worker fills a slot only after it was given back, so nothing a
caller holds is ever overwritten; when every slot of a worker is out and the trainer is waiting for
it, the trainer makes the worker one more slot rather than wait (a caller may keep every batch).

Before the first worker starts, the slots' shared memory is checked against what `/dev/shm` has
free (a default Docker container has 64 MB; PyTorch users meet a full one as a bus error or a
silent hang). A worker that dies (the OOM killer, kill -9) is noticed at once: `receive` raises
`WorkerDied` naming it. A worker's error (a bad sample, a bad shard) comes back as the same
exception type with its message; anything else with the worker's traceback.
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection
import os
import select
import sys
import threading
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, NoReturn, Protocol

import torch.multiprocessing as mp

from cocoshard.errors import UserError
from cocoshard.loading.batch import SlotKey
from cocoshard.loading.buffers import Loans, Slot, SlotPool, SlotShapes, make_slot, slot_bytes
from cocoshard.loading.worker_side import BatchSource, Filled, worker_main
from cocoshard.machine import SHARED_MEMORY, shared_memory_available

START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"
POLL_S = 1.0  # how often a waiting trainer checks that its worker is alive
SHM_HEADROOM = 1.25  # slots made later (a caller holding every batch) and torch's own bookkeeping
# A poll object per worker, its pipe and sentinel registered once (multiprocessing.connection.wait
# builds a selector and registers both again for every batch); Windows has none: its pipes are
# waited on by multiprocessing.connection.wait.
POLLABLE = hasattr(select, "poll")


class WorkerDied(UserError):
    """A loader worker process ended without finishing its epoch (killed, out of memory)."""


class WorkerFailed(RuntimeError):
    """A loader worker raised an error that is not about the data; the message holds its traceback."""


class SharedMemoryTooSmall(UserError):
    """The worker slots would not fit the shared memory the machine has."""


class Producer(Protocol):
    """Where filled slots come from: worker processes or this process."""

    count: int  # how many producers (workers; 1 in process)
    slots: list[list[Slot]]  # each producer's slots, by number

    def begin(self, epoch: int, starts: list[int]) -> None: ...
    def receive(self, worker: int, more: bool = True) -> Filled | None: ...
    def give_back(self, worker: int, slot: int) -> None: ...
    def close(self) -> None: ...


def _human(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} bytes"


def check_shared_memory(shapes: SlotShapes, workers: int, slots_per_worker: int, name: str) -> None:
    """Refuse, with what to do, slots that the shared memory of this machine cannot hold."""
    free = shared_memory_available()
    needed = slot_bytes(shapes) * workers * slots_per_worker * SHM_HEADROOM
    if free is None or needed <= free:
        return
    gib = max(1, -(-int(needed) // 2**30))
    raise SharedMemoryTooSmall(
        f"the {name}'s {workers} worker processes need {_human(needed)} of shared memory for their "
        f"batch slots, and {SHARED_MEMORY} has {_human(free)} free (a container's default is 64 MB): "
        f"give the container more (docker run --shm-size={2 * gib}g), use fewer --workers, or "
        f"--workers 0 (batches made in the training process, no shared memory)"
    )


class InProcess:
    """No workers: the source's batches made in this process, in slots recycled through `Loans`."""

    count = 1

    def __init__(
        self,
        source: BatchSource,
        shapes: SlotShapes,
        loans: Loans[SlotKey],
        on_new_slot: Callable[[Slot], None] | None = None,
    ) -> None:
        self.source, self.shapes, self.loans = source, shapes, loans
        self.on_new_slot = on_new_slot or (lambda slot: None)
        self.pool = SlotPool()
        self.slots = [self.pool.slots]
        self._batches: Iterator[Filled] | None = None

    def _acquire(self) -> tuple[int, Slot]:
        for _, number in self.loans.returned():
            self.pool.put_back(number)
        free = self.pool.take()
        if free is None:
            slot = make_slot(self.shapes, shared=False)
            self.on_new_slot(slot)
            self.pool.add(slot)
            free = self.pool.take()
        assert free is not None
        return free

    def begin(self, epoch: int, starts: list[int]) -> None:
        self._batches = self.source.batches(epoch, 0, self._acquire, starts[0])

    def receive(self, worker: int, more: bool = True) -> Filled | None:
        return next(self._batches, None) if self._batches is not None else None

    def give_back(self, worker: int, slot: int) -> None:
        self.pool.put_back(slot)

    def close(self) -> None:
        self.pool = SlotPool()
        self.slots, self._batches = [self.pool.slots], None


class WorkerPool:
    """`count` processes filling slots from `source` (see the module doc); started on first use."""

    def __init__(
        self,
        source: BatchSource,
        count: int,
        shapes: SlotShapes,
        slots_per_worker: int,
        on_new_slot: Callable[[Slot], None] | None = None,
        name: str = "loader",
    ) -> None:
        self.source, self.count, self.name = source, count, name
        self.shapes, self.slots_per_worker = shapes, slots_per_worker
        self.on_new_slot = on_new_slot or (lambda slot: None)
        self.slots: list[list[Slot]] = [[] for _ in range(count)]  # made when the workers start
        self._at_worker: list[set[int]] = [set() for _ in range(count)]
        self._processes: list[BaseProcess] = []
        self._conns: list[Connection] = []
        self._pollers: list[select.poll] = []  # each worker's pipe and sentinel, registered once
        self._running = [False] * count

    def _new_slot(self) -> Slot:
        slot = make_slot(self.shapes, shared=True)
        self.on_new_slot(slot)
        return slot

    def _start(self) -> None:
        check_shared_memory(self.shapes, self.count, self.slots_per_worker, self.name)
        context: Any = mp.get_context(START_METHOD)  # a context's Process and Pipe are untyped
        # New slots for new workers: a batch the caller still holds from earlier ones stays intact.
        self.slots = [[self._new_slot() for _ in range(self.slots_per_worker)] for _ in range(self.count)]
        self._at_worker = [set(range(self.slots_per_worker)) for _ in range(self.count)]
        main_thread = threading.current_thread() is threading.main_thread()
        for worker in range(self.count):
            parent, child = context.Pipe(duplex=True)
            process = context.Process(
                target=worker_main,
                args=(worker, child, self.source, self.slots[worker], [*self._conns, parent], os.getpid()),
                kwargs={"kernel_signal": main_thread},  # the kernel's signal follows the forking thread
                daemon=True,
                name=f"cocoshard-{self.name}-{worker}",
            )
            process.start()
            child.close()
            self._processes.append(process)
            self._conns.append(parent)
            if POLLABLE:
                poller = select.poll()
                for fd in (parent.fileno(), process.sentinel):
                    poller.register(fd, select.POLLIN)
                self._pollers.append(poller)

    def begin(self, epoch: int, starts: list[int]) -> None:
        """Start epoch `epoch` in every worker, worker w from its batch `starts[w]` (ending an epoch
        still under way first)."""
        if not self._processes:
            self._start()
        for worker in range(self.count):
            if self._running[worker]:
                self._send(worker, ("cancel",))
                while (filled := self.receive(worker)) is not None:
                    self.give_back(worker, filled.slot)  # a batch of the abandoned epoch
        for worker in range(self.count):
            self._send(worker, ("epoch", epoch, starts[worker]))
            self._running[worker] = True

    def give_back(self, worker: int, slot: int) -> None:
        """Slot `slot` of `worker` may be filled again."""
        if slot not in self._at_worker[worker]:
            self._at_worker[worker].add(slot)
            self._send(worker, ("free", slot))

    def receive(self, worker: int, more: bool = True) -> Filled | None:
        """The next filled slot of `worker`, or None when its epoch is over; raises what the worker met.
        `more=False`: only the end of its epoch is expected (no slot is made for it)."""
        if more and not self._at_worker[worker]:  # every slot is out: the worker could only wait for one
            self.slots[worker].append(self._new_slot())
            self._at_worker[worker].add(len(self.slots[worker]) - 1)
            self._send(worker, ("slot", self.slots[worker][-1]))
        message = self._wait(worker)
        kind = message[0]
        if kind == "ready":
            filled = Filled(*message[1:])
            self._at_worker[worker].discard(filled.slot)
            return filled
        self._running[worker] = False
        if kind == "end":
            return None
        self.close()
        if kind == "error":
            _, module, name, text = message
            error_type = getattr(sys.modules.get(module), name, UserError)
            raise error_type(text)
        raise WorkerFailed(f"{self.name} worker {worker} failed:\n{message[1]}")

    def _wait(self, worker: int) -> tuple:
        conn, process = self._conns[worker], self._processes[worker]
        while True:
            if POLLABLE:
                ready = {fd for fd, _ in self._pollers[worker].poll(POLL_S * 1000)}
                message, ended = conn.fileno() in ready, process.sentinel in ready
            else:
                waited = multiprocessing.connection.wait([conn, process.sentinel], timeout=POLL_S)
                message, ended = conn in waited, process.sentinel in waited
            if message:
                try:
                    return conn.recv()
                except (EOFError, ConnectionResetError):  # its end is closed: it died, or is dying
                    self._died(worker)  # (killed with a message of ours unread, it resets the pipe)
            if ended or not process.is_alive():
                self._died(worker)

    def _died(self, worker: int) -> NoReturn:
        """Raise WorkerDied naming `worker`, whose pipe or process has ended, once it has exited (at
        most POLL_S: a worker whose pipe closed is ending), and stop the others."""
        process = self._processes[worker]
        process.join(timeout=POLL_S)
        code = process.exitcode
        self.close()
        if code is None:
            how = "its pipe closed, the process still running"
        elif code < 0:
            how = f"killed by signal {-code}"
        else:
            how = f"exit code {code}"
        raise WorkerDied(
            f"{self.name} worker {worker} (pid {process.pid}) died during an epoch ({how}; "
            f"out of memory?): run again, with fewer --workers if memory is short"
        )

    def _send(self, worker: int, message: tuple) -> None:
        try:
            self._conns[worker].send(message)
        except (BrokenPipeError, ConnectionResetError):
            self._died(worker)  # (not _wait: a batch it sent before dying would be taken for an answer)

    def pids(self) -> list[int]:
        """The worker processes' ids (none before the first epoch)."""
        return [process.pid for process in self._processes if process.pid is not None]

    def close(self) -> None:
        """Stop the workers now (a later `begin` starts new ones; the slots stay mapped here)."""
        for conn in self._conns:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError, OSError):
                conn.send(("stop",))
        for process in self._processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        for conn in self._conns:
            conn.close()
        self._processes, self._conns, self._pollers = [], [], []
        self._running = [False] * self.count
        self._at_worker = [set() for _ in range(self.count)]

    def __del__(self) -> None:
        if self._processes:
            with contextlib.suppress(Exception):  # at interpreter exit, modules may be gone already
                self.close()
