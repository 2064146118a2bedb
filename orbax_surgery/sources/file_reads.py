"""Byte ranges of one file, local or remote, read as array regions.

A local file is read with positioned reads (`preadv`), or through a memory map of
just the span a region covers when it is many small runs. A file in object
storage (gs://, s3://) or on an HTTP server with Range support is read through
a TensorStore kvstore: one ranged request per run, all of a region's runs in
flight at once, so a host requests exactly its bytes; a region of more than
4096 runs is one request for its span instead. An http(s) URL is resolved through its
redirects first (a Hugging Face `resolve/` URL redirects to a CDN), since
TensorStore's http driver follows none.
"""

from __future__ import annotations

import math
import mmap
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Protocol

import numpy as np
import tensorstore as ts

from orbax_surgery import locations
from orbax_surgery.arrays import regions
from orbax_surgery.arrays.regions import Region, Shape
from orbax_surgery.errors import CheckpointNotFoundError, SourceReadError

_FEW_RUNS = 64
"""Up to this many runs, a local region is read with one positioned read each."""
_MANY_RUNS = 4096
"""Past this many runs, a remote region is read as one request for its whole span."""


class ByteFile(Protocol):
    """A file whose bytes are read by range."""

    location: str

    def exists(self) -> bool: ...

    def size(self) -> int | None:
        """Its size, where known without a request (local files)."""

    def read(self, offset: int, length: int | None = None) -> bytes:
        """`length` bytes at `offset` (to the end with None); short reads are errors."""

    def read_region(self, offset: int, shape: Shape, dtype: np.dtype, region: Region) -> np.ndarray:
        """An ascending region of a C-order array stored at `offset`."""

    def close(self) -> None: ...


def open_file(location: str) -> ByteFile:
    """The file at `location`: a local path or a gs://, s3:// or http(s):// URL."""
    if locations.is_url(location):
        return RemoteFile(location)
    return LocalFile(location)


