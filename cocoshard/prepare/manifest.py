"""`manifest.json`: reading it from a shard folder or URL prefix, and where its shards are.

The manifest is written last by `cocoshard pack` and describes every shard (name, samples, bytes,
sha256) of every split, the pixel format, the canvas size, the class names and the inputs left out.
Reading it does I/O: a local file, or an HTTP(S) URL prefix (`--shards https://host/shards`).
The format of the shards it describes: `cocoshard.prepare.format`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cocoshard import CLASSES, NUM_CLASSES
from cocoshard.errors import UserError
from cocoshard.prepare.format import FORMAT_VERSION, is_shard_file

MANIFEST = "manifest.json"


def is_url(location: str) -> bool:
    """True for anything WebDataset opens that is not a local path (http://, s3://, pipe:...)."""
    return "://" in location or location.startswith("pipe:")


def read_manifest(location: str | os.PathLike) -> dict[str, Any]:
    """Load `manifest.json` from a shard folder (or URL prefix) and check its format version."""
    loc = str(location)
    if is_url(loc):
        import urllib.request

        url = loc.rstrip("/") + "/" + MANIFEST
        try:
            with urllib.request.urlopen(url) as response:  # noqa: S310 (user-given location)
                text = response.read().decode()
        except OSError as exc:
            raise UserError(f"cannot read {url}: {exc}") from exc
        source = url
    else:
        path = Path(loc) / MANIFEST
        if not path.is_file():
            raise UserError(f"no {MANIFEST} in {loc!s}: pack the data first (cocoshard pack --out {loc})")
        text = path.read_text()
        source = str(path)
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise UserError(f"{source} is not valid JSON: {exc}") from exc
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise UserError(f"{source} has format_version {version!r}; this cocoshard reads {FORMAT_VERSION}: re-run cocoshard pack")
    return manifest


def split_shards(manifest: dict[str, Any], split: str) -> list[dict[str, Any]]:
    """The shard entries (name, samples, bytes, sha256) of one split, in order."""
    if split not in manifest.get("splits", {}):
        raise UserError(f"the shards hold no {split!r} split (they have: {', '.join(manifest.get('splits', {}))})")
    return list(manifest["splits"][split]["shards"])


def shard_urls(location: str | os.PathLike, manifest: dict[str, Any], split: str) -> list[str]:
    """Full paths or URLs of one split's shards."""
    loc = str(location)
    sep = "/" if is_url(loc) else os.sep
    return [loc.rstrip("/") + sep + entry["name"] for entry in split_shards(manifest, split)]


def list_shard_files(folder: str | os.PathLike) -> list[Path]:
    """The `{train,val,test}-NNNNNN.tar` files in a local folder, sorted by name."""
    path = Path(folder)
    if not path.is_dir():
        return []
    return sorted(entry for entry in path.iterdir() if is_shard_file(entry.name) and entry.is_file())


def manifest_class_names(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The names of the 80 classes the shards were packed with (a generated set has its own)."""
    names = manifest.get("classes")
    if isinstance(names, list) and len(names) == NUM_CLASSES and all(isinstance(n, str) for n in names):
        return tuple(names)
    return CLASSES
