"""What keeps a run bounded when it spans processes: signals honoured while PyTorch waits, and a
lost peer named instead of waited for.

    with SignalWatch(where_it_stands) as signals:        # SIGTERM at once, in every state
        runtime = setup(..., timeout_s=cfg.dist_timeout)  # the process group's collective timeout
        peers = PeerWatch.start(runtime, cfg.dist_timeout, where_it_stands)
        ...                                               # a lost peer ends this rank with one line
        peers.close("done")

Python runs a signal handler only once the main thread is back in the interpreter. A rank blocked
in PyTorch's native code (a collective waiting for a peer, the rendezvous, a long kernel) would
honour SIGTERM only when that call returns: for a peer that stopped, after the whole timeout.
`SignalWatch` hears the signal through `signal.set_wakeup_fd` in a thread of its own; when the
main thread has not taken it within `GRACE_S`, the thread says where the run stands and ends the
process itself (exit 128 + signal), as the main thread would have.

`PeerWatch` is a heartbeat in the rendezvous store (the TCPStore torchrun or rank 0 hosts): every
`BEAT_S` each rank raises its counter and reads everyone's. A rank whose counter stops for half
of `--dist-timeout` is lost (killed, frozen by SIGSTOP, its node cut off), and so is one that
says it stopped (an error, a signal). Every surviving rank then ends with one line naming the lost
rank, its host and pid, and the command that resumes (exit 2), before the collective's own
timeout would end it with a backend's traceback (gloo) or an abort (NCCL's watchdog). When a
collective fails first (gloo notices a closed connection at once), `explain` names the peer the
same way. A rank that is writing a checkpoint finishes it first (`saving`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from cocoshard.errors import UserError
from cocoshard.training.runtime import Runtime, attempt

GRACE_S = 1.0  # the main thread's own handler runs within milliseconds when it can run at all
CLEANUP_S = 15.0  # how long stopping may take once the main thread has taken the signal
BEAT_S = 1.0  # between heartbeats
QUICK_SILENCE_S = 2.5 * BEAT_S  # after a failed collective: a peer this silent is the one lost
STORE_TIMEOUT_S = 5.0  # one store request (a frozen store host must not freeze the watch)
STORE_RETRY_S = 5.0  # between tries of a store that stopped answering
EXIT_LOST = 2  # what a UserError exits with: the run stopped for a reason it names
RUNNING, DONE, STOPPED = "running", "done", "stopped"

Describe = Callable[[], list[str]]


class PeerLost(UserError):
    """Another process of the run died, froze or stopped: the message names it and how to resume."""


def _say(lines: list[str]) -> None:
    """Print from a watch thread, the main thread being busy elsewhere: stdout first, then stderr."""
    sys.stdout.flush()
    print("\n".join(lines), file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------- signals


class SignalWatch:
    """SIGTERM and SIGINT honoured within `GRACE_S` even while the main thread waits in native code.

    The main thread calls `acknowledge()` when it takes the signal (its KeyboardInterrupt); if it
    does not, the watch prints "interrupted by SIG..." and `describe()`, and exits 128 + signal."""

    def __init__(self, describe: Describe) -> None:
        self.describe = describe
        self.farewell: Callable[[str], None] = lambda why: None  # tells the other ranks, when there are
        self._acknowledged = threading.Event()
        self._closed = threading.Event()
        self._pipe: tuple[int, int] | None = None
        self._previous = -1
        self._thread: threading.Thread | None = None

    def __enter__(self) -> SignalWatch:
        read, write = os.pipe()
        os.set_blocking(write, False)
        try:
            self._previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        except ValueError:  # not the main thread: signals are not ours to watch
            os.close(read)
            os.close(write)
            return self
        self._pipe = (read, write)
        self._thread = threading.Thread(target=self._watch, name="cocoshard-signal-watch", daemon=True)
        self._thread.start()
        return self

    def acknowledge(self) -> None:
        """The main thread has taken the signal and is stopping."""
        self._acknowledged.set()

    def __exit__(self, *exc: object) -> None:
        self._closed.set()
        if self._pipe is None:
            return
        signal.set_wakeup_fd(self._previous)
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        for fd in self._pipe:
            os.close(fd)
        self._pipe = None

    def _watch(self) -> None:
        assert self._pipe is not None
        read = self._pipe[0]
        while not self._closed.is_set():
            ready, _, _ = select.select([read], [], [], 0.2)
            if not ready or self._closed.is_set():
                continue
            for signum in os.read(read, 64):
                if signum in (signal.SIGTERM, signal.SIGINT):
                    self._honour(signal.Signals(signum))
                    return

    def _honour(self, signum: signal.Signals) -> None:
        if self._acknowledged.wait(GRACE_S):
            if self._closed.wait(CLEANUP_S):
                return
            _say([f"interrupted by {signum.name}: stopping took longer than {CLEANUP_S:.0f} s, ending now"])
        elif self._closed.is_set():
            return
        else:
            self.farewell(f"interrupted by {signum.name}")
            _say([f"interrupted by {signum.name} while waiting inside PyTorch (stopped at once)"])
            _say(self.describe())
        os._exit(128 + signum)


# ----------------------------------------------------------------------------------- peers


@dataclass
class Peer:
    """What this rank last read of another one."""

    count: int = -1
    state: str = RUNNING
    who: str = ""
    changed: float = 0.0  # monotonic time its count last moved


def _encode(count: int, state: str, who: str) -> str:
    return f"{count}\t{who}\t{state}"


def _decode(raw: bytes) -> tuple[int, str, str]:
    count, who, state = raw.decode(errors="replace").split("\t", 2)
    return int(count), who, state


def this_process() -> str:
    """How a lost rank is named: its host and its pid."""
    return f"{socket.gethostname()} pid {os.getpid()}"


class PeerWatch:
    """Every rank's heartbeat in the rendezvous store; a lost one is named (see the module's docstring)."""

    def __init__(
        self,
        store: dist.Store | None,
        runtime: Runtime,
        timeout_s: float,
        describe: Describe,
        store_host: str = "",
    ) -> None:
        self.store, self.rank, self.world = store, runtime.rank, runtime.world_size
        self.lost_after = timeout_s / 2  # half the collective timeout: named before it ends the rank
        self.describe, self.store_host = describe, store_host
        self.lost = False  # a verdict was given: the process group is broken
        self._peers = {
            rank: Peer(changed=time.monotonic()) for rank in range(self.world) if rank != self.rank
        }
        self._count, self._state = 0, RUNNING
        self._last_beat = self._last_try = time.monotonic()
        self._store_failing: float | None = None
        self._saving = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- life

    @classmethod
    def start(cls, runtime: Runtime, timeout_s: float, describe: Describe) -> PeerWatch:
        """Join the heartbeat (a no-op watch for a single process, or without MASTER_ADDR/PORT)."""
        address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not runtime.distributed or not address or not port:
            return cls(None, runtime, timeout_s, describe)
        client = dist.TCPStore(
            address,
            int(port),
            is_master=False,
            timeout=timedelta(seconds=STORE_TIMEOUT_S),
            wait_for_workers=False,
        )
        store = dist.PrefixStore(f"cocoshard/peers/{attempt()}/", client)  # a restart beats afresh
        watch = cls(store, runtime, timeout_s, describe, store_host=f"{address}:{port}")
        watch._join(timeout_s)
        return watch

    def _join(self, timeout_s: float) -> None:
        assert self.store is not None
        self.store.set(_key(self.rank), _encode(0, RUNNING, this_process()))
        try:
            self.store.wait([_key(rank) for rank in range(self.world)], timedelta(seconds=timeout_s))
        except dist.DistError:
            missing = [rank for rank in range(self.world) if not self.store.check([_key(rank)])]
            self.lost = True
            raise PeerLost(
                f"rank(s) {', '.join(map(str, missing))} of {self.world} never joined the run's heartbeat "
                f"within --dist-timeout {timeout_s:g} s. {_one_line(self.describe())}"
            ) from None
        self._thread = threading.Thread(target=self._watch, name="cocoshard-peer-watch", daemon=True)
        self._thread.start()

    def say_stopped(self, why: str) -> None:
        """Tell the other ranks at once that this one stops, and why (they stop too, naming it)."""
        self._publish(f"{STOPPED}: {why}"[:300])

    def close(self, state: str = DONE) -> None:
        """Leave the heartbeat saying how this rank ended: `done`, or `stopped: why` (the others then
        stop too, naming this rank and the reason)."""
        if self.store is None:
            return
        with self._lock:  # from here the watch thread gives no verdict of its own
            self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=STORE_TIMEOUT_S + 1)
        if not self.lost:  # else the others already read why this rank stopped
            self._publish(state[:300])
        self.store = None

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """A checkpoint being written: a verdict waits for it to be complete."""
        with self._lock:
            self._saving += 1
        try:
            yield
        finally:
            with self._lock:
                self._saving -= 1

    # ---- verdicts

    def explain(self) -> str | None:
        """After a collective failed on this rank: the peer that was lost, if one was (waits a few
        heartbeats to see who went silent), else None (the failure is this rank's own)."""
        if self.store is None:
            return None
        deadline = time.monotonic() + QUICK_SILENCE_S + 2 * BEAT_S
        while time.monotonic() < deadline:
            verdict = self._verdict(QUICK_SILENCE_S)
            if verdict is not None:
                with self._lock:
                    if self.lost:
                        return None  # the watch thread is already ending the process
                    self.lost = True
                    self._stop.set()
                self._publish(f"{STOPPED}: it lost {verdict}")
                return f"lost {verdict}. {_one_line(self.describe())}"
            time.sleep(BEAT_S / 4)
        return None

    def _verdict(self, silence: float) -> str | None:
        """Which peer is lost, in words (a peer that said it stopped; the store, when it is what stopped
        answering; peers silent for `silence` seconds), or None."""
        now = time.monotonic()
        with self._lock:
            peers = dict(self._peers)
            failing = self._store_failing
        for rank, peer in peers.items():
            if peer.state.startswith(STOPPED):
                reason = peer.state.removeprefix(STOPPED).lstrip(": ")
                return f"rank {rank} of {self.world} ({peer.who}): it stopped ({reason})"
        if failing is not None:  # what the others do cannot be read: the store is what was lost
            if now - failing < silence:
                return None
            agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            holder = (
                "the node of torchrun's rendezvous" if agent else f"rank 0 of {self.world} ({peers[0].who})"
            )
            return (
                f"{holder}: the rendezvous store it holds at {self.store_host} stopped answering "
                f"{now - failing:.0f} s ago (killed, frozen, or its node cut off)"
            )
        silent = [
            f"rank {rank} of {self.world} ({peer.who or 'never seen'})"
            for rank, peer in peers.items()
            if peer.state == RUNNING and now - peer.changed >= silence
        ]
        if silent:
            return (
                f"{', '.join(silent)}: it stopped answering, no heartbeat for {silence:.0f} s (killed, "
                f"frozen, or its node cut off)"
            )
        return None

    # ---- the heartbeat thread

    def _watch(self) -> None:
        others = [rank for rank in range(self.world) if rank != self.rank]
        while not self._stop.wait(BEAT_S):
            self._beat(others)
            verdict = self._verdict(self.lost_after)
            if verdict is not None and not self._stop.is_set():
                self._end(verdict)
                return

    def _beat(self, others: list[int]) -> None:
        store, now = self.store, time.monotonic()
        if store is None:
            return
        if now - self._last_beat > 3 * BEAT_S:  # this process was frozen itself: judge nobody by that gap
            with self._lock:
                self._peers = {
                    rank: dataclasses.replace(peer, changed=now) for rank, peer in self._peers.items()
                }
        self._last_beat = now
        if self._store_failing is not None and now - self._last_try < STORE_RETRY_S:
            return  # a lost store is asked again only now and then (each failure logs a warning)
        self._last_try = now
        try:
            self._count += 1
            store.set(_key(self.rank), _encode(self._count, self._state, this_process()))
            values = store.multi_get([_key(rank) for rank in others])
        except dist.DistError:
            with self._lock:
                self._store_failing = self._store_failing or now
            return
        now = time.monotonic()
        with self._lock:
            self._store_failing = None
            for rank, raw in zip(others, values, strict=True):
                count, who, state = _decode(raw)
                peer = self._peers[rank]
                changed = now if count != peer.count else peer.changed
                self._peers[rank] = Peer(count, state, who, changed)

    def _end(self, verdict: str) -> None:
        """A peer is lost: say so in one line and end this process (the main thread may be blocked
        in a collective that would wait out the whole timeout)."""
        with self._lock:
            if self.lost or self._stop.is_set():  # the main thread is stopping this rank already
                return
            self.lost = True
        self._publish(f"{STOPPED}: it lost {verdict}")
        deadline = time.monotonic() + self.lost_after
        while self._saving and time.monotonic() < deadline:  # a checkpoint being written is completed
            time.sleep(0.05)
        _say([f"error: lost {verdict}. {_one_line(self.describe())}"])
        os._exit(EXIT_LOST)

    def _publish(self, state: str) -> None:
        """Tell the others how this rank stands (best effort: the store may be the thing lost)."""
        self._state = state
        store = self.store
        if store is None or self._store_failing is not None:  # nobody could read it there
            return
        with contextlib.suppress(dist.DistError):
            store.set(_key(self.rank), _encode(self._count + 1, state, this_process()))


def _key(rank: int) -> str:
    return f"rank{rank}"


def _one_line(lines: list[str]) -> str:
    return " ".join(line.strip() for line in lines)
