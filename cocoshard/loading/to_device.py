"""Where a batch crosses from the host to the device: `ToDevice`, the one stage that does it.

    to_device = ToDevice(spec, loans, give_back, canvas_size=224)
    batch = to_device(host_batch, epoch)          # HostBatch (lent host slot) -> Batch (device)

A host source (worker processes or this process, `cocoshard.loading.worker_pool`) fills a slot;
this stage makes the `Batch` the trainer takes, on `spec.device`:

- on a CPU the slot is lent as it is (`buffers.Loans`: aliases, and the slot goes back to its
  producer once no tensor made from them is alive). Its `inputs` were made training-ready on the
  host, where the batch was made (`LoaderSpec.augment_on_host`), so nothing more is done here.
- on CUDA the slot (page-locked in place once, `PinnedSlots`) is copied without blocking and goes
  back when the copy has finished (a CUDA event); the transform then runs on the device, with its
  crop boxes and flips drawn there.
- compressed bytes (`--decode device`) are decoded here, in one batched call
  (`device_decode.decode_on_device`; nvJPEG on CUDA). A training batch that loses bad images
  keeps its size by repeating good ones of the same batch (as host decoding refills its batches).

On CUDA `DeviceAhead` runs this stage one batch ahead, in a thread of its own and on a side
stream: the host work of the next batch (its wait for a worker, its copy, its decode, whose safe
form synchronises with the host) overlaps the current step, and the step's stream only waits for
the batch's event, never the host.
"""

from __future__ import annotations

import queue
import threading
import warnings
from collections.abc import Callable, Iterator

import torch

from cocoshard.loading.augment import Transform
from cocoshard.loading.batch import (
    BYTES,
    IMAGES,
    INPUTS,
    KINDS,
    LABELS,
    SIZES,
    SPANS,
    Batch,
    HostBatch,
    SlotKey,
)
from cocoshard.loading.buffers import Loans, Slot
from cocoshard.loading.device_decode import Where, decode_on_device
from cocoshard.loading.spec import LoaderSpec
from cocoshard.loading.tario import BadShard
from cocoshard.seeds import Stream, torch_generator


class PinnedSlots:
    """Host slots page-locked in place for fast asynchronous copies, and unlocked again.

    `cudaHostRegister` pins memory that is already allocated (shared memory of a worker's slot
    included); every registration is paired with a `cudaHostUnregister` in `release`, called
    when the loader closes, once the copies out of the slots have finished."""

    def __init__(self) -> None:
        self._registered: list[int] = []
        self.pinned = True  # False once the system refused: copies then block

    def register(self, slot: Slot) -> None:
        """Page-lock a new slot's memory."""
        for tensor in slot.values():
            code = torch.cuda.cudart().cudaHostRegister(
                tensor.data_ptr(), tensor.numel() * tensor.element_size(), 0
            )
            if int(code) != 0:
                self.pinned = False
                warnings.warn(
                    f"cannot page-lock a loader slot (cudaHostRegister error {int(code)}); "
                    "copies to the GPU will not overlap compute",
                    stacklevel=2,
                )
                return
            self._registered.append(tensor.data_ptr())

    def release(self) -> None:
        """Unlock every registered slot (the copies out of them must have finished)."""
        for pointer in self._registered:
            code = torch.cuda.cudart().cudaHostUnregister(pointer)
            if int(code) != 0:
                warnings.warn(
                    f"cannot unlock a loader slot (cudaHostUnregister error {int(code)})", stacklevel=2
                )
        self._registered = []


