"""The node's shard cache (`--cache DIR`): shards read from URLs, verified, kept on local disk, shared.

    remote = Remote(Network(), ShardCache("/scratch/cocoshard", max_bytes=50 * 2**30))
    data, version, verified = fetch_shard(url, sha256, remote)

Without a cache every reader downloads a shard whenever it reads it: each rank, each epoch, and the
val shards twice an epoch (raw weights and EMA). With one, a shard is downloaded once per node:
the first process to want it takes its lock, downloads it, checks it against the manifest's
sha256 and renames it into DIR; every other process (ranks, loader workers) waits on the lock and
then memory-maps the same file. A download that does not match is never admitted.

    DIR/<sha256>.tar      a shard whose bytes matched the manifest when admitted (named by content,
                          so two manifests never mix their shards)
    DIR/.<sha256>.lock    held (flock) by the process downloading that shard
    DIR/.tmp-...          a download being written (a killed one's is removed by the next)

The cache holds at most `max_bytes` (`--cache-size GB`; unset: what its disk has free, less a
margin): before a shard is admitted, the least recently used ones (by modification time, which
every use refreshes) are removed until it fits. A process that maps a file keeps reading it if
another one removes it meanwhile. Give each node a folder on its own local disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cocoshard.errors import UserError
from cocoshard.remote import Network, read_url

TMP_PREFIX = ".tmp-"
RESERVE = 2**30  # bytes of the cache's disk left free when no --cache-size is given


class DownloadMismatch(UserError):
    """A download whose bytes differ from the manifest's sha256 (changed or damaged at its source)."""


@dataclass(frozen=True)
class ShardCache:
    """A folder of verified shards shared by the processes of a node, bounded by `max_bytes`."""

    folder: str
    max_bytes: int | None = None  # None: what the disk holding it has free, less RESERVE

    def path(self, sha256: str) -> Path:
        return Path(self.folder) / f"{sha256}.tar"

    def lookup(self, sha256: str) -> tuple[mmap.mmap, int] | None:
        """(read-only map, version) of the cached shard, marked as used now; None when absent."""
        path = self.path(sha256)
        try:
            with open(path, "rb") as handle:
                info = os.fstat(handle.fileno())
                if info.st_size == 0:
                    return None
                data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise UserError(f"cannot read the cached shard {path}: {exc.strerror or exc}") from None
        with contextlib.suppress(OSError):  # a read-only cache still serves, only its order ages
            os.utime(path)
        return data, (info.st_dev * 1_000_003 + info.st_ino * 8_191 + info.st_size) % (2**62) + 1

    @contextlib.contextmanager
    def lock(self, sha256: str) -> Iterator[None]:
        """Hold the shard's lock: one process downloads a shard while the others wait for it."""
        folder = Path(self.folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder / f".{sha256}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise UserError(f"--cache {self.folder} cannot be used: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            for stale in folder.glob(f"{TMP_PREFIX}{sha256[:16]}-*"):  # a killed download's
                stale.unlink(missing_ok=True)
            yield
        finally:
            os.close(fd)  # releases the lock

    def admit(self, data: bytes, sha256: str) -> None:
        """Write a verified shard into the cache (under its lock), removing the least recently
        used shards first until it fits."""
        self.make_room(len(data), keep=sha256)
        fd, temporary = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{sha256[:16]}-", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(temporary, self.path(sha256))
        except OSError as exc:
            Path(temporary).unlink(missing_ok=True)
            raise UserError(
                f"cannot write to --cache {self.folder}: {exc.strerror or exc} (free space there, or give a "
                "smaller --cache-size)"
            ) from None

    def admit_file(self, path: Path, sha256: str) -> None:
        """Move a verified shard written in the cache's folder into the cache."""
        self.make_room(path.stat().st_size, keep=sha256)
        os.replace(path, self.path(sha256))

    def make_room(self, incoming: int, keep: str = "") -> None:
        """Remove the least recently used shards until `incoming` more bytes fit the bound."""
        folder = Path(self.folder)
        entries = []
        for path in folder.glob("*.tar"):
            with contextlib.suppress(FileNotFoundError):  # removed by another process meanwhile
                info = path.stat()
                entries.append((info.st_mtime_ns, info.st_size, path))
        total = sum(size for _, size, _ in entries)
        bound = self.max_bytes
        if bound is None:
            bound = total + shutil.disk_usage(folder).free - RESERVE
        if incoming > bound:
            raise UserError(
                f"a shard of {incoming / 2**30:.2f} GB does not fit --cache {self.folder} (bound "
                f"{max(bound, 0) / 2**30:.2f} GB): give a larger --cache-size, or free space there"
            )
        for _, size, path in sorted(entries):
            if total + incoming <= bound:
                break
            if path.name != f"{keep}.tar":
                path.unlink(missing_ok=True)
                total -= size

    def size(self) -> int:
        """Bytes of shards held now."""
        return sum(path.stat().st_size for path in Path(self.folder).glob("*.tar"))


@dataclass(frozen=True)
class Remote:
    """How shards at URLs are read: the network's bounds, and the node's cache (or none)."""

    network: Network = field(default_factory=Network)
    cache: ShardCache | None = None


class RemoteSettings(Protocol):
    """The settings of a command that reads shards (`--cache`, `--cache-size`, the timeouts)."""

    cache: str | None
    cache_size: float | None
    connect_timeout: float
    stall_timeout: float
    retries: int


def remote_of(cfg: RemoteSettings) -> Remote:
    """How a command's shards at URLs are read, from its settings."""
    network = Network(cfg.connect_timeout, cfg.stall_timeout, cfg.retries)
    if not cfg.cache:
        return Remote(network)
    bound = None if cfg.cache_size is None else int(cfg.cache_size * 2**30)
    return Remote(network, ShardCache(os.path.abspath(cfg.cache), bound))


def check_download(url: str, data: bytes, sha256: str) -> None:
    """Raise DownloadMismatch unless the bytes downloaded from `url` hash to `sha256`."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise DownloadMismatch(
            f"shard {url} as downloaded does not match the manifest: its sha256 is {actual[:16]}..., "
            f"the manifest says {sha256[:16]}... (changed or damaged where it is stored; it was not used "
            "and not cached). Re-upload the shards with their manifest, or pass --skip-bad-samples to "
            "train without it"
        )


def fetch_shard(url: str, sha256: str, remote: Remote) -> tuple[bytes | mmap.mmap, int, bool]:
    """(bytes, version, verified now) of the shard at `url`, checked against `sha256` before any
    caller sees a byte of it: from the cache (downloaded into it first when absent, by one process
    per node), or downloaded for this read alone (version 0: nothing to remember it by)."""
    cache = remote.cache
    if cache is None:
        data = read_url(url, remote.network)
        check_download(url, data, sha256)
        return data, 0, True
    found = cache.lookup(sha256)
    if found is not None:
        return found[0], found[1], False
    with cache.lock(sha256):
        found = cache.lookup(sha256)  # another process may have downloaded it while we waited
        if found is not None:
            return found[0], found[1], False
        data = read_url(url, remote.network)
        check_download(url, data, sha256)
        cache.admit(data, sha256)
    found = cache.lookup(sha256)
    return (found[0], found[1], True) if found is not None else (data, 0, True)
