"""Shared fixtures: the real COCO sample shipped beside the project, and scratch copies of it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COCO_SAMPLE = Path(os.environ.get("COCOSHARD_SAMPLE", REPO.parent / "shared" / "coco-sample"))


@pytest.fixture(scope="session")
def coco_sample() -> Path:
    """Real COCO photos in the challenge layout (read-only)."""
    if not (COCO_SAMPLE / "images").is_dir():
        pytest.fail(f"the real COCO sample is missing at {COCO_SAMPLE} (set COCOSHARD_SAMPLE)")
    return COCO_SAMPLE
