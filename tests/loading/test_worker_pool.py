"""Loader worker processes: they never outlive the training process, and shared memory too small
for their slots is refused before any of them starts, saying what to do."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cocoshard.loading import worker_pool
from cocoshard.loading.loader import build_loader
from cocoshard.loading.spec import LoaderSpec
from cocoshard.loading.worker_pool import SharedMemoryTooSmall

TRAINER = textwrap.dedent(
    """
    import sys, time
    from cocoshard.loading.loader import build_loader
    from cocoshard.loading.spec import LoaderSpec
    loader = build_loader(sys.argv[1], "train", LoaderSpec(batch_size=8, device="cpu", train=True, workers=2))
    batches = iter(loader)
    next(batches)  # the workers are running, and hold filled slots
    print(*loader.producer.pids(), flush=True)
    time.sleep(300)
    """
)


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its reaper is not running)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.slow
def test_workers_exit_when_the_training_process_is_killed(sample_shards_raw: Path, tmp_path: Path) -> None:
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    trainer = subprocess.Popen(
        [sys.executable, str(script), str(sample_shards_raw)], stdout=subprocess.PIPE, text=True
    )
    try:
        pids = [int(pid) for pid in trainer.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(pid) for pid in pids)
        trainer.send_signal(signal.SIGKILL)  # no cleanup runs in the trainer: only the workers decide
        trainer.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in pids if _alive(pid)]
    finally:
        trainer.kill()
        trainer.stdout.close()
        for pid in pids if "pids" in locals() else []:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_shared_memory_too_small_for_the_slots_is_refused_before_workers_start(
    sample_shards_raw: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_pool, "shared_memory_available", lambda: 64 * 2**20)  # Docker's default
    spec = LoaderSpec(batch_size=128, device="cpu", train=False, workers=2)  # 224 px canvases: 19 MB a slot
    loader = build_loader(sample_shards_raw, "val", spec)
    started = []
    monkeypatch.setattr(worker_pool.mp, "get_context", lambda *a: started.append(a) or None)
    with pytest.raises(SharedMemoryTooSmall) as refused:
        next(iter(loader))
    message = str(refused.value)
    assert re.search(r"2 worker processes need 1\d\d\.\d MiB of shared memory", message), message
    assert "/dev/shm has 64.0 MiB free" in message
    assert "--shm-size" in message and "fewer --workers" in message and "--workers 0" in message
    assert not started  # refused before anything was forked
    monkeypatch.undo()
    with build_loader(
        sample_shards_raw, "val", LoaderSpec(batch_size=128, device="cpu", train=False)
    ) as loader:
        assert len(list(loader)) == len(loader)  # --workers 0 needs no shared memory


@pytest.mark.parametrize("pollable", [True, False], ids=["poll", "connection-wait"])
@pytest.mark.parametrize("how", ["killed", "killed-with-a-message-unread"])
def test_a_worker_killed_mid_epoch_is_named_at_once_with_either_wait(
    sample_shards_raw: Path, monkeypatch: pytest.MonkeyPatch, pollable: bool, how: str
) -> None:
    """The training process waits on each worker's pipe and sentinel with one poll object a worker,
    or (where there is no poll: Windows) with multiprocessing.connection.wait; both deliver every
    batch of an epoch, and both name a killed worker at once (not after the liveness poll's
    timeout), also when it died with a message of the training process unread, which resets the
    pipe (a bare ConnectionResetError before)."""
    monkeypatch.setattr(worker_pool, "POLLABLE", pollable)
    monkeypatch.setattr(worker_pool, "POLL_S", 30.0)  # a death seen only by the liveness check: too late
    spec = LoaderSpec(batch_size=8, device="cpu", train=True, workers=2)
    with build_loader(sample_shards_raw, "train", spec) as loader:
        assert sum(len(batch.keys) for batch in loader) == loader.num_samples
        assert bool(loader.producer._pollers) == pollable
        # more batches than a worker can fill ahead: the killed one cannot have finished its epoch
        assert len(loader) > 2 * (spec.prefetch + 2)
        batches = iter(loader)
        next(batches)
        victim = loader.producer.pids()[1]
        if how == "killed-with-a-message-unread":
            os.kill(victim, signal.SIGSTOP)
            loader.producer._conns[1].send(("free", 0))  # lies unread in the stopped worker's end
        os.kill(victim, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(worker_pool.WorkerDied, match=rf"worker 1 \(pid {victim}\) died during an epoch"):
            for _ in batches:
                pass
        assert time.monotonic() - started < 10
