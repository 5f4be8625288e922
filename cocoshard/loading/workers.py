"""Loader worker processes that fill batch slots in shared memory and say when one is ready.

    pool = WorkerPool(source, workers=4, slot_shapes={"images": ((128, 224, 224, 3), torch.uint8)})
    pool.begin(epoch)
    message = pool.receive(worker)     # Ready(slot, size, keys, skipped) or None at the end
    pool.give_back(worker, message.slot)
    pool.close()

Each worker owns a few slots: shared-memory tensors the main process makes before the workers
start, so they are mapped in both once and nothing is pickled, copied or passed per batch; a
message carries only the slot number, the sample count and the keys. A worker fills a slot only
after the main process gave it back (`give_back`), so nothing the caller holds is ever
overwritten; when every slot of a worker is out and the main process is waiting for it, the main
process makes the worker one more slot rather than wait (a caller may keep every batch).

A worker that dies (the OOM killer, kill -9) is noticed at once: `receive` raises `WorkerDied`
naming it, never waits forever. A worker's error (a bad sample, a bad shard) comes back as the
same exception type with its message; anything else comes back with the worker's traceback.

`source` is any object with `batches(epoch, worker, acquire)`: a generator that takes slots with
`acquire()` (slot number, tensors), fills them and yields `(slot, size, keys, skipped[, extra])`.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing.connection
import signal
import sys
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.multiprocessing as mp

from cocoshard.errors import UserError

START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"
SlotShapes = dict[str, tuple[tuple[int, ...], torch.dtype]]
Slot = dict[str, torch.Tensor]
POLL_S = 1.0  # how often a waiting main process checks that its worker is alive


class WorkerDied(UserError):
    """A loader worker process ended without finishing its epoch (killed, out of memory)."""


class WorkerFailed(RuntimeError):
    """A loader worker raised an error that is not about the data; the message holds its traceback."""


class BatchSource(Protocol):
    def batches(
        self, epoch: int, worker: int, acquire: Callable[[], tuple[int, Slot]]
    ) -> Iterator[tuple]: ...


@dataclass(frozen=True)
class Ready:
    """A filled slot: `size` samples with these keys; `skipped` bad samples met filling it; `extra`:
    what did not fit in the slot (compressed bytes of an unusually large batch), sent along."""

    slot: int
    size: int
    keys: list[str]
    skipped: int
    extra: Any = None


def make_slot(shapes: SlotShapes, shared: bool) -> Slot:
    """One slot's tensors, in shared memory when worker processes fill it."""
    slot = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in shapes.items()}
    return {name: tensor.share_memory_() for name, tensor in slot.items()} if shared else slot


# ----------------------------------------------------------------------------- worker side


class _Stop(Exception):
    pass


class _Cancel(Exception):
    pass


class _WorkerSide:
    """What runs in a worker process: take commands, fill slots, report."""

    def __init__(self, conn: Any, slots: list[Slot]) -> None:
        self.conn, self.slots = conn, slots
        self.free: deque[int] = deque(range(len(slots)))

    def handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "free":
            self.free.append(message[1])
        elif kind == "slot":
            self.slots.append(message[1])
            self.free.append(len(self.slots) - 1)
        elif kind == "cancel":
            raise _Cancel
        elif kind == "stop":
            raise _Stop
        else:
            raise RuntimeError(f"unexpected message {kind!r} during an epoch")

    def acquire(self) -> tuple[int, Slot]:
        while self.conn.poll():  # slots given back and a cancel, without waiting
            self.handle(self.conn.recv())
        while not self.free:
            self.handle(self.conn.recv())
        slot = self.free.popleft()
        return slot, self.slots[slot]

    def run(self, source: BatchSource, worker: int) -> None:
        while True:
            message = self.conn.recv()
            if message[0] != "epoch":
                try:
                    self.handle(message)
                except _Cancel:
                    continue  # an epoch already over
                continue
            try:
                for found in source.batches(message[1], worker, self.acquire):
                    self.conn.send(("ready", *found))
                self.conn.send(("end",))
            except _Cancel:
                self.conn.send(("end",))
            except UserError as exc:
                self.conn.send(("error", type(exc).__module__, type(exc).__name__, str(exc)))
            except _Stop:
                raise
            except Exception:  # report, with where it happened, and keep serving
                self.conn.send(("failed", traceback.format_exc()))


def _worker_main(worker: int, conn: Any, source: BatchSource, slots: list[Slot]) -> None:
    # Ctrl-C reaches the whole process group: the main process decides, the worker waits to be stopped.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    # A forked worker shares the parent's heap copy-on-write; each collection would walk (and so
    # copy) the million objects an `import torch` leaves behind. Measured: raw-shard workers spent
    # twice the CPU time of the same code in the main process until frozen.
    gc.freeze()
    try:
        _WorkerSide(conn, slots).run(source, worker)
    except (_Stop, EOFError, BrokenPipeError, KeyboardInterrupt):
        pass  # stopped, or the main process is gone


