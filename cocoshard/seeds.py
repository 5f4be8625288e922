"""Every random stream of a run, derived from its one `--seed` in one way.

    rng = numpy_rng(seed, epoch, rank, worker, Stream.SAMPLE_BUFFER)
    generator = torch_generator(seed, epoch, rank, Stream.AUGMENT, device=device)

A stream is NumPy's `SeedSequence` of `(seed, *parts)`: well mixed (neighbouring seeds and epochs
give unrelated numbers) and a pure function of its parts, so a resumed run draws exactly what the
uninterrupted run drew, and each purpose (the `Stream` named last) draws numbers no other one does.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

import numpy as np


class Stream(IntEnum):
    """What a stream is for (the last part of its seed)."""

    PACK_TRAIN_ORDER = (
        1  # pack: the order of train samples in the shards (the split draws from the bare seed)
    )
    PACK_FOLD_ORDER = 2  # pack --folds: the order of each fold's samples in its shards
    SHARD_ORDER = 10  # each epoch's order of shards
    SAMPLE_BUFFER = 11  # a stream worker's shuffle buffer
    RESIDENT_ORDER = 12  # the resident loader's permutation of the split
    AUGMENT = 13  # crops and flips drawn for a batch
    TORCH_GLOBAL = 14  # torch's global generator in an epoch (dropout, stochastic depth)


def numpy_rng(seed: int, *parts: int) -> np.random.Generator:
    """A NumPy generator for the stream `(seed, *parts)`."""
    return np.random.default_rng([seed, *parts])


def derive_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed for the stream `(seed, *parts)` (for torch generators)."""
    state = np.random.SeedSequence([seed, *parts]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def torch_generator(seed: int, *parts: int, device: Any = "cpu") -> Any:
    """A torch generator on `device` for the stream `(seed, *parts)`."""
    import torch

    return torch.Generator(device=device).manual_seed(derive_seed(seed, *parts))
