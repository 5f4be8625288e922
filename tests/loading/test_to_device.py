"""The host | device boundary: a batch made one batch ahead in a thread of its own arrives in order,
raises what went wrong at the batch it happened, and stops cleanly when the consumer stops early.
(Its CUDA half, streams and events, is in the cuda tier: tests/cuda.)"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from cocoshard.loading.batch import Batch
from cocoshard.loading.to_device import DeviceAhead


def _maker(count: int, fail_at: int | None = None):
    made = []

    def make() -> Batch | None:
        if len(made) == count:
            return None
        if len(made) == fail_at:
            raise RuntimeError(f"batch {fail_at} is broken")
        made.append(len(made))
        return Batch(None, None, None, [str(made[-1])], inputs=torch.full((1, 3, 2, 2), float(made[-1])))

    return make, made


def test_batches_made_ahead_arrive_in_order() -> None:
    make, _ = _maker(5)
    batches = list(DeviceAhead(make, torch.device("cpu")))
    assert [b.keys for b in batches] == [["0"], ["1"], ["2"], ["3"], ["4"]]
    assert [int(b.inputs[0, 0, 0, 0]) for b in batches] == [0, 1, 2, 3, 4]


def test_an_error_is_raised_at_the_batch_it_happened() -> None:
    make, _ = _maker(5, fail_at=2)
    seen = []
    with pytest.raises(RuntimeError, match="batch 2 is broken"):
        for batch in DeviceAhead(make, torch.device("cpu")):
            seen.append(batch.keys[0])
    assert seen == ["0", "1"]


def test_a_consumer_that_stops_early_ends_the_thread_at_most_one_batch_later() -> None:
    make, made = _maker(1000)
    ahead = DeviceAhead(make, torch.device("cpu"))
    for batch in ahead:
        if batch.keys == ["3"]:
            break
    time.sleep(0.2)
    assert len(made) <= 6  # the batch taken, one queued, one being made
    assert not [t for t in threading.enumerate() if t.name == "cocoshard-device-ahead"]
