"""Batches made by worker processes (or in this process) and handed to the device, in a fixed order.

The main-process side shared by the stream loader and, on a CPU, the resident loader. A `source`
(`BatchSource`: what a worker does) fills slots; `PooledBatches` takes them in a fixed order
(round-robin over the workers: for evaluation that is the manifest's order) and delivers each:

- on a CPU: aliases of the slot, lent through `Loans`; the slot goes back to its worker once every
  tensor made from them is gone. The slot already holds the training-ready batch when the
  source was given a transform.
- on CUDA: the slot (page-locked in place with `cudaHostRegister`) is copied to the device without
  blocking and goes back to its worker when the copy has finished; the transform runs on the
  device.

With `workers=0` the source runs in this process, in slots recycled the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from cocoshard.loading.batch import Batch
from cocoshard.loading.buffers import Loans
from cocoshard.loading.device_decode import decode_on_device
from cocoshard.loading.workers import (
    BatchSource,
    Ready,
    Slot,
    SlotShapes,
    WorkerPool,
    make_slot,
)
from cocoshard.machine import usable_cores
from cocoshard.seeds import Stream, torch_generator

Transform = Any  # cocoshard.loading.augment.TrainTransform or EvalTransform


class _InProcess:
    """`workers=0`: the source's batches made in this process, in slots recycled through `Loans`."""

    def __init__(self, source: BatchSource, shapes: SlotShapes, loans: Loans) -> None:
        self.source, self.shapes, self.loans = source, shapes, loans
        self.slots: list[list[Slot]] = [[]]
        self._free: list[int] = []
        self._batches: Iterator[tuple] | None = None

    def _acquire(self) -> tuple[int, Slot]:
        self._free += [slot for _, slot in self.loans.returned()]
        if not self._free:
            self.slots[0].append(make_slot(self.shapes, shared=False))
            self._free.append(len(self.slots[0]) - 1)
        slot = self._free.pop(0)
        return slot, self.slots[0][slot]

    def begin(self, epoch: int) -> None:
        self._batches = self.source.batches(epoch, 0, self._acquire)

    def receive(self, worker: int) -> Ready | None:
        found = next(self._batches, None) if self._batches is not None else None
        return None if found is None else Ready(*found)

    def give_back(self, worker: int, slot: int) -> None:
        self._free.append(slot)

    def close(self) -> None:
        self.slots, self._free, self._batches = [[]], [], None


