"""The loaders users would pick instead of cocoshard, each driven the way its own documentation does.

One module per peer, each with `build(data, batch, workers, size, device) -> Pipeline` that writes
the peer's own format of the bench images (once, cached beside the bench data), builds its loader
and its augmentation, and raises `PeerUnavailable` with the reason when the peer cannot run here
(not installed: `bash tools/install-peers.sh`). Every peer produces the same training-ready batch as
cocoshard: random resized crop (0.35-1, 3/4-4/3) + flip + ImageNet normalisation to
(N, 3, S, S) channels_last, float32 (what their examples give), with the keys of its images so the
benchmark can check its labels.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

PEERS = ("webdataset", "ffcv-jpeg", "ffcv-raw", "dali", "litdata", "mosaic")
_MODULES = {
    "webdataset": "webdataset_loader",
    "ffcv-jpeg": "ffcv_loader",
    "ffcv-raw": "ffcv_loader",
    "dali": "dali_loader",
    "litdata": "litdata_loader",
    "mosaic": "mosaic_loader",
}


def builder(name: str) -> Callable:
    """The `build` function of peer `name` (modules are imported only when a peer is measured)."""
    module = importlib.import_module(f"peers.{_MODULES[name]}")
    return getattr(module, "build_" + name.split("-")[1]) if "-" in name else module.build
