"""Batch buffers, reused: lent to whoever takes a batch, and reused only once they are given back.

Two kinds of host buffer, each with one owner of its free list:
- *slots* (`Slot`: named tensors, one batch each) that a producer fills, worker process or this
  process: `SlotPool` is the producer's free list;
- scratch buffers kept by shape (`BufferPool`): the augmentation's output rows on a CPU.
`Loans` is the record of what is out, and of what says it is back:

- A buffer is *lent* as an alias: a tensor over the same memory with a storage of its own. A weak
  reference to that storage expires exactly when no tensor made from the alias is left (views,
  autograd's saved tensors and the caller's copies included), whatever else holds the buffer
  itself. Only then is the buffer *returned* and filled again.
- A buffer being copied to a GPU is not lent: it is returned when the copy has finished (a CUDA
  event), since the caller only ever sees the device copy.

What it buys, on which device: on a CPU, reusing a buffer instead of allocating a new one saves
its page faults (a fresh 19 MB batch cost 18 ms to fill, a reused one 4 ms, on a 2-core x86 CPU),
and for the stream loader the shared-memory slots it lends are the only copy of a batch between
the worker that filled it and the model. On CUDA, only the stream loader's page-locked slots go
through it (returned after their host-to-device copy); device memory is recycled by CUDA's
caching allocator, and the resident loader on the GPU needs no host buffer at all.

The device stage (`cocoshard.loading.to_device`) lends slots and returns them to their producer
(`cocoshard.loading.worker_pool`); `BufferPool` lends its own buffers.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

import torch
from torch.multiprocessing.reductions import StorageWeakRef

SlotShapes = dict[str, tuple[tuple[int, ...], torch.dtype]]  # tensor name -> (shape, dtype)
Slot = dict[str, torch.Tensor]


def make_slot(shapes: SlotShapes, shared: bool) -> Slot:
    """One slot's tensors, in shared memory when worker processes fill it."""
    slot = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in shapes.items()}
    return {name: tensor.share_memory_() for name, tensor in slot.items()} if shared else slot


def slot_bytes(shapes: SlotShapes) -> int:
    """The memory one slot of `shapes` takes."""
    return sum(
        torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        for shape, dtype in shapes.values()
    )


def alias(tensor: torch.Tensor) -> tuple[torch.Tensor, StorageWeakRef]:
    """(a tensor over `tensor`'s memory with a storage of its own, a weak reference to that storage).

    `tensor` must be a contiguous CPU tensor; the alias keeps its memory alive.
    """
    raw = tensor.reshape(-1).view(torch.uint8)  # through numpy as bytes: any dtype, bf16 included
    own = torch.from_numpy(raw.numpy()).view(tensor.dtype).view(tensor.shape)
    return own, StorageWeakRef(own.untyped_storage())


def released(reference: StorageWeakRef | None) -> bool:
    """True when no tensor made from the alias behind `reference` is left (or none was lent)."""
    return reference is None or reference.expired()


Hold = StorageWeakRef | torch.cuda.Event  # what says a lent buffer is back


Key = TypeVar("Key", bound=Hashable)


class Loans(Generic[Key]):
    """Which buffers are out, and what says they are back: alias references or device-copy events."""

    def __init__(self) -> None:
        self._out: dict[Key, list[Hold]] = {}
        self._lock = threading.Lock()

    def lend(self, key: Key, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Aliases of `tensors`, the buffer `key` out until every alias is gone."""
        lent: list[torch.Tensor] = []
        references: list[Hold] = []
        for tensor in tensors:
            own, reference = alias(tensor)
            lent.append(own)
            references.append(reference)
        with self._lock:
            self._out[key] = references
        return lent

    def lend_until(self, key: Key, event: torch.cuda.Event) -> None:
        """The buffer `key` is out until `event` (a CUDA event recorded after its copy) has completed."""
        with self._lock:
            self._out[key] = [event]

    def is_out(self, key: Key) -> bool:
        """True while buffer `key` is lent and not yet returned."""
        with self._lock:
            return key in self._out and not self._back(self._out[key])

    def returned(self) -> Iterator[Key]:
        """The keys of buffers given back since the last call (each once)."""
        with self._lock:
            back = [key for key, holds in self._out.items() if self._back(holds)]
            for key in back:
                del self._out[key]
        return iter(back)

    def wait(self) -> None:
        """Wait until every buffer out until a device copy is back (the copies have finished)."""
        with self._lock:
            holds = [hold for out in self._out.values() for hold in out]
        for hold in holds:
            if not isinstance(hold, StorageWeakRef):
                hold.synchronize()

    def forget(self) -> None:
        """Stop tracking every loan (the buffers are being dropped; what callers hold stays valid)."""
        with self._lock:
            self._out.clear()

    @staticmethod
    def _back(holds: list[Hold]) -> bool:
        return all(released(hold) if isinstance(hold, StorageWeakRef) else hold.query() for hold in holds)


class SlotPool:
    """A producer's slots and its free list: which it may fill now. Only the producer fills them;
    the slot numbers travel to whoever takes the batch and come back through `put_back`."""

    def __init__(self, slots: list[Slot] | None = None) -> None:
        self.slots: list[Slot] = list(slots or [])
        self._free: deque[int] = deque(range(len(self.slots)))

    def add(self, slot: Slot) -> None:
        """One more slot, free to fill."""
        self.slots.append(slot)
        self._free.append(len(self.slots) - 1)

    def put_back(self, number: int) -> None:
        """Slot `number` may be filled again."""
        self._free.append(number)

    def take(self) -> tuple[int, Slot] | None:
        """A free slot (its number and tensors), or None when every slot is out."""
        if not self._free:
            return None
        number = self._free.popleft()
        return number, self.slots[number]


class BufferPool:
    """Reusable CPU tensors by shape, dtype and pinning, lent through `Loans`.

    `take` lends an alias of a pooled buffer that has been given back, or of a new one (kept when
    the pool has room), so nothing waits and nothing held is overwritten.
    """

    def __init__(self, max_per_key: int = 4, max_keys: int = 8) -> None:
        self._buffers: dict[tuple, list[torch.Tensor]] = {}  # key -> buffers, most recently used key last
        self._loans: Loans[int] = Loans()
        self._max_per_key, self._max_keys = max_per_key, max_keys
        self._lock = threading.Lock()

    def take(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        pin_memory: bool = False,
    ) -> torch.Tensor:
        """An uninitialised tensor of `shape` and `dtype` on `device` (pooled on the CPU only)."""
        device = torch.device(device)
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        key = (tuple(shape), dtype, pin_memory)
        with self._lock:
            for _ in self._loans.returned():
                pass  # buffers given back are simply no longer out
            buffers = self._buffers.pop(key, [])
            self._buffers[key] = buffers
            while len(self._buffers) > self._max_keys:
                del self._buffers[next(iter(self._buffers))]
            free = next((b for b in buffers if not self._loans.is_out(id(b))), None)
            if free is None:
                free = torch.empty(shape, dtype=dtype, pin_memory=pin_memory)
                if len(buffers) < self._max_per_key:
                    buffers.append(free)
            (lent,) = self._loans.lend(id(free), [free])
            return lent

    def clear(self) -> None:
        """Drop every pooled buffer (memory is freed once the aliases lent out are gone too)."""
        with self._lock:
            self._buffers.clear()
            self._loans.forget()