class LocalFile:
    """A local file: positioned reads, and a memory map for regions of many runs."""

    def __init__(self, location: str):
        self.location = os.path.abspath(location)
        self._fd: int | None = None

    def exists(self) -> bool:
        return os.path.isfile(self.location)

    def size(self) -> int | None:
        return os.path.getsize(self.location)

    def read(self, offset: int, length: int | None = None) -> bytes:
        if length is None:
            length = (self.size() or 0) - offset
        out = np.empty(length, np.uint8)
        _pread_into(self._fileno(), out, offset)
        return out.tobytes()

    def read_region(self, offset: int, shape: Shape, dtype: np.dtype, region: Region) -> np.ndarray:
        out = np.empty(regions.shape_of(region), dtype)
        if out.size == 0:
            return out
        runs = _runs(offset, shape, dtype, region)
        if runs is not None and len(runs) <= _FEW_RUNS:
            flat = out.reshape(len(runs), -1)
            for i, (at, _) in enumerate(runs):
                _pread_into(self._fileno(), flat[i], at)
            return out
        return _gather(self._fileno(), offset, shape, dtype, region)

    def _fileno(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.location, os.O_RDONLY)
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class RemoteFile:
    """A file in object storage or on an HTTP server, read by ranged requests."""

    def __init__(self, location: str):
        self.location = locations.absolute(location)
        self._missing: CheckpointNotFoundError | None = None
        url = self.location
        if _is_http(url):
            try:
                url = resolve_redirects(url)
            except CheckpointNotFoundError as e:
                self._missing = e
        directory, key = locations.split(url)
        self._key = key
        try:
            context = ts.Context(ts.Context.Spec(locations.context_spec()))
            self._kv = ts.KvStore.open(locations.kvstore(directory), context=context).result()
        except ValueError as e:
            raise SourceReadError(f'Cannot open {locations.shown(location)}: {_reason(e)}') from e

    def exists(self) -> bool:
        if self._missing is not None:
            return False
        try:
            return self._read_result(slice(0, 1)).state != 'missing'
        except ValueError as e:
            if 'OUT_OF_RANGE' in str(e):
                return True  # An empty file.
            raise self._error(e) from e

    def size(self) -> int | None:
        return None

    def read(self, offset: int, length: int | None = None) -> bytes:
        if self._missing is not None:
            raise self._missing
        stop = None if length is None else offset + length
        try:
            result = self._read_result(slice(offset, stop))
        except ValueError as e:
            raise self._error(e, offset, stop) from e
        if result.state == 'missing':
            raise CheckpointNotFoundError(f'{locations.shown(self.location)} does not exist.')
        data = bytes(result.value)
        if length is not None and len(data) != length:
            raise SourceReadError(
                f'{locations.shown(self.location)} ended {length - len(data)} bytes short at '
                f'offset {offset + len(data)}: it is truncated.'
            )
        return data

    def read_region(self, offset: int, shape: Shape, dtype: np.dtype, region: Region) -> np.ndarray:
        out = np.empty(regions.shape_of(region), dtype)
        if out.size == 0:
            return out
        runs = _runs(offset, shape, dtype, region)
        if runs is None or len(runs) > _MANY_RUNS:
            first, last = _span(offset, shape, dtype, region)
            span = np.frombuffer(self.read(first, last - first), np.uint8)
            return _strided(span, first, offset, shape, dtype, region).copy()
        # All in flight at once, but not in one batch: a batch coalesces nearby runs into one
        # request for their span, gaps included, and a host then reads more than its shards.
        futures = [self._kv.read(self._key, byte_range=slice(at, at + n)) for at, n in runs]
        flat = out.reshape(-1).view(np.uint8)
        done = 0
        for (at, n), future in zip(runs, futures, strict=True):
            try:
                value = future.result().value
            except ValueError as e:
                raise self._error(e, at, at + n) from e
            if len(value) != n:
                raise SourceReadError(
                    f'{locations.shown(self.location)} is truncated: bytes {at}..{at + n} '
                    f'gave {len(value)} bytes.'
                )
            flat[done : done + n] = np.frombuffer(value, np.uint8)
            done += n
        return out

    def close(self) -> None:
        return None

    def _read_result(self, byte_range: slice) -> ts.KvStore.ReadResult:
        return self._kv.read(self._key, byte_range=byte_range).result()

    def _error(self, error: ValueError, start: int | None = None, stop: int | None = None):
        where = f' bytes {start}..{stop}' if start is not None else ''
        reason = _reason(error)
        if 'OUT_OF_RANGE' in str(error):
            return SourceReadError(
                f'{locations.shown(self.location)} is truncated: it has no{where}.'
            )
        if any(code in str(error) for code in ('403', 'PERMISSION_DENIED', 'UNAUTHENTICATED')):
            return SourceReadError(
                f'Access to {locations.shown(self.location)} was refused ({reason}): check the '
                'credentials (the AWS or Google default chain) and that they may read it.'
            )
        return SourceReadError(
            f'Reading{where} of {locations.shown(self.location)} failed: {reason}'
        )


def resolve_redirects(url: str) -> str:
    """The URL an http(s) URL finally serves from, following redirects with HEAD requests.

    A Hugging Face token in `HF_TOKEN` is sent to huggingface.co only.
    """
    if urllib.parse.urlsplit(url).username is not None:
        raise SourceReadError(
            f'{locations.shown(url)}: a user or password in a URL is not sent; use a signed URL '
            '(a token in its query), or HF_TOKEN for huggingface.co.'
        )
    request = urllib.request.Request(url, method='HEAD')
    token = os.environ.get('HF_TOKEN')
    host = urllib.parse.urlsplit(url).hostname or ''
    if token and (host == 'huggingface.co' or host.endswith('.huggingface.co')):
        request.add_header('Authorization', f'Bearer {token}')
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.geturl()
    except urllib.error.HTTPError as e:
        e.close()  # Its response holds the connection.
        if e.code == 404:
            raise CheckpointNotFoundError(
                f'{locations.shown(url)} does not exist (HTTP 404).'
            ) from e
        if e.code in (401, 403):
            raise SourceReadError(
                f'{locations.shown(url)} refused access (HTTP {e.code}); for a gated Hugging Face '
                'model, set HF_TOKEN.'
            ) from e
        raise SourceReadError(f'{locations.shown(url)} answered HTTP {e.code}.') from e
    except (urllib.error.URLError, OSError) as e:
        raise SourceReadError(f'Cannot reach {locations.shown(url)}: {e}') from e


