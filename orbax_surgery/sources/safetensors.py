"""Hugging Face safetensors files as a lazy source: headers up front, bytes on demand.

A safetensors file is an 8-byte little-endian header size, a JSON header
(`{name: {dtype, shape, data_offsets}}` and an optional `__metadata__`), then
each tensor's raw C-order bytes. Opening reads only the headers (of every
shard named by `model.safetensors.index.json`) and checks them against the
files. Reading a region reads just its bytes: one positioned read when the
region is contiguous in the file, a few when it spans a few runs, else a
gather through a memory map of the span it covers, unmapped right after.

The files may be local or at a gs://, s3:// or http(s):// URL
(`orbax_surgery.sources.file_reads`): remote files are read with ranged
requests, batched, never whole unless the plan needs all of them.

Keys are the tensor names with '.' turned into '/', so the same rules serve
Orbax and Hugging Face checkpoints: `model.layers.0.mlp.up_proj.weight` is
`model/layers/0/mlp/up_proj/weight`.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
import weakref
from collections.abc import Collection, Mapping
from typing import Any

import ml_dtypes
import numpy as np
from etils import epath

from orbax_surgery import locations
from orbax_surgery.arrays import regions
from orbax_surgery.arrays.expr import Source
from orbax_surgery.arrays.regions import Region
from orbax_surgery.errors import CheckpointNotFoundError, SourceReadError
from orbax_surgery.keys import KeyPath, did_you_mean
from orbax_surgery.sources.file_reads import ByteFile, open_file

INDEX_FILE = 'model.safetensors.index.json'
SINGLE_FILE = 'model.safetensors'
DTYPES: dict[str, np.dtype] = {
    'BOOL': np.dtype(np.bool_),
    'U8': np.dtype(np.uint8),
    'I8': np.dtype(np.int8),
    'U16': np.dtype(np.uint16),
    'I16': np.dtype(np.int16),
    'U32': np.dtype(np.uint32),
    'I32': np.dtype(np.int32),
    'U64': np.dtype(np.uint64),
    'I64': np.dtype(np.int64),
    'F16': np.dtype(np.float16),
    'BF16': np.dtype(ml_dtypes.bfloat16),
    'F32': np.dtype(np.float32),
    'F64': np.dtype(np.float64),
    'F8_E4M3': np.dtype(ml_dtypes.float8_e4m3fn),
    'F8_E5M2': np.dtype(ml_dtypes.float8_e5m2),
}
_MAX_HEADER_BYTES = 100 * 2**20


def is_safetensors(path: epath.PathLike) -> bool:
    """Whether `path` is a safetensors file, or a directory or index holding them."""
    location = locations.absolute(path)
    named = location.endswith('.safetensors') or location.endswith('.safetensors.index.json')
    if locations.is_url(location):
        if named:
            return True
        index = locations.join(location, INDEX_FILE)
        try:
            return (
                open_file(index).exists()
                or open_file(locations.join(location, SINGLE_FILE)).exists()
            )
        except SourceReadError as e:  # Said of the checkpoint, not of a file it may not hold.
            shown = locations.shown(location)
            raise SourceReadError(str(e).replace(locations.shown(index), shown)) from e
    p = epath.Path(location)
    if p.is_file() or (named and p.is_dir() and not (p / '_METADATA').exists()):
        return named  # A directory in place of the file is then reported as such.
    return p.is_dir() and ((p / INDEX_FILE).exists() or (p / SINGLE_FILE).exists())


class SafetensorsCheckpoint:
    """A single `.safetensors` file, or a sharded checkpoint with its index, read lazily.

    Args:
        path: A `.safetensors` file, a `*.safetensors.index.json`, or a
            directory holding `model.safetensors` or `model.safetensors.index.json`;
            a local path or a gs://, s3:// or http(s):// URL.

    Attributes:
        location: Where it is, as given (a local path made absolute, or a URL).
        directory: The directory holding its files.
        arrays: Each tensor's shape and dtype, by key ('/'-joined name).
        metadata: The `__metadata__` of each file, by file name.
        bytes_read: Bytes of tensor data read so far (headers not counted).

    Example:
        >>> import tempfile, numpy as np
        >>> from orbax_surgery.huggingface.safetensors_file import write_file
        >>> path = tempfile.mkdtemp() + '/model.safetensors'
        >>> write_file(path, {'lm_head.weight': np.arange(6, dtype=np.float32).reshape(2, 3)})
        >>> src = SafetensorsCheckpoint(path)
        >>> src.arrays['lm_head/weight'].shape
        (2, 3)
    """

    def __init__(self, path: epath.PathLike):
        self.location = locations.absolute(path)
        self.metadata: dict[str, dict[str, str]] = {}
        self.arrays: dict[KeyPath, Source] = {}
        self._where: dict[KeyPath, tuple[str, int]] = {}
        self._files: dict[str, ByteFile] = {}
        weakref.finalize(self, _close_all, self._files)
        self.bytes_read = 0
        files, expected, self.directory = _files(self.location)
        for file in files:
            try:
                header, data_start = _read_header(self._file(file))
            except (SourceReadError, CheckpointNotFoundError) as e:
                held = [n for n, f in expected.items() if f == file]
                if not held:
                    raise
                raise type(e)(
                    f'{e} {INDEX_FILE} says it holds {len(held)} tensors, e.g. {held[0]!r}.'
                ) from e
            self.metadata[locations.name(file)] = header.pop('__metadata__', None) or {}
            for name, info in header.items():
                source = _source_of(name, info)
                if source.key in self.arrays:
                    raise SourceReadError(
                        f'Tensor {name!r} is in two files: {self._where[source.key][0]} and {file}.'
                    )
                self.arrays[source.key] = source
                begin = int(info['data_offsets'][0])
                self._where[source.key] = (file, data_start + begin)
        for name, file in expected.items():
            key = name_to_key(name)
            if key not in self.arrays:
                raise SourceReadError(
                    f'{INDEX_FILE} puts {name!r} in {file}, but that file has no such tensor.'
                    f'{did_you_mean(key, self.arrays)}'
                )

    @property
    def path(self) -> epath.Path:
        """The location as an `epath.Path` (local or in object storage)."""
        return epath.Path(self.location)

    def __repr__(self):
        return (
            f'SafetensorsCheckpoint({locations.shown(self.location)!r}, {len(self.arrays)} tensors)'
        )

    async def open(self, keys: Collection[KeyPath]) -> None:
        return None  # Files open on their first read (a remote one holds no handle).

    async def read(self, source: Source, region: Region) -> np.ndarray:
        return await asyncio.to_thread(self.read_now, source, region)

    def read_now(self, source: Source, region: Region) -> np.ndarray:
        """Reads one region of one tensor, blocking."""
        file, offset = self._where[source.key]
        ascending, flips = regions.split_ascending(region)
        try:
            block = self._file(file).read_region(offset, source.shape, source.dtype, ascending)
        except (OSError, ValueError) as e:
            raise SourceReadError(
                f'Reading {source.key!r} from {locations.shown(file)} failed (was the file '
                f'changed after it was opened?): {e}'
            ) from e
        self.bytes_read += block.nbytes
        return np.flip(block, flips) if flips else block

    def region_file(self, key: KeyPath, region: Region) -> str:
        """Where `region` of `key` lies, for messages: its file and the span of bytes."""
        file, offset = self._where[key]
        src = self.arrays[key]
        itemsize = src.dtype.itemsize
        strides = [itemsize * math.prod(src.shape[a + 1 :]) for a in range(len(src.shape))]
        first = offset + sum(r.start * s for r, s in zip(region, strides, strict=True))
        last = offset + sum(r[-1] * s for r, s in zip(region, strides, strict=True)) + itemsize
        return f'{locations.shown(file)}, bytes {first}..{last}'

    def _file(self, location: str) -> ByteFile:
        file = self._files.get(location)
        if file is None:
            file = self._files[location] = open_file(location)
        return file

    def close(self) -> None:
        """Closes the files (reading again reopens them)."""
        _close_all(self._files)


def _close_all(files: dict[str, ByteFile]) -> None:
    for file in files.values():
        file.close()
    files.clear()


def name_to_key(name: str) -> KeyPath:
    """A tensor name as a key path: `a.b.0.weight` -> `a/b/0/weight`."""
    return name.replace('.', '/')


def key_to_name(key: KeyPath) -> str:
    """A key path as a tensor name: `a/b/0/weight` -> `a.b.0.weight`."""
    return key.replace('/', '.')


def _files(location: str) -> tuple[list[str], dict[str, str], str]:
    """The files to open, the tensor -> file map an index promises, and their directory."""
    if locations.is_url(location):
        return _remote_files(location)
    path = epath.Path(location)
    if not path.exists():
        near = (
            did_you_mean(path.name, [p.name for p in path.parent.iterdir()])
            if path.parent.is_dir()
            else ''
        )
        raise CheckpointNotFoundError(
            f'No safetensors checkpoint at {path}: it does not exist.{near}'
        )
    if path.is_dir() and path.name.endswith('.safetensors'):
        raise SourceReadError(f'{path} is a directory, not a safetensors file.')
    if path.is_dir():
        if (path / INDEX_FILE).exists():
            path = path / INDEX_FILE
        elif (path / SINGLE_FILE).exists():
            return [str(path / SINGLE_FILE)], {}, str(path)
        else:
            found = sorted(p.name for p in path.iterdir() if p.name.endswith('.safetensors'))
            raise CheckpointNotFoundError(
                f'{path} holds neither {SINGLE_FILE} nor {INDEX_FILE}'
                + (f'; it has {found[:5]}: pass one of them.' if found else '.')
            )
    if not path.name.endswith('.index.json'):
        return [str(path)], {}, str(path.parent)
    files = _index(str(path), path.read_text)
    missing = sorted({f for f in files.values() if not epath.Path(f).exists()})
    if missing:
        names = [n for n, f in files.items() if f == missing[0]]
        raise CheckpointNotFoundError(
            f'{INDEX_FILE} names {len(missing)} missing shard file(s), first {missing[0]}, '
            f'which should hold {len(names)} tensors (e.g. {names[0]!r}).'
        )
    return sorted(set(files.values())), files, str(path.parent)


def _remote_files(location: str) -> tuple[list[str], dict[str, str], str]:
    """As `_files`, for a URL: missing shards are found when their headers are read."""
    index = location
    if not location.endswith(('.safetensors', '.index.json')):
        index = locations.join(location, INDEX_FILE)
        if not open_file(index).exists():
            single = locations.join(location, SINGLE_FILE)
            if open_file(single).exists():
                return [single], {}, location
            raise CheckpointNotFoundError(
                f'No safetensors checkpoint at {locations.shown(location)}: it holds neither '
                f'{SINGLE_FILE} nor {INDEX_FILE}.'
            )
    if index.endswith('.safetensors'):
        return [index], {}, locations.parent(index)
    files = _index(index, lambda: open_file(index).read(0).decode())
    return sorted(set(files.values())), files, locations.parent(index)


def _index(path: str, read_text: Any) -> dict[str, str]:
    """Tensor name -> the file holding it, from a safetensors index."""
    try:
        weight_map: Mapping[str, str] = json.loads(read_text())['weight_map']
        return {name: locations.join(locations.parent(path), f) for name, f in weight_map.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SourceReadError(
            f'{locations.shown(path)} is not a safetensors index (no "weight_map"): {e}'
        ) from e


def _read_header(file: ByteFile) -> tuple[dict[str, Any], int]:
    where = locations.shown(file.location)
    if not locations.is_url(file.location) and epath.Path(file.location).is_dir():
        raise SourceReadError(f'{where} is a directory, not a safetensors file.')
    try:
        size = file.size()
        head = file.read(0, 8) if size is None or size >= 8 else b''
        if len(head) < 8:
            raise SourceReadError(f'{where} is truncated: {size} bytes, too short for a header.')
        (n,) = struct.unpack('<Q', head)
        if n > min(_MAX_HEADER_BYTES, size - 8 if size is not None else _MAX_HEADER_BYTES):
            raise SourceReadError(
                f'{where} says its header is {n} bytes, but the file has {size} bytes: it is '
                'truncated or not a safetensors file.'
            )
        raw = file.read(8, n)
    except OSError as e:
        raise SourceReadError(f'Cannot read the header of {where}: {e}') from e
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise SourceReadError(f'{where} has a header that is not JSON: {e}') from e
    if not isinstance(header, dict):
        raise SourceReadError(f'{where} has a header that is not a JSON object.')
    data_start = 8 + n
    data_size = None if size is None else size - data_start
    ends = [
        _check_entry(where, name, info, data_size)
        for name, info in header.items()
        if name != '__metadata__'
    ]
    if size is None and ends and max(ends) > 0:
        try:  # A remote file's size is unknown: its last data byte must be there.
            file.read(data_start + max(ends) - 1, 1)
        except SourceReadError as e:
            raise SourceReadError(
                f'{where} is truncated: its header gives data up to byte {max(ends)}. ({e})'
            ) from e
    return header, data_start


def _check_entry(where: str, name: str, info: Any, data_size: int | None) -> int:
    """Checks one header entry; returns where its data ends."""
    try:
        dtype_name, shape, (begin, end) = info['dtype'], info['shape'], info['data_offsets']
    except (KeyError, TypeError, ValueError) as e:
        raise SourceReadError(
            f'{where}: the header entry of {name!r} is malformed: {info!r}'
        ) from e
    if dtype_name not in DTYPES:
        raise SourceReadError(
            f'{where}: {name!r} has dtype {dtype_name!r}, which this reader does not know '
            f'(known: {", ".join(DTYPES)}).'
        )
    want = math.prod(shape) * DTYPES[dtype_name].itemsize
    if end - begin != want or begin < 0:
        raise SourceReadError(
            f'{where}: the header says {name!r} is {dtype_name}{list(shape)} ({want} bytes) but '
            f'gives it bytes {begin}..{end} ({end - begin} bytes); the header lies.'
        )
    if data_size is not None and end > data_size:
        raise SourceReadError(
            f'{where} is truncated: {name!r} needs data bytes up to {end}, but the file holds '
            f'{data_size} after its header.'
        )
    return int(end)


def _source_of(name: str, info: Mapping[str, Any]) -> Source:
    shape = tuple(int(n) for n in info['shape'])
    return Source(name_to_key(name), shape, DTYPES[info['dtype']], None, 'jax.Array', True)