class ToDevice:
    """HostBatch -> Batch on `spec.device` (see the module doc)."""

    def __init__(
        self,
        spec: LoaderSpec,
        loans: Loans[SlotKey],
        give_back: Callable[[SlotKey], None],
        *,
        canvas_size: int,
        resident_bytes: torch.Tensor | None = None,
        where: Where | None = None,
    ) -> None:
        self.spec, self.loans, self.give_back = spec, loans, give_back
        self.device, self.canvas_size = spec.device, canvas_size
        # what runs here: the transform unless the host made the batch ready already
        self.transform: Transform | None = None if spec.augment_on_host else spec.transform
        self.resident_bytes = resident_bytes  # --loader resident --decode device: spans index into it
        self.where = where  # a key -> its shard, named when a compressed image fails to decode here
        self.pinned = PinnedSlots() if self.device.type == "cuda" else None

    def __call__(self, host: HostBatch, epoch: int) -> Batch:
        images: torch.Tensor | None
        sizes: torch.Tensor | None
        labels: torch.Tensor | None
        if SPANS in host.tensors:
            images, sizes, labels, keys, lost = self._decode(host)
        else:
            parts = self._cross(host)
            images, sizes, labels, keys, lost = (
                parts.get(IMAGES),
                parts.get(SIZES),
                parts.get(LABELS),
                host.keys,
                0,
            )
            if INPUTS in parts:
                ready = parts[INPUTS].permute(0, 3, 1, 2)  # NHWC rows: a channels_last view
                if self.spec.transform is not None and not self.spec.transform.channels_last:
                    ready = ready.contiguous()
                return Batch(None, None, _float(labels), keys, inputs=ready, skipped=host.skipped)
        inputs: torch.Tensor | None = None
        if self.transform is not None and images is not None and sizes is not None:
            generator = None
            if self.transform.random:
                spec = self.spec
                generator = torch_generator(
                    spec.seed, epoch, spec.rank, host.number, Stream.AUGMENT, device=self.device
                )
            inputs = self.transform.apply(images, sizes, generator=generator, threads=self.spec.threads)
        return Batch(images, sizes, _float(labels), keys, inputs=inputs, skipped=host.skipped + lost)

    def _cross(self, host: HostBatch) -> dict[str, torch.Tensor]:
        """The slot's tensors on the device: lent aliases on a CPU, asynchronous copies on CUDA."""
        names = list(host.tensors)
        if self.device.type == "cpu":
            return dict(zip(names, self.loans.lend(host.slot, list(host.tensors.values())), strict=True))
        blocking = self.pinned is None or not self.pinned.pinned
        parts = {
            name: tensor.to(self.device, non_blocking=not blocking) for name, tensor in host.tensors.items()
        }
        self._release_after_copies(host.slot)
        return parts

    def _release_after_copies(self, slot: SlotKey) -> None:
        event = torch.cuda.Event()
        event.record()
        self.loans.lend_until(slot, event)  # the slot goes back when its copies (or decode) are done

    def _decode(
        self, host: HostBatch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[str], int]:
        """Compressed images decoded here: (canvases, sizes, labels, keys, images lost to bad data)."""
        n, tensors, spill = len(host), host.tensors, host.spill or {}
        encoded_all = tensors[BYTES] if BYTES in tensors else self.resident_bytes
        assert encoded_all is not None
        spans, kinds = tensors[SPANS][:n].tolist(), tensors[KINDS][:n].tolist()
        encoded = [
            torch.frombuffer(bytearray(spill[i]), dtype=torch.uint8)
            if start < 0
            else encoded_all[start : start + length]
            for i, (start, length) in enumerate(spans)
        ]
        images, sizes, good = decode_on_device(
            encoded,
            kinds,
            host.keys,
            canvas_size=self.canvas_size,
            device=self.device,
            skip_bad=self.spec.skip_bad_samples,
            where=self.where,
        )
        rows = list(good)
        if self.spec.train and len(good) < n:  # keep the batch full: repeat good images of it
            if not good:
                raise BadShard(
                    f"no image of a training batch could be decoded ({n} bad: {', '.join(host.keys[:3])}...)"
                )
            rows = [good[i % len(good)] for i in range(n)]
            index = torch.tensor([i % len(good) for i in range(n)], device=images.device)
            images, sizes = images.index_select(0, index), sizes.index_select(0, index)
        labels = None
        if LABELS in tensors:
            picked = tensors[LABELS][:n][rows]
            if self.device.type == "cuda":
                picked = picked.pin_memory()  # so that its copy does not wait
            labels = picked.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            self._release_after_copies(host.slot)  # the decoder may read the slot until its work is done
        else:
            self.give_back(host.slot)  # decoded into new memory: the slot is free now
        return images, sizes, labels, [host.keys[i] for i in rows], n - len(good)


def _float(labels: torch.Tensor | None) -> torch.Tensor | None:
    return None if labels is None else labels.float()


# ----------------------------------------------------------------------------- one batch ahead


_END = object()


class DeviceAhead:
    """Make each next batch in a thread of its own, on a side CUDA stream, one batch ahead.

    `make` is called in that thread and returns the next Batch or None at the end; an error it
    raises is raised to the consumer at that batch. The consumer's stream waits for the batch's
    event (no host synchronisation) and the batch's tensors are recorded as used on it, so that
    the caching allocator never hands their memory out while the step still reads it."""

    def __init__(self, make: Callable[[], Batch | None], device: torch.device) -> None:
        self.make, self.device = make, device
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cocoshard-device-ahead", daemon=True)

    def _run(self) -> None:
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        try:
            while not self._stop.is_set():
                if stream is not None:
                    with torch.cuda.stream(stream):
                        batch = self.make()
                        event = torch.cuda.Event()
                        event.record(stream)
                else:
                    batch, event = self.make(), None
                self._put(_END if batch is None else (batch, event))
                if batch is None:
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc)

    def _put(self, item: object) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[Batch]:
        self._thread.start()
        try:
            while True:
                item = self._queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                batch, event = item
                if event is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    for tensor in (batch.images, batch.sizes, batch.labels, batch.inputs):
                        if tensor is not None and tensor.device.type == "cuda":
                            tensor.record_stream(current)
                yield batch
        finally:
            self.stop()

    def stop(self) -> None:
        """End the thread (what it made but nobody took is dropped)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
