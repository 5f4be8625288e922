"""Random streams: one derivation, stable and distinct per purpose."""

from __future__ import annotations

import numpy as np

from cocoshard.seeds import Stream, derive_seed, numpy_rng, torch_generator


def test_derived_seeds_are_stable_and_distinct() -> None:
    assert derive_seed(0, 3, 1) == derive_seed(0, 3, 1)
    seeds = {derive_seed(s, e, r) for s in range(3) for e in range(5) for r in range(4)}
    assert len(seeds) == 60 and all(0 <= s < 2**63 for s in seeds)


def test_every_purpose_draws_its_own_numbers() -> None:
    draws = {stream: numpy_rng(7, 2, stream).integers(2**31, size=4).tolist() for stream in Stream}
    assert len({tuple(d) for d in draws.values()}) == len(Stream)
    assert numpy_rng(7, 2, Stream.AUGMENT).integers(2**31, size=4).tolist() == draws[Stream.AUGMENT]
    a = torch_generator(7, 2, Stream.AUGMENT).initial_seed()
    assert a == derive_seed(7, 2, Stream.AUGMENT) != torch_generator(7, 3, Stream.AUGMENT).initial_seed()


def test_the_bare_seed_is_numpys_own() -> None:
    """pack's split draws from numpy_rng(seed): the same numbers as np.random.default_rng(seed)."""
    assert (
        numpy_rng(5).integers(1000, size=5).tolist()
        == np.random.default_rng(5).integers(1000, size=5).tolist()
    )