def _is_http(location: str) -> bool:
    return location.startswith(('http://', 'https://'))


def _reason(error: BaseException) -> str:
    """A TensorStore error's first line, without the spec and body it appends."""
    text = str(error).split(' [tensorstore_spec=', 1)[0].split(' [http_response_body=', 1)[0]
    return text.splitlines()[0] if text else type(error).__name__


def _strides(shape: Shape, dtype: np.dtype) -> list[int]:
    return [dtype.itemsize * math.prod(shape[a + 1 :]) for a in range(len(shape))]


def _runs(
    offset: int, shape: Shape, dtype: np.dtype, region: Region
) -> list[tuple[int, int]] | None:
    """The region's contiguous byte runs in C order, as (file offset, bytes); None if strided."""
    strides = _strides(shape, dtype)
    inner = len(shape) - 1  # Axes after `inner` are whole: each run covers them.
    while inner >= 0 and region[inner] == range(shape[inner]):
        inner -= 1
    if inner < 0:
        return [(offset, math.prod(shape) * dtype.itemsize)]
    r = region[inner]
    if r.step != 1:
        return None
    outer = region[:inner]
    length = len(r) * strides[inner]
    start = offset + r.start * strides[inner]
    return [
        (start + sum(x[j] * s for x, j, s in zip(outer, index, strides, strict=False)), length)
        for index in np.ndindex(*(len(x) for x in outer))
    ]


def _span(offset: int, shape: Shape, dtype: np.dtype, region: Region) -> tuple[int, int]:
    strides = _strides(shape, dtype)
    first = offset + sum(r.start * s for r, s in zip(region, strides, strict=True))
    last = offset + sum(r[-1] * s for r, s in zip(region, strides, strict=True)) + dtype.itemsize
    return first, last


def _strided(
    buffer: np.ndarray, base: int, offset: int, shape: Shape, dtype: np.dtype, region: Region
) -> np.ndarray:
    """The region as a view of `buffer`, which holds the file's bytes from `base` on."""
    strides = _strides(shape, dtype)
    first, _ = _span(offset, shape, dtype, region)
    return np.ndarray(
        regions.shape_of(region),
        dtype,
        buffer=buffer,
        offset=first - base,
        strides=tuple(s * r.step for s, r in zip(strides, region, strict=True)),
    )


def _pread_into(fd: int, out: np.ndarray, at: int) -> None:
    view = out.reshape(-1).view(np.uint8).data
    got = os.preadv(fd, [view], at)
    while got < len(view):
        more = os.preadv(fd, [view[got:]], at + got)
        if more == 0:
            raise ValueError(f'the file ended {len(view) - got} bytes short at offset {at + got}')
        got += more


def _gather(fd: int, offset: int, shape: Shape, dtype: np.dtype, region: Region) -> np.ndarray:
    """Many runs: copy them out of a memory map of just the span they cover."""
    first, last = _span(offset, shape, dtype, region)
    page = mmap.ALLOCATIONGRANULARITY
    base = first - first % page
    with mmap.mmap(fd, last - base, access=mmap.ACCESS_READ, offset=base) as mm:
        view = _strided(np.frombuffer(mm, np.uint8), base, offset, shape, dtype, region)
        out = view.copy()
        del view
    return out