class PooledBatches:
    """The main-process side of a pooled loader (see the module doc)."""

    def __init__(
        self,
        source: BatchSource,
        shapes: SlotShapes,
        *,
        workers: int,
        device: torch.device,
        prefetch: int,
        seed: int,
        rank: int,
        device_transform: Transform | None,
        output_transform: Transform | None,
        name: str,
        canvas_size: int = 0,
        skip_bad_samples: bool = False,
        threads: int | None = None,
        where: Callable[[str], str] | None = None,
    ) -> None:
        self.device, self.workers, self.seed, self.rank = device, workers, seed, rank
        self.canvas_size, self.skip_bad_samples, self.threads = canvas_size, skip_bad_samples, threads
        self.where = where  # a key -> its shard, named when a compressed image fails to decode here
        self.device_transform = device_transform  # applied here, on the device, after the copy
        self.output_transform = output_transform  # what the caller asked for (its memory format)
        self.skipped = 0
        self._loans = Loans()
        self._pinned = device.type == "cuda"
        if workers > 0:
            self._producer: Any = WorkerPool(
                source,
                workers,
                shapes,
                prefetch + 1,
                name=name,
                on_new_slot=self._register if device.type == "cuda" else None,
            )
        else:
            self._producer = _InProcess(source, shapes, self._loans)

    def batches(self, epoch: int, order: list[int], train: bool) -> Iterator[Batch]:
        """The epoch's batches, taking batch i from worker `order[i]`; raises what a worker met."""
        self.skipped = 0
        self._give_back_returned()
        self._producer.begin(epoch)
        generator = None
        if self.device_transform is not None and self.device_transform.random:
            generator = torch_generator(self.seed, epoch, self.rank, Stream.AUGMENT, device=self.device)
        try:
            for worker in order:
                self._give_back_returned()
                ready = self._producer.receive(worker)
                if ready is None:
                    raise RuntimeError(f"worker {worker} ended its epoch early: the epoch plan is broken")
                self.skipped += ready.skipped
                if ready.size == 0 and not train:  # an evaluation batch emptied by bad samples:
                    self._producer.give_back(worker, ready.slot)  # only its skipped count mattered
                    continue
                yield self._deliver(worker, ready, generator)
            for worker in range(max(self.workers, 1)):
                if self._producer.receive(worker) is not None:
                    raise RuntimeError(
                        f"worker {worker} sent more batches than planned: the epoch plan is broken"
                    )
        except Exception:  # (a caller that stops early is not an error: the next epoch cancels this one)
            self.close()
            raise

    def _give_back_returned(self) -> None:
        """Slots of earlier batches that nobody holds any more go back to their workers."""
        for worker, slot in self._loans.returned():
            self._producer.give_back(worker, slot)

    def _decode(self, worker: int, ready: Ready, generator: torch.Generator | None) -> Batch:
        """A slot of compressed images (`--decode device`): decoded where the batch goes, then made ready."""
        slot, n, key = self._producer.slots[worker][ready.slot], ready.size, (worker, ready.slot)
        spans, kinds = slot["spans"][:n].tolist(), slot["kinds"][:n].tolist()
        extra = ready.extra or {}
        encoded = [
            torch.frombuffer(bytearray(extra[i]), dtype=torch.uint8)
            if start < 0
            else slot["bytes"][start : start + length]
            for i, (start, length) in enumerate(spans)
        ]
        images, sizes, good = decode_on_device(
            encoded,
            kinds,
            ready.keys,
            canvas_size=self.canvas_size,
            device=self.device,
            skip_bad=self.skip_bad_samples,
            where=self.where,
        )
        labels = None
        if "labels" in slot:
            labels = slot["labels"][:n][good]
            if self.device.type == "cuda":
                labels = labels.pin_memory()  # so that its copy does not wait
            labels = labels.to(self.device, non_blocking=True).float()
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            self._loans.lend_until(key, event)  # the decoder may read the slot until its work is done
        else:
            self._producer.give_back(worker, ready.slot)  # decoded into new memory: the slot is free
        keys = [ready.keys[i] for i in good]
        self.skipped += n - len(good)
        inputs = None
        if self.device_transform is not None:
            inputs = self.device_transform.apply(
                images, sizes, generator=generator, threads=self.threads or usable_cores()
            )
        return Batch(
            images, sizes, labels, keys, inputs=inputs, skipped=ready.skipped + n - len(good), slot=key
        )

    def _deliver(self, worker: int, ready: Ready, generator: torch.Generator | None) -> Batch:
        """The batch as the caller gets it: aliases of its slot (CPU), or its copy on the device."""
        slot, n, key = self._producer.slots[worker][ready.slot], ready.size, (worker, ready.slot)
        if "bytes" in slot:
            return self._decode(worker, ready, generator)
        names = [name for name in ("inputs", "images", "sizes", "labels") if name in slot]
        views = [slot[name][:n] for name in names]
        if self.device.type == "cpu":
            parts = dict(zip(names, self._loans.lend(key, views), strict=True))
        else:
            parts = {
                name: view.to(self.device, non_blocking=self._pinned)
                for name, view in zip(names, views, strict=True)
            }
            event = torch.cuda.Event()
            event.record()
            self._loans.lend_until(key, event)
        labels = parts.get("labels")
        labels = None if labels is None else labels.float()
        inputs = parts["inputs"].permute(0, 3, 1, 2) if "inputs" in parts else None
        if self.device_transform is not None:
            inputs = self.device_transform.apply(parts["images"], parts["sizes"], generator=generator)
        elif inputs is not None and not self.output_transform.channels_last:
            inputs = inputs.contiguous()
        return Batch(
            parts.get("images"),
            parts.get("sizes"),
            labels,
            ready.keys,
            inputs=inputs,
            skipped=ready.skipped,
            slot=key,
        )

    def _register(self, slot: Slot) -> None:
        """Page-lock a new slot's memory in place, so its copy to the GPU overlaps compute."""
        for tensor in slot.values():
            code = torch.cuda.cudart().cudaHostRegister(
                tensor.data_ptr(), tensor.numel() * tensor.element_size(), 0
            )
            if int(code) != 0:
                self._pinned = False
                warnings.warn(
                    f"cannot page-lock a loader slot (cudaHostRegister error {int(code)}); "
                    "copies to the GPU will not overlap compute",
                    stacklevel=2,
                )
                return

    def close(self) -> None:
        """Stop the worker processes now (the next epoch starts new ones); what callers hold stays valid."""
        self._producer.close()
        self._loans.forget()
