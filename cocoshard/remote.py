"""Reading a manifest or a shard from where it lives: one opener for every kind of location.

    data = read_url("s3://bucket/shards/train-000000.tar", Network(stall_timeout=30))

| location | read with |
|---|---|
| `http://`, `https://` | Python's `http.client`: redirects followed, `http(s)_proxy`, `no_proxy` |
| `s3://` | fsspec + s3fs (the `remote` extra): AWS credentials, profiles, `AWS_ENDPOINT_URL` |
| `gs://` | fsspec + gcsfs (the `remote` extra): Google's application default credentials |
| other fsspec protocols | fsspec, with that library's own timeouts |
| `pipe:COMMAND` | the command's standard output; `{name}` in it is the file's name |

`pip install 'cocoshard[remote]'` brings s3fs and gcsfs. A `pipe:` location names its files with
`{name}` (`pipe:aws s3 cp s3://bucket/shards/{name} -`), or gets `/NAME` appended.

Every read is bounded: connecting may take `connect_timeout` seconds, and a read that receives
nothing for `stall_timeout` seconds (a stalled server, a silent network, a command that writes
nothing) fails. A failure that may pass (a refused or reset connection, a timeout, a truncated
body, HTTP 5xx or 429, a command that exits non-zero) is tried again `retries` times, waiting
`backoff`, then twice as long each time; an answer that will not change (HTTP 404, 403) is not.
What is left is one `NetworkError` naming the URL, what failed and the retries made: a network
failure is never reported as a damaged shard (that is what a wrong sha256 is). A body longer than
the bound a caller gives is refused.
"""

from __future__ import annotations

import http.client
import os
import select
import signal
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from cocoshard.errors import UserError

CHUNK = 1 << 20
MAX_REDIRECTS = 5
PIPE_NAME = "{name}"  # where a pipe: location puts the file name


def is_url(location: str) -> bool:
    """True for a location that is not a local path (http://, s3://, gs://, pipe:...)."""
    return "://" in location or location.startswith("pipe:")


def join_location(location: str, name: str) -> str:
    """The location of file `name` under a folder, URL prefix or `pipe:` command (its `{name}`
    replaced, or the name appended as a last path component)."""
    if location.startswith("pipe:") and PIPE_NAME in location:
        return location.replace(PIPE_NAME, name)
    if is_url(location):
        return location.rstrip("/") + "/" + name
    return os.path.join(location, name)


@dataclass(frozen=True)
class Network:
    """How long a read may wait, and how often a failed one is tried again."""

    connect_timeout: float = 10.0  # seconds to open a connection
    stall_timeout: float = 60.0  # seconds a read may receive nothing
    retries: int = 3  # further tries of a read that failed in a way that may pass
    backoff: float = 1.0  # seconds before the first retry; doubled before each next one

    def describe(self) -> str:
        return f"connect timeout {self.connect_timeout:g} s, stall timeout {self.stall_timeout:g} s"


class NetworkError(UserError):
    """A URL that could not be read: the message names it, what failed and the retries made."""


class _Transient(Exception):
    """A failure that may pass: worth another try."""


class _Final(Exception):
    """An answer that another try would not change."""


def read_url(url: str, network: Network, limit: int | None = None) -> bytes:
    """The whole body at `url` (at most `limit` bytes), or NetworkError after the retries."""
    tried: list[str] = []
    for attempt in range(network.retries + 1):
        if attempt:
            time.sleep(network.backoff * 2 ** (attempt - 1))
        try:
            return _read_once(url, network, limit)
        except _Final as exc:
            raise NetworkError(f"cannot read {url}: {exc}") from None
        except _Transient as exc:
            tried.append(str(exc))
    retries = f"{network.retries} retr{'y' if network.retries == 1 else 'ies'}"
    raise NetworkError(
        f"network failure reading {url}: {tried[-1]} (tried {len(tried)} times: the first try and "
        f"{retries}; {network.describe()})"
    )


def _read_once(url: str, network: Network, limit: int | None) -> bytes:
    if url.startswith("pipe:"):
        return _read_pipe(url[len("pipe:") :], network, limit)
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return _read_http(url, network, limit)
    return _read_fsspec(url, scheme, network, limit)


# ----------------------------------------------------------------------------------- http(s)


