"""A loader as two stages: a host producer fills slots, the device stage makes `Batch`es of them.

    source  (what a worker does: shard_source.ShardBatchSource, resident.ResidentBatchSource, ...)
      -> producer (worker_pool.WorkerPool with N processes, or worker_pool.InProcess)
      -> ToDevice (to_device.py: lend, or pin + copy + release; decode; transform)   -> Batch

`Pipeline` is the stream loader, the host-resident loader and the resident-bytes loader alike;
they differ only by their source (`stream.py`, `resident.py`, `resident_bytes.py`). It takes the
batches in the source's fixed order (round-robin over the workers: for evaluation that is the
manifest's order), gives each slot back once nothing holds it, and on CUDA runs the device stage
one batch ahead (`to_device.DeviceAhead`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from cocoshard.loading.batch import BYTES, Batch, HostBatch, SlotKey
from cocoshard.loading.buffers import Loans, SlotShapes
from cocoshard.loading.device_decode import Where
from cocoshard.loading.spec import LoaderSpec
from cocoshard.loading.to_device import DeviceAhead, ToDevice
from cocoshard.loading.worker_pool import InProcess, Producer, WorkerPool
from cocoshard.loading.worker_side import Acquire, Filled
from cocoshard.prepare.manifest import Manifest
from cocoshard.pure.plan import rank_batches


class PlannedSource(Protocol):
    """A source that knows its epoch's delivery order and its slots' tensors."""

    def order(self, epoch: int) -> list[int]:
        """The producer (worker) of each batch of `epoch`, in the order they are delivered."""
        ...

    def slot_shapes(self) -> SlotShapes: ...

    def batches(self, epoch: int, worker: int, acquire: Acquire, start: int) -> Iterator[Filled]: ...


class Pipeline:
    """Exact epochs of device batches: a producer over `source`, then the device stage."""

    def __init__(
        self,
        manifest: Manifest,
        spec: LoaderSpec,
        source: PlannedSource,
        *,
        split_samples: int,
        workers: int,
        name: str,
        canvas_size: int,
        resident_bytes: torch.Tensor | None = None,
        where: Where | None = None,
        skipped_on_load: int = 0,
    ) -> None:
        self.manifest, self.spec, self.source = manifest, spec, source
        self.canvas_size, self.split_samples = canvas_size, split_samples
        _, sizes = rank_batches(
            split_samples,
            batch_size=spec.batch_size,
            rank=spec.rank,
            world_size=spec.world_size,
            train=spec.train,
        )
        self._batches, self.num_samples = len(sizes), sum(sizes)
        self.epoch, self.start = 0, 0
        self._loans: Loans[SlotKey] = Loans()
        self.to_device = ToDevice(
            spec,
            self._loans,
            self._give_back,
            canvas_size=canvas_size,
            resident_bytes=resident_bytes,
            where=where,
        )
        pinned = self.to_device.pinned
        on_new_slot = pinned.register if pinned is not None else None
        shapes = source.slot_shapes()
        self.producer: Producer = (
            WorkerPool(source, workers, shapes, spec.prefetch + 1, on_new_slot=on_new_slot, name=name)
            if workers > 0
            else InProcess(source, shapes, self._loans, on_new_slot=on_new_slot)
        )
        self._skipped_on_load, self._skipped = skipped_on_load, 0
        self._ahead: DeviceAhead | None = None  # the device stage's thread of the epoch under way

    def __len__(self) -> int:
        return self._batches

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Choose the epoch the next iteration yields, from its batch `start` on."""
        if not 0 <= start <= self._batches:
            raise ValueError(f"an epoch has {self._batches} batches: cannot start at batch {start}")
        self.epoch, self.start = epoch, start

    @property
    def skipped_samples(self) -> int:
        """Bad samples skipped: when the split was loaded, and in the latest pass over it."""
        return self._skipped_on_load + self._skipped

    def _give_back(self, slot: SlotKey) -> None:
        self.producer.give_back(*slot)

    def _give_back_returned(self) -> None:
        """Slots of earlier batches that nobody holds any more go back to their producers."""
        for slot in self._loans.returned():
            self._give_back(slot)

    def __iter__(self) -> Iterator[Batch]:
        epoch, start = self.epoch, self.start
        self.start = 0  # a resumed epoch starts mid-way once; the next one from its beginning
        order = self.source.order(epoch)
        starts = [order[:start].count(worker) for worker in range(self.producer.count)]
        self._stop_ahead()
        self._skipped = 0
        self._give_back_returned()
        self.producer.begin(epoch, starts)  # in this thread: workers are forked from it
        batches = self._deliver(epoch, order[start:])
        if self.spec.device.type == "cuda":
            self._ahead = DeviceAhead(lambda: next(batches, None), self.spec.device)
            batches = iter(self._ahead)
        count = 0
        try:
            for batch in batches:
                count += 1
                yield batch
        except Exception:  # (a caller that stops early is not an error: the next epoch cancels this one)
            self.close()
            raise
        finally:
            self._stop_ahead()
        if self.spec.train and start + count != self._batches:
            raise RuntimeError(
                f"the loader yielded {start + count} batches, not {self._batches}: epoch plan broken"
            )

    def _deliver(self, epoch: int, order: list[int]) -> Iterator[Batch]:
        for worker in order:
            self._give_back_returned()
            filled = self.producer.receive(worker)
            if filled is None:
                raise RuntimeError(f"worker {worker} ended its epoch early: the epoch plan is broken")
            self._skipped += filled.skipped
            if filled.size == 0 and not self.spec.train:  # an evaluation batch emptied by bad samples:
                self.producer.give_back(worker, filled.slot)  # only its skipped count mattered
                continue
            batch = self.to_device(self._host_batch(worker, filled), epoch)
            self._skipped += batch.skipped - filled.skipped
            yield batch
        for worker in range(self.producer.count):
            if self.producer.receive(worker, more=False) is not None:
                raise RuntimeError(
                    f"worker {worker} sent more batches than planned: the epoch plan is broken"
                )

    def host_batches(self, epoch: int) -> Iterator[HostBatch]:
        """The host side alone: the epoch's filled slots before they cross, each given back to its
        producer when the next is asked for (as if its copy were done). What a few CPU cores can
        deliver to a GPU, measured without one (`bench/test_host_side.py`)."""
        self._stop_ahead()
        self._give_back_returned()
        self.producer.begin(epoch, [0] * self.producer.count)
        for worker in self.source.order(epoch):
            filled = self.producer.receive(worker)
            if filled is None:
                raise RuntimeError(f"worker {worker} ended its epoch early: the epoch plan is broken")
            yield self._host_batch(worker, filled)
            self.producer.give_back(worker, filled.slot)
        for worker in range(self.producer.count):
            self.producer.receive(worker, more=False)

    def _host_batch(self, worker: int, filled: Filled) -> HostBatch:
        slot = self.producer.slots[worker][filled.slot]
        n = filled.size
        views = {
            name: tensor if name == BYTES or len(tensor) == n else tensor[:n]  # (a full slot: as it is)
            for name, tensor in slot.items()
        }
        return HostBatch(
            views, filled.keys, filled.skipped, (worker, filled.slot), filled.number, filled.spill
        )

    def _stop_ahead(self) -> None:
        if self._ahead is not None:
            self._ahead.stop()
            self._ahead = None

    def close(self) -> None:
        """Stop the worker processes now (the next epoch starts new ones); what callers hold stays valid."""
        self._stop_ahead()
        self.producer.close()
        self._loans.wait()
        self._loans.forget()
        if self.to_device.pinned is not None:
            self.to_device.pinned.release()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
