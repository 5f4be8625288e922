"""Reading one shard: its bytes (a local file or a URL), its checksum, its samples.

    samples = read_samples(url, expected_sha256, expected_samples, remote=manifest.remote)
    for key, members in samples: members["jpg"], members["labels.npy"]
    shard = read_shard(url, expected_sha256, expected_samples)   # its bytes, version and index

Every reader of shards goes through `read_shard`: the loaders (a stream worker through the
layout it keeps of each shard, `cocoshard.loading.layout`), evaluate's labels, predict. A
local shard is memory-mapped, not read: a loader worker touches only the pages of the samples it
reads (a 120 MB raw shard read whole took a quarter of a short epoch), and the page cache is
shared by all workers. A URL is read whole (`cocoshard.remote`: bounded waits, retries, a network
failure named as one) and checked against the manifest's sha256 before any sample of it is used;
with a cache (`cocoshard.shard_cache`, `--cache DIR`) it is downloaded once per node and then
mapped like a local file. A local or cached file's bytes are checked against the manifest's sha256
once per file version, for all workers of a loader (`ShardChecks`), and indexed by a tar header
parser that hands out zero-copy views of the members: Python's `tarfile` costs ~15 µs per member,
this parser ~1 µs, and each process keeps the index it found per file version (`ShardIndex`), so
a worker that reads its shards every epoch parses their headers once. Nothing is ever extracted:
member names are only split into key and extension, so absolute or `..` paths cannot touch the
filesystem.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import stat
from typing import NamedTuple

import numpy as np
import torch

from cocoshard.errors import UserError
from cocoshard.remote import is_url
from cocoshard.shard_cache import DownloadMismatch, Remote, fetch_shard

BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")
_PAX_NEXT, _PAX_GLOBAL, _GNU_LONGNAME, _GNU_LONGLINK = b"x", b"g", b"L", b"K"
# WebDataset's rule: the key is everything up to the first dot of the last path component.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


class BadSample(UserError):
    """A sample that cannot be decoded: the message names the shard and the key."""


class BadShard(BadSample):
    """A shard that cannot be used at all: missing, truncated, or not matching its checksum."""


class Sample(NamedTuple):
    key: str
    members: dict[str, memoryview]


class Shard(NamedTuple):
    data: bytes | mmap.mmap  # the tar file's bytes (a read-only map of a local or cached file)
    version: int  # changes when a local file is rewritten (mtime, size); 0: a download held in memory
    checked: bool = False  # its sha256 was checked as it was opened (a download)


class ShardChecks:
    """Which shards' checksums are confirmed, per file version, shared by a loader's workers.

    Hashing a 120 MB raw shard costs ~0.1 s; each shard is hashed once per file version for all
    workers, not once per worker. Lives in shared memory, so forked or spawned workers see it.
    """

    def __init__(self, count: int) -> None:
        self._stamps = torch.zeros(max(count, 1), dtype=torch.int64).share_memory_()

    def confirmed(self, index: int, stamp: int) -> bool:
        return int(self._stamps[index]) == stamp

    def confirm(self, index: int, stamp: int) -> None:
        self._stamps[index] = stamp


# Checksums this process confirmed for callers without a ShardChecks: url -> stamp.
_confirmed_here: dict[str, int] = {}


def open_shard(url: str, sha256: str | None = None, remote: Remote | None = None) -> Shard:
    """The whole shard: a local file memory-mapped; a URL's bytes checked against `sha256` (from
    the cache, or downloaded), or without a `sha256` downloaded as they are (`shard_keys`)."""
    if is_url(url):
        remote = remote or Remote()
        if not sha256:
            from cocoshard.remote import read_url

            return Shard(read_url(url, remote.network), 0)
        try:
            return Shard(*fetch_shard(url, sha256, remote))
        except DownloadMismatch as exc:
            raise BadShard(str(exc)) from None
    try:
        with open(url, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise BadShard(f"shard {url} is not a regular file")
            if info.st_size == 0:
                raise BadShard(f"shard {url} is empty (0 bytes)")
            data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        return Shard(data, file_version(info))
    except (OSError, ValueError) as exc:
        raise BadShard(f"cannot read shard {url}: {exc}") from exc


def file_version(info: os.stat_result) -> int:
    """A number that changes when a file is rewritten in place or replaced by another (a re-pack)."""
    return hash((info.st_mtime_ns, info.st_size, info.st_ino, info.st_dev)) % (2**62) + 1


def check_sha256(url: str, data: bytes | mmap.mmap, expected: str | None) -> None:
    """Raise BadShard unless `data` hashes to `expected` (nothing to check when the manifest has no hash)."""
    if not expected:
        return
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise BadShard(
            f"shard {url} is corrupted: its sha256 is {actual[:16]}..., the manifest says {expected[:16]}... "
            "(re-run cocoshard pack, or pass --skip-bad-samples to train without it)"
        )


def _octal(field: bytes, url: str, offset: int) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError as exc:
        raise BadShard(f"shard {url} has a damaged tar header at byte {offset}") from exc


def _check_header(header: bytes, url: str, offset: int) -> None:
    stored = _octal(header[148:156], url, offset)
    # The checksum field counts as eight spaces (8 * 32); old writers summed signed bytes.
    unsigned = sum(header[:148]) + 256 + sum(header[156:])
    if stored == unsigned:
        return
    signed = unsigned - 256 * sum(1 for b in header[:148] + header[156:] if b > 127)
    if stored != signed:
        raise BadShard(f"shard {url} has a damaged tar header at byte {offset} (checksum mismatch)")


def _pax_path(records: bytes, url: str) -> tuple[str | None, int | None]:
    path = size = None
    pos = 0
    while pos < len(records):
        space = records.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(records[pos:space])
        except ValueError as exc:
            raise BadShard(f"shard {url} has a damaged pax header") from exc
        if length <= 0:
            raise BadShard(f"shard {url} has a damaged pax header")
        name, _, value = records[space + 1 : pos + length - 1].partition(b"=")
        if name == b"path":
            path = value.decode("utf-8", "replace")
        elif name == b"size":
            size = int(value)
        pos += length
    return path, size


def _name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar" and header[345] != 0:
        name = header[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "replace")


def tar_spans(data: bytes | mmap.mmap, url: str, check_headers: bool = True) -> list[tuple[str, int, int]]:
    """(name, start, end) of every regular file in a tar held in memory, in order.

    `check_headers=False` skips the per-header checksums: for data whose sha256 already matched.
    """
    spans: list[tuple[str, int, int]] = []
    offset, end = 0, len(data)
    long_name: str | None = None
    pax_size: int | None = None
    while offset + BLOCK <= end:
        header = data[offset : offset + BLOCK]
        if header.count(0) == BLOCK:
            return spans
        if check_headers:
            _check_header(header, url, offset)
        size = _octal(header[124:136], url, offset)
        kind = header[156:157]
        if pax_size is not None and kind not in (_PAX_NEXT, _PAX_GLOBAL):
            size = pax_size
        start = offset + BLOCK
        if start + size > end:
            raise BadShard(
                f"shard {url} is truncated: a member at byte {offset} needs {size} bytes, the file ends first"
            )
        if kind == _PAX_NEXT:
            long_name, pax_size = _pax_path(bytes(data[start : start + size]), url)
        elif kind == _GNU_LONGNAME:
            long_name = bytes(data[start : start + size]).split(b"\0", 1)[0].decode("utf-8", "replace")
        elif kind not in (_PAX_GLOBAL, _GNU_LONGLINK):
            if kind in _REGULAR:
                spans.append((long_name or _name(header), start, start + size))
            long_name, pax_size = None, None
        offset = start + (size + BLOCK - 1) // BLOCK * BLOCK
    if offset != end:
        raise BadShard(f"shard {url} is truncated: it ends inside a tar header at byte {offset}")
    return spans


class ShardIndex(NamedTuple):
    """Where each sample's members lie in a shard: what parsing its tar headers found, compactly.

    A loader worker reads each of its shards once per epoch; keeping the index (about 100 bytes
    per sample) spares it the header parsing from the second epoch on (~10 ms per 800-sample shard,
    which sits before the epoch's first batch).
    """

    keys: list[str]
    exts: list[tuple[str, ...]]  # the member extensions of each sample (one shared tuple per pattern)
    bounds: np.ndarray  # int64 (members, 2): start and end of each member, samples in order

    def samples(self, data: bytes | mmap.mmap) -> list[Sample]:
        view, bounds, out = memoryview(data), self.bounds.tolist(), []
        row = 0
        for key, exts in zip(self.keys, self.exts, strict=True):
            members = {}
            for ext in exts:
                start, end = bounds[row]
                members[ext] = view[start:end]
                row += 1
            out.append(Sample(key, members))
        return out


def index_samples(spans: list[tuple[str, int, int]], url: str) -> ShardIndex:
    """Consecutive members sharing a key make one sample (WebDataset's grouping rule)."""
    keys: list[str] = []
    exts: list[tuple[str, ...]] = []
    bounds: list[tuple[int, int]] = []
    patterns: dict[tuple[str, ...], tuple[str, ...]] = {}
    current: list[str] = []

    def close_sample() -> None:
        if keys:
            pattern = tuple(current)
            exts.append(patterns.setdefault(pattern, pattern))

    for name, start, end in spans:
        match = _KEY_EXT.match(name)
        if match is None:
            continue  # a member without an extension belongs to no sample
        key, ext = match.group(1), match.group(2)
        if keys and keys[-1] == key:
            if ext in current:
                raise BadShard(f"shard {url} holds {key}.{ext} twice in one sample")
            current.append(ext)
        else:
            close_sample()
            keys.append(key)
            current = [ext]
        bounds.append((start, end))
    close_sample()
    return ShardIndex(keys, exts, np.array(bounds, dtype=np.int64).reshape(-1, 2))


def parse_samples(data: bytes | mmap.mmap, url: str, check_headers: bool = True) -> list[Sample]:
    """The samples of a tar held in memory, members as zero-copy views (no cache)."""
    return index_samples(tar_spans(data, url, check_headers), url).samples(data)


# Shard indexes this process parsed: url -> (file version, index). Kept for local files only.
_indexes: dict[str, tuple[int, ShardIndex]] = {}


class MappedShard(NamedTuple):
    """A checked shard: its bytes, their file version (0: a download held in memory), its index."""

    data: bytes | mmap.mmap
    stamp: int
    table: ShardIndex  # (`index` would hide the tuple's own method)

    def samples(self) -> list[Sample]:
        return self.table.samples(self.data)


def read_shard(
    url: str,
    sha256: str | None = None,
    expected_samples: int | None = None,
    *,
    checks: ShardChecks | None = None,
    index: int = 0,
    remote: Remote | None = None,
) -> MappedShard:
    """Read, check and index one shard. Raises BadShard naming the shard on any inconsistency, and
    NetworkError (`cocoshard.remote`) when a URL cannot be read.

    The checksum of a local or cached file is computed once per file version: per process, or
    across a loader's workers when they share `checks` (with `index`, the shard's number in it);
    a download's is computed whenever it is downloaded, before it is used.
    """
    data, stamp, checked = open_shard(url, sha256, remote)
    if sha256 and stamp:
        known = checks.confirmed(index, stamp) if checks is not None else _confirmed_here.get(url) == stamp
        if not known:
            if not checked:
                check_sha256(url, data, sha256)
            if checks is not None:
                checks.confirm(index, stamp)
            else:
                _confirmed_here[url] = stamp
    kept = _indexes.get(url)
    if stamp and kept is not None and kept[0] == stamp:
        shard_index = kept[1]
    else:
        shard_index = index_samples(tar_spans(data, url, check_headers=not sha256), url)
        if stamp:
            _indexes[url] = (stamp, shard_index)
    if expected_samples is not None and len(shard_index.keys) != expected_samples:
        raise BadShard(
            f"shard {url} holds {len(shard_index.keys)} samples, the manifest says {expected_samples}"
        )
    return MappedShard(data, stamp, shard_index)


def read_samples(
    url: str, sha256: str | None = None, expected_samples: int | None = None, remote: Remote | None = None
) -> list[Sample]:
    """The samples of one shard, read and checked by `read_shard`, members as zero-copy views."""
    return read_shard(url, sha256, expected_samples, remote=remote).samples()


def shard_keys(url: str, sha256: str | None = None, remote: Remote | None = None) -> list[str]:
    """The sample keys of a shard in order, from its tar headers alone (a local file's payload is not
    read). A URL is read whole: checked against `sha256` when given, through the cache if any."""
    return index_samples(tar_spans(open_shard(url, sha256, remote).data, url), url).keys
