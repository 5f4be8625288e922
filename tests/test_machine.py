"""The machine and the thread plan: a command's workers and CPU threads, decided in one place."""

from __future__ import annotations

import pytest

from cocoshard import machine


@pytest.fixture
def four_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machine, "usable_cores", lambda: 4)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def test_training_on_a_cpu_keeps_every_core_for_the_step(four_cores, monkeypatch) -> None:
    monkeypatch.setattr(machine, "busy_cores", lambda: 1.2)
    plan = machine.thread_plan("train", device_type="cpu", workers=None, threads=None)
    assert (plan.workers, plan.compute, plan.loader) == (0, 3, 3)  # a busy core left out
    assert "1.2 busy elsewhere" in plan.why


def test_a_gpu_stream_gives_every_core_a_worker_and_resident_none(four_cores) -> None:
    stream = machine.thread_plan("train", device_type="cuda", workers=None, threads=None, measure_busy=False)
    assert (stream.workers, stream.compute) == (4, 1)
    resident = machine.thread_plan(
        "train", device_type="cuda", workers=None, threads=None, loader_mode="resident", measure_busy=False
    )
    assert (resident.workers, resident.compute, resident.loader) == (0, 4, 4)


def test_what_is_given_wins_and_predict_decodes_with_every_core(four_cores) -> None:
    given = machine.thread_plan("train", device_type="cpu", workers=2, threads=3)
    assert (given.workers, given.compute, given.why) == (2, 3, "given")
    predict = machine.thread_plan(
        "predict", device_type="cpu", workers=None, threads=None, measure_busy=False
    )
    assert (predict.workers, predict.compute) == (4, 1)


def test_torchrun_processes_share_the_machine(four_cores, monkeypatch) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    plan = machine.thread_plan("train", device_type="cpu", workers=None, threads=None, measure_busy=False)
    assert (plan.cores, plan.compute) == (2, 2)
