"""What runs inside a loader worker process: take the trainer's commands, fill slots, report.

The trainer's side of the conversation is `cocoshard.loading.worker_pool`. Messages:

    trainer -> worker   ("epoch", epoch, start)   fill this epoch's batches, from batch `start` on
                        ("free", slot)            slot `slot` may be filled again
                        ("slot", tensors)         one more slot (the trainer holds every other one)
                        ("cancel",) ("stop",)     end the epoch now / end the process
    worker -> trainer   ("ready", *Filled)        a slot is filled
                        ("end",)                  the epoch is over
                        ("error", module, name, text) / ("failed", traceback)

A worker never outlives the training process, whatever killed it (SIGKILL, the OOM killer): it
closes the pipe ends it inherited but does not use, so that its own pipe reports the trainer's
death as end-of-file; on Linux the kernel sends it SIGKILL when the thread that forked it dies;
and a watchdog thread checks once a second that its parent is still its parent. Its shared-memory
slots are freed with it.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import NamedTuple, Protocol

import torch

from cocoshard.errors import UserError
from cocoshard.loading.buffers import Slot, SlotPool

PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when the thread that forked it dies
WATCHDOG_S = 1.0

Acquire = Callable[[], tuple[int, Slot]]  # a free slot to fill: (its number, its tensors)


class Filled(NamedTuple):
    """A filled slot: `size` samples with these keys; `skipped` bad samples met filling it; `number`
    the batch's number in its epoch; `spill` what did not fit in the slot (compressed bytes of an
    unusually large batch, by row), sent along."""

    slot: int
    size: int
    keys: list[str]
    skipped: int
    number: int
    spill: dict[int, bytes] | None = None


class BatchSource(Protocol):
    """What a worker does (or this process, with no workers): fill its batches of an epoch."""

    def batches(self, epoch: int, worker: int, acquire: Acquire, start: int) -> Iterator[Filled]:
        """Fill one slot per batch of `worker` in `epoch`, its first `start` batches skipped."""
        ...


class _Stop(Exception):
    pass


class _Cancel(Exception):
    pass


class _WorkerSide:
    """The worker's loop: commands in, filled slots out."""

    def __init__(self, conn: Connection, slots: list[Slot]) -> None:
        self.conn, self.pool = conn, SlotPool(slots)

    def handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "free":
            self.pool.put_back(message[1])
        elif kind == "slot":
            self.pool.add(message[1])
        elif kind == "cancel":
            raise _Cancel
        elif kind == "stop":
            raise _Stop
        else:
            raise RuntimeError(f"unexpected message {kind!r} during an epoch")

    def acquire(self) -> tuple[int, Slot]:
        while self.conn.poll():  # slots given back and a cancel, without waiting
            self.handle(self.conn.recv())
        while (free := self.pool.take()) is None:
            self.handle(self.conn.recv())
        return free

    def run(self, source: BatchSource, worker: int) -> None:
        while True:
            message = self.conn.recv()
            if message[0] != "epoch":
                try:
                    self.handle(message)
                except _Cancel:
                    pass  # an epoch already over
                continue
            try:
                for filled in source.batches(message[1], worker, self.acquire, message[2]):
                    self.conn.send(("ready", *filled))
                self.conn.send(("end",))
            except _Cancel:
                self.conn.send(("end",))
            except UserError as exc:
                self.conn.send(("error", type(exc).__module__, type(exc).__name__, str(exc)))
            except _Stop:
                raise
            except Exception:  # report, with where it happened, and keep serving
                self.conn.send(("failed", traceback.format_exc()))


def _die_with(parent: int, kernel_signal: bool) -> None:
    """End this process as soon as `parent` is no longer its parent."""
    if kernel_signal and sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass  # the watchdog below still notices

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(WATCHDOG_S)
        os._exit(0)

    if os.getppid() != parent:  # the trainer died before we could ask
        os._exit(0)
    threading.Thread(target=watch, name="cocoshard-parent-watchdog", daemon=True).start()


def worker_main(
    worker: int,
    conn: Connection,
    source: BatchSource,
    slots: list[Slot],
    inherited: list[Connection],
    parent: int,
    kernel_signal: bool,
) -> None:
    """The worker process: `inherited` are the trainer's pipe ends this fork holds copies of."""
    for end in inherited:
        end.close()  # else the trainer's death would not reach our pipe as end-of-file
    _die_with(parent, kernel_signal)
    # Ctrl-C reaches the whole process group: the trainer decides, the worker waits to be stopped.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)  # one core per worker: the thread plan counted it so
    # A forked worker shares the parent's heap copy-on-write; each collection would walk (and so
    # copy) the million objects an `import torch` leaves behind. Measured: raw-shard workers spent
    # twice the CPU time of the same code in the main process until frozen.
    gc.freeze()
    try:
        _WorkerSide(conn, slots).run(source, worker)
    except (_Stop, EOFError, BrokenPipeError, ConnectionResetError, KeyboardInterrupt):
        pass  # stopped, or the trainer is gone
