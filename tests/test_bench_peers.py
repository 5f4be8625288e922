"""The bench's peers are found by what imports: DALI ships one build per CUDA major version
(nvidia-dali-cuda120, nvidia-dali-cuda130), and either one is DALI."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))  # the bench's own modules, last

from peers.common import PeerUnavailable, imported_release  # noqa: E402


def test_a_peer_is_named_by_the_build_that_imports():
    release = imported_release("_pytest", "pytest", "pip install pytest")
    assert release.startswith("pytest ")  # the first build by name whose module imports


def test_a_missing_peer_and_a_build_that_does_not_import_are_told_apart():
    with pytest.raises(
        PeerUnavailable, match=r"^no_such_peer is not installed \(bash tools/install-peers.sh\)$"
    ):
        imported_release("no_such_peer", "no-such-distribution", "bash tools/install-peers.sh")
    with pytest.raises(PeerUnavailable, match=r"^pytest .* is installed but no_such_peer does not import: "):
        imported_release("no_such_peer", "pytest", "pip install pytest")
