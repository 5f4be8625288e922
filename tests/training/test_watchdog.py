"""A run over several processes fails loudly and within its timeout: a killed or frozen peer is
named by every surviving rank in one line with the command that resumes (no backend traceback, no
hang), and SIGTERM is honoured at once even while a rank waits inside PyTorch.

The ranks are started as a scheduler's launcher (or one torchrun per node) starts them: each its
own process with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, gloo over loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from cocoshard.training.runtime import Runtime
from cocoshard.training.watchdog import RUNNING, STOPPED, PeerWatch, _encode
from conftest import REPO, Done

TIMEOUT = 20  # --dist-timeout: a silent peer is named after half of it
ARGS = (
    "--model", "cocoshard_tiny", "--weights", "none", "--device", "cpu", "--size", "32",
    "--batch-size", "8", "--workers", "0", "--threads", "1", "--no-amp", "--epochs", "50",
    "--log-every", "2", "--checkpoint-every", "0.0001", "--dist-timeout", str(TIMEOUT),
)  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_ranks(
    world: int, *args: object, port: int | None = None, only: list[int] | None = None
) -> list[subprocess.Popen]:
    """`cocoshard train ARGS` as ranks 0 .. world-1 of one job (or only some of them), each in its
    own process."""
    port = port or free_port()
    processes = []
    for rank in range(world) if only is None else only:
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "COLUMNS": "1000",
        }
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "cocoshard", "train", *map(str, args)],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return processes


def finish(process: subprocess.Popen, timeout: float) -> tuple[Done, float]:
    """(what the process said and its exit status, seconds it took to end); killed at `timeout`."""
    started = time.monotonic()
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"still running after {timeout} s: {' '.join(output.split())[-2000:]}") from None
    return Done(process.returncode, " ".join(output.split())), time.monotonic() - started


def wait_until_training(processes: list[subprocess.Popen], run: Path) -> None:
    """Until rank 0 wrote its first mid-epoch last.pt: every rank is inside the training loop."""
    deadline = time.monotonic() + 180
    while not (run / "last.pt").is_file():
        for process in processes:
            if process.poll() is not None:
                for other in processes:
                    other.kill()
                raise AssertionError(f"a rank ended early: {process.communicate()[0][-2000:]}")
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.05)


def assert_names_the_lost_rank(done: Done, run: Path, victim: subprocess.Popen) -> None:
    assert done.code == 2, done.text[-3000:]
    assert "Traceback" not in done.text, done.text[-3000:]
    assert f"error: lost rank 1 of 2 ({socket.gethostname()} pid {victim.pid})" in done.text, done.text[
        -2000:
    ]
    assert f"{run / 'last.pt'} holds epoch 0 of 50 and" in done.text  # a mid-epoch save: kept
    assert f"-m cocoshard train --out {run} --resume auto" in done.text


@pytest.mark.slow
def test_a_killed_peer_ends_the_other_rank_at_once_naming_it(
    sample_shards_jpeg: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    ranks = start_ranks(2, "--shards", sample_shards_jpeg, "--out", run, *ARGS)
    wait_until_training(ranks, run)
    ranks[1].send_signal(signal.SIGKILL)
    done, seconds = finish(ranks[0], timeout=TIMEOUT)
    ranks[1].wait()
    assert_names_the_lost_rank(done, run, ranks[1])
    assert "stopped answering" in done.text


@pytest.mark.slow
def test_a_frozen_peer_ends_the_other_rank_within_the_timeout_naming_it(
    sample_shards_jpeg: Path, tmp_path: Path
) -> None:
    """SIGSTOP: the peer's sockets stay open, so only the silence of its heartbeat can tell."""
    run = tmp_path / "run"
    ranks = start_ranks(2, "--shards", sample_shards_jpeg, "--out", run, *ARGS)
    wait_until_training(ranks, run)
    ranks[1].send_signal(signal.SIGSTOP)
    try:
        done, _ = finish(ranks[0], timeout=TIMEOUT)  # named after TIMEOUT / 2, within the timeout
    finally:
        ranks[1].send_signal(signal.SIGCONT)
    assert_names_the_lost_rank(done, run, ranks[1])
    assert f"no heartbeat for {TIMEOUT // 2} s" in done.text
    woken, _ = finish(ranks[1], timeout=TIMEOUT)  # and the frozen one, woken, does not train on alone
    assert woken.code == 2 and "error: lost rank 0 of 2" in woken.text, woken.text[-2000:]


@pytest.mark.slow
def test_sigterm_is_honoured_at_once_while_a_rank_waits_for_the_others(
    sample_shards_jpeg: Path, tmp_path: Path
) -> None:
    """Rank 0 of two waits in the rendezvous (inside PyTorch, where Python's own handler cannot
    run) for a rank 1 that never comes: SIGTERM ends it within seconds, not at the timeout."""
    run, port = tmp_path / "run", free_port()
    (rank0,) = start_ranks(2, "--shards", sample_shards_jpeg, "--out", run, *ARGS, port=port, only=[0])
    deadline = time.monotonic() + 120
    while True:  # the store rank 0 holds is listening: it waits for rank 1 now
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert rank0.poll() is None and time.monotonic() < deadline, "rank 0 never reached the rendezvous"
        time.sleep(0.1)
    time.sleep(1.0)
    rank0.send_signal(signal.SIGTERM)
    done, seconds = finish(rank0, timeout=TIMEOUT)
    assert done.code == 128 + signal.SIGTERM, done.text[-2000:]
    assert seconds < TIMEOUT / 2  # the rendezvous would have waited TIMEOUT
    assert "interrupted by SIGTERM" in done.text and "Traceback" not in done.text


def test_the_heartbeat_names_a_silent_peer_and_one_that_says_it_stopped() -> None:
    """PeerWatch's verdicts, on a store in this process: rank 1 is played by hand."""
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    store = dist.PrefixStore("test/", server)
    store.set("rank1", _encode(1, RUNNING, "elsewhere pid 7"))
    watch = PeerWatch(store, Runtime(torch.device("cpu"), rank=0, world_size=2), 4.0, lambda: ["kept"])
    watch._beat([1])  # (no thread: beats by hand)
    assert watch._verdict(silence=0.2) is None
    time.sleep(0.3)
    assert "rank 1 of 2 (elsewhere pid 7): it stopped answering" in (watch._verdict(silence=0.2) or "")
    store.set("rank1", _encode(2, f"{STOPPED}: error: shard train-000003.tar is damaged", "elsewhere pid 7"))
    watch._beat([1])
    assert watch._verdict(silence=60) == (
        "rank 1 of 2 (elsewhere pid 7): it stopped (error: shard train-000003.tar is damaged)"
    )
    assert watch.explain() is not None and watch.lost
    assert store.get("rank0").decode().split("\t")[2].startswith(f"{STOPPED}: it lost rank 1")