def _connection(url: str, network: Network) -> tuple[http.client.HTTPConnection, str]:
    """An open connection for `url` (through the environment's proxy, unless bypassed) and the
    request target to send on it."""
    parts = urlsplit(url)
    https = parts.scheme.lower() == "https"
    host, port = parts.hostname or "", parts.port or (443 if https else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    proxy = urllib.request.getproxies_environment().get(parts.scheme.lower())
    if proxy and urllib.request.proxy_bypass(host):
        proxy = None
    kind = http.client.HTTPSConnection if https else http.client.HTTPConnection
    if proxy:
        via = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        conn = kind(via.hostname or "", via.port or 80, timeout=network.connect_timeout)
        if https:
            conn.set_tunnel(host, port)
        else:
            target = url
    else:
        conn = kind(host, port, timeout=network.connect_timeout)
    try:
        conn.connect()
    except TimeoutError as exc:
        raise _Transient(f"no connection within the connect timeout ({network.connect_timeout:g} s)") from exc
    except ssl.SSLCertVerificationError as exc:
        raise _Final(f"its TLS certificate is not trusted ({exc.verify_message})") from exc
    except OSError as exc:
        raise _Transient(f"cannot connect: {exc.strerror or exc}") from exc
    assert conn.sock is not None
    conn.sock.settimeout(network.stall_timeout)  # from now on: the most a read may wait for bytes
    return conn, target


def _read_http(url: str, network: Network, limit: int | None) -> bytes:
    for _ in range(MAX_REDIRECTS + 1):
        conn, target = _connection(url, network)
        try:
            try:
                conn.request("GET", target, headers={"Accept-Encoding": "identity"})
                response = conn.getresponse()
            except TimeoutError as exc:
                raise _Transient(f"no answer for {network.stall_timeout:g} s (stall timeout)") from exc
            except (OSError, http.client.HTTPException) as exc:
                raise _Transient(f"the connection failed: {exc}") from exc
            status = response.status
            if status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                url = urljoin(url, response.getheader("Location", ""))
                continue
            _check_status(status, response.reason)
            return _read_body(response, network, limit)
        finally:
            conn.close()
    raise _Final(f"more than {MAX_REDIRECTS} redirects")


def _check_status(status: int, reason: str) -> None:
    if status == 200:
        return
    what = f"HTTP {status} {reason}".rstrip()
    if status in (404, 410):
        raise _Final(f"not found ({what})")
    if status in (401, 403):
        raise _Final(f"access refused ({what})")
    if status >= 500 or status in (408, 429):
        raise _Transient(f"the server answered {what}")
    raise _Final(f"the server answered {what}")


def _read_body(response: http.client.HTTPResponse, network: Network, limit: int | None) -> bytes:
    declared = response.getheader("Content-Length")
    expected = int(declared) if declared and declared.isdigit() else None
    if limit is not None and expected is not None and expected > limit:
        raise _Final(f"it is {expected:,} bytes, more than the {limit:,} allowed")
    body = bytearray()
    try:
        while chunk := response.read(CHUNK):
            body += chunk
            if limit is not None and len(body) > limit:
                raise _Final(f"it is more than the {limit:,} bytes allowed")
    except TimeoutError as exc:
        raise _Transient(
            f"no data for {network.stall_timeout:g} s (stall timeout) after {len(body):,} bytes"
        ) from exc
    except http.client.IncompleteRead as exc:
        got = len(body) + len(exc.partial)
        of = f" of {expected:,}" if expected is not None else ""
        raise _Transient(f"the body was cut short: {got:,}{of} bytes") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise _Transient(f"the connection failed after {len(body):,} bytes: {exc}") from exc
    if expected is not None and len(body) != expected:
        raise _Transient(f"the body was cut short: {len(body):,} of {expected:,} bytes")
    return bytes(body)


# ----------------------------------------------------------------------------------- object stores


def _fsspec_options(scheme: str, network: Network) -> dict[str, object]:
    """Each store's own connect and stall (socket read) timeouts; its own retries off (`read_url`
    retries, and counts them)."""
    if scheme in ("s3", "s3a"):
        return {
            "config_kwargs": {
                "connect_timeout": network.connect_timeout,
                "read_timeout": network.stall_timeout,
                "retries": {"max_attempts": 1},
            },
            "max_concurrency": 1,  # one GET per object
        }
    if scheme in ("gs", "gcs"):
        import aiohttp

        timeout = aiohttp.ClientTimeout(sock_connect=network.connect_timeout, sock_read=network.stall_timeout)
        return {"session_kwargs": {"timeout": timeout}}
    return {}


STORE_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}


def _read_fsspec(url: str, scheme: str, network: Network, limit: int | None) -> bytes:
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url, **_fsspec_options(scheme, network))
    except ImportError as exc:
        package = STORE_PACKAGES.get(scheme, f"fsspec's {scheme} support")
        raise UserError(
            f"reading {url} needs {package}, which is not installed: pip install 'cocoshard[remote]' ({exc})"
        ) from None
    except ValueError as exc:  # fsspec knows no such protocol
        raise UserError(f"cannot read {url}: {exc}") from None
    if hasattr(fs, "retries"):
        fs.retries = 1  # one try per read_url attempt
    try:
        data = fs.cat_file(path)
    except FileNotFoundError as exc:
        raise _Final("not found") from exc
    except PermissionError as exc:
        raise _Final(f"access refused ({exc}): check the credentials") from exc
    except Exception as exc:  # the stores raise their own types for timeouts and connection errors
        raise _Transient(f"{type(exc).__name__}: {exc}") from exc
    if limit is not None and len(data) > limit:
        raise _Final(f"it is {len(data):,} bytes, more than the {limit:,} allowed")
    return data


# ----------------------------------------------------------------------------------- pipe:


def _read_pipe(command: str, network: Network, limit: int | None) -> bytes:
    """The standard output of `command`; its process group is killed when it stalls."""
    process = subprocess.Popen(
        command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    assert process.stdout is not None and process.stderr is not None
    out, err = bytearray(), bytearray()
    streams = {process.stdout.fileno(): out, process.stderr.fileno(): err}
    try:
        while streams:
            ready, _, _ = select.select(list(streams), [], [], network.stall_timeout)
            if not ready:
                raise _Transient(
                    f"the command wrote nothing for {network.stall_timeout:g} s (stall timeout) "
                    f"after {len(out):,} bytes"
                )
            for fd in ready:
                chunk = os.read(fd, CHUNK)
                if not chunk:
                    del streams[fd]
                    continue
                streams[fd] += chunk
                del err[:-4096]  # only the end of what it said is shown
                if limit is not None and len(out) > limit:
                    raise _Final(f"the command wrote more than the {limit:,} bytes allowed")
        code = process.wait(timeout=network.stall_timeout)
    except subprocess.TimeoutExpired as exc:
        raise _Transient("the command closed its output but did not exit") from exc
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        process.stdout.close()
        process.stderr.close()
    if code != 0:
        said = err.decode("utf-8", "replace").strip().splitlines()
        raise _Transient(f"the command exited with status {code}" + (f": {said[-1]}" if said else ""))
    return bytes(out)