# ----------------------------------------------------------------------------- main side


class WorkerPool:
    """`workers` processes filling slots from `source` (see the module doc); started on first use."""

    def __init__(
        self,
        source: BatchSource,
        workers: int,
        slot_shapes: SlotShapes,
        slots_per_worker: int,
        on_new_slot: Callable[[Slot], None] | None = None,
        name: str = "loader",
    ) -> None:
        self.source, self.count, self.name = source, workers, name
        self.slot_shapes = slot_shapes
        self.on_new_slot = on_new_slot or (lambda slot: None)
        self.slots_per_worker = slots_per_worker
        self.slots: list[list[Slot]] = [[] for _ in range(workers)]  # made when the workers start
        self._at_worker: list[set[int]] = [set() for _ in range(workers)]
        self._processes: list[Any] = []
        self._conns: list[Any] = []
        self._running = [False] * workers

    def _new_slot(self) -> Slot:
        slot = make_slot(self.slot_shapes, shared=True)
        self.on_new_slot(slot)
        return slot

    def _start(self) -> None:
        context = mp.get_context(START_METHOD)
        # New slots for new workers: a batch the caller still holds from earlier ones stays intact.
        self.slots = [[self._new_slot() for _ in range(self.slots_per_worker)] for _ in range(self.count)]
        self._at_worker = [set(range(self.slots_per_worker)) for _ in range(self.count)]
        for worker in range(self.count):
            parent, child = context.Pipe(duplex=True)
            process = context.Process(
                target=_worker_main,
                args=(worker, child, self.source, self.slots[worker]),
                daemon=True,
                name=f"cocoshard-{self.name}-{worker}",
            )
            process.start()
            child.close()
            self._processes.append(process)
            self._conns.append(parent)

    def begin(self, epoch: int) -> None:
        """Start epoch `epoch` in every worker (ending one still under way first)."""
        if not self._processes:
            self._start()
        for worker in range(self.count):
            if self._running[worker]:
                self._send(worker, ("cancel",))
                while (ready := self.receive(worker)) is not None:
                    self.give_back(worker, ready.slot)  # a batch of the abandoned epoch
        for worker in range(self.count):
            self._send(worker, ("epoch", epoch))
            self._running[worker] = True

    def give_back(self, worker: int, slot: int) -> None:
        """Slot `slot` of `worker` may be filled again."""
        if slot not in self._at_worker[worker]:
            self._at_worker[worker].add(slot)
            self._send(worker, ("free", slot))

    def receive(self, worker: int) -> Ready | None:
        """The next filled slot of `worker`, or None when its epoch is over; raises what the worker met."""
        if not self._at_worker[worker]:  # every slot is out: the worker could only wait for one
            self.slots[worker].append(self._new_slot())
            self._at_worker[worker].add(len(self.slots[worker]) - 1)
            self._send(worker, ("slot", self.slots[worker][-1]))
        message = self._wait(worker)
        kind = message[0]
        if kind == "ready":
            ready = Ready(*message[1:])
            self._at_worker[worker].discard(ready.slot)
            return ready
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
            ready = multiprocessing.connection.wait([conn, process.sentinel], timeout=POLL_S)
            if conn in ready:
                try:
                    return conn.recv()
                except EOFError:
                    pass
            if process.sentinel in ready or not process.is_alive():
                code = process.exitcode
                self.close()
                how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                raise WorkerDied(
                    f"{self.name} worker {worker} (pid {process.pid}) died during an epoch ({how}; "
                    f"out of memory?): run again, with fewer --workers if memory is short"
                )

    def _send(self, worker: int, message: tuple) -> None:
        try:
            self._conns[worker].send(message)
        except (BrokenPipeError, ConnectionResetError, OSError):
            self._wait(worker)  # names the dead worker
            raise

    def close(self) -> None:
        """Stop the workers now (a later `begin` starts new ones; the slots stay mapped here)."""
        for conn in self._conns:
            try:
                conn.send(("stop",))
            except (BrokenPipeError, ConnectionResetError, OSError):
                pass
        for process in self._processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        for conn in self._conns:
            conn.close()
        self._processes, self._conns = [], []
        self._running = [False] * self.count
        self._at_worker = [set() for _ in range(self.count)]

    def __del__(self) -> None:
        if self._processes:
            with contextlib.suppress(Exception):  # at interpreter exit, modules may be gone already
                self.close()
