"""Hugging Face safetensors files as a lazy source: headers up front, bytes on demand.

A safetensors file is an 8-byte little-endian header size, a JSON header
(`{name: {dtype, shape, data_offsets}}` and an optional `__metadata__`), then
each tensor's raw C-order bytes. Opening reads only the headers (of every
shard named by `model.safetensors.index.json`) and checks them against the
files. Reading a region reads just its bytes: one positioned read when the
region is contiguous in the file, a few when it spans a few runs, else a
gather through a memory map of the span it covers, unmapped right after.

Keys are the tensor names with '.' turned into '/', so the same rules serve
Orbax and Hugging Face checkpoints: `model.layers.0.mlp.up_proj.weight` is
`model/layers/0/mlp/up_proj/weight`.
"""

from __future__ import annotations

import asyncio
import json
import math
import mmap
import os
import struct
import weakref
from collections.abc import Collection, Mapping
from typing import Any

import ml_dtypes
import numpy as np
from etils import epath

from orbax_surgery.arrays import regions
from orbax_surgery.arrays.expr import Source
from orbax_surgery.arrays.regions import Region, Shape
from orbax_surgery.errors import CheckpointNotFoundError, SourceReadError
from orbax_surgery.keys import KeyPath, did_you_mean

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
_FEW_RUNS = 64


def is_safetensors(path: epath.PathLike) -> bool:
    """Whether `path` is a safetensors file, or a directory or index holding them."""
    p = epath.Path(path)
    named = p.name.endswith('.safetensors') or p.name.endswith('.safetensors.index.json')
    if p.is_file() or (named and p.is_dir() and not (p / '_METADATA').exists()):
        return named  # A directory in place of the file is then reported as such.
    return p.is_dir() and ((p / INDEX_FILE).exists() or (p / SINGLE_FILE).exists())


class SafetensorsCheckpoint:
    """A single `.safetensors` file, or a sharded checkpoint with its index, read lazily.

    Args:
        path: A `.safetensors` file, a `*.safetensors.index.json`, or a
            directory holding `model.safetensors` or `model.safetensors.index.json`.

    Attributes:
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
        self.path = epath.Path(path)
        self.metadata: dict[str, dict[str, str]] = {}
        self.arrays: dict[KeyPath, Source] = {}
        self._where: dict[KeyPath, tuple[str, int]] = {}
        self._fds: dict[str, int] = {}
        weakref.finalize(self, _close_all, self._fds)
        self.bytes_read = 0
        files, expected = _files(self.path)
        for file in files:
            try:
                header, data_start = _read_header(file)
            except SourceReadError as e:
                held = [n for n, f in expected.items() if f == file]
                if not held:
                    raise
                raise SourceReadError(
                    f'{e} {INDEX_FILE} says it holds {len(held)} tensors, e.g. {held[0]!r}.'
                ) from e
            self.metadata[file.name] = header.pop('__metadata__', None) or {}
            for name, info in header.items():
                source = _source_of(file, name, info, data_start)
                if source.key in self.arrays:
                    raise SourceReadError(
                        f'Tensor {name!r} is in two files: {self._where[source.key][0]} and {file}.'
                    )
                self.arrays[source.key] = source
                begin = int(info['data_offsets'][0])
                self._where[source.key] = (str(file), data_start + begin)
        for name, file in expected.items():
            key = name_to_key(name)
            if key not in self.arrays:
                raise SourceReadError(
                    f'{INDEX_FILE} puts {name!r} in {file}, but that file has no such tensor.'
                    f'{did_you_mean(key, self.arrays)}'
                )

    def __repr__(self):
        return f'SafetensorsCheckpoint({str(self.path)!r}, {len(self.arrays)} tensors)'

    async def open(self, keys: Collection[KeyPath]) -> None:
        for key in keys:
            file = self._where[key][0]
            try:
                self._fd(file)
            except OSError as e:
                raise SourceReadError(f'Cannot open {file}, which holds {key!r}: {e}') from e

    async def read(self, source: Source, region: Region) -> np.ndarray:
        return await asyncio.to_thread(self.read_now, source, region)

    def read_now(self, source: Source, region: Region) -> np.ndarray:
        """Reads one region of one tensor, blocking."""
        file, offset = self._where[source.key]
        ascending, flips = regions.split_ascending(region)
        try:
            block = _read_region(self._fd(file), offset, source.shape, source.dtype, ascending)
        except (OSError, ValueError) as e:
            raise SourceReadError(
                f'Reading {source.key!r} from {file} failed (was the file changed after it '
                f'was opened?): {e}'
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
        return f'{file}, bytes {first}..{last}'

    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(file, os.O_RDONLY)
        return fd

    def close(self) -> None:
        """Closes the files (reading again reopens them)."""
        _close_all(self._fds)


def _close_all(fds: dict[str, int]) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()


def name_to_key(name: str) -> KeyPath:
    """A tensor name as a key path: `a.b.0.weight` -> `a/b/0/weight`."""
    return name.replace('.', '/')


def key_to_name(key: KeyPath) -> str:
    """A key path as a tensor name: `a/b/0/weight` -> `a.b.0.weight`."""
    return key.replace('/', '.')


def _files(path: epath.Path) -> tuple[list[epath.Path], dict[str, epath.Path]]:
    """The files to open, and the tensor -> file map an index promises."""
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
            return [path / SINGLE_FILE], {}
        else:
            found = sorted(p.name for p in path.iterdir() if p.name.endswith('.safetensors'))
            raise CheckpointNotFoundError(
                f'{path} holds neither {SINGLE_FILE} nor {INDEX_FILE}'
                + (f'; it has {found[:5]}: pass one of them.' if found else '.')
            )
    if not path.name.endswith('.index.json'):
        return [path], {}
    try:
        index = json.loads(path.read_text())
        weight_map: Mapping[str, str] = index['weight_map']
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SourceReadError(f'{path} is not a safetensors index (no "weight_map"): {e}') from e
    files = {name: path.parent / file for name, file in weight_map.items()}
    missing = sorted({str(f) for f in files.values() if not f.exists()})
    if missing:
        names = [n for n, f in files.items() if str(f) == missing[0]]
        raise CheckpointNotFoundError(
            f'{INDEX_FILE} names {len(missing)} missing shard file(s), first {missing[0]}, '
            f'which should hold {len(names)} tensors (e.g. {names[0]!r}).'
        )
    return sorted(set(files.values()), key=str), files


def _read_header(file: epath.Path) -> tuple[dict[str, Any], int]:
    if file.is_dir():
        raise SourceReadError(f'{file} is a directory, not a safetensors file.')
    try:
        size = os.path.getsize(file)
        with open(file, 'rb') as f:
            head = f.read(8)
            if len(head) < 8:
                raise SourceReadError(f'{file} is truncated: {size} bytes, too short for a header.')
            (n,) = struct.unpack('<Q', head)
            if n > min(size - 8, _MAX_HEADER_BYTES):
                raise SourceReadError(
                    f'{file} says its header is {n} bytes, but the file has {size} bytes: it is '
                    'truncated or not a safetensors file.'
                )
            raw = f.read(n)
    except OSError as e:
        raise SourceReadError(f'Cannot read the header of {file}: {e}') from e
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise SourceReadError(f'{file} has a header that is not JSON: {e}') from e
    if not isinstance(header, dict):
        raise SourceReadError(f'{file} has a header that is not a JSON object.')
    data_start = 8 + n
    for name, info in header.items():
        if name == '__metadata__':
            continue
        _check_entry(file, name, info, size - data_start)
    return header, data_start


def _check_entry(file: epath.Path, name: str, info: Any, data_size: int) -> None:
    try:
        dtype_name, shape, (begin, end) = info['dtype'], info['shape'], info['data_offsets']
    except (KeyError, TypeError, ValueError) as e:
        raise SourceReadError(f'{file}: the header entry of {name!r} is malformed: {info!r}') from e
    if dtype_name not in DTYPES:
        raise SourceReadError(
            f'{file}: {name!r} has dtype {dtype_name!r}, which this reader does not know '
            f'(known: {", ".join(DTYPES)}).'
        )
    want = math.prod(shape) * DTYPES[dtype_name].itemsize
    if end - begin != want or begin < 0:
        raise SourceReadError(
            f'{file}: the header says {name!r} is {dtype_name}{list(shape)} ({want} bytes) but '
            f'gives it bytes {begin}..{end} ({end - begin} bytes); the header lies.'
        )
    if end > data_size:
        raise SourceReadError(
            f'{file} is truncated: {name!r} needs data bytes up to {end}, but the file holds '
            f'{data_size} after its header.'
        )


def _source_of(file: epath.Path, name: str, info: Mapping[str, Any], data_start: int) -> Source:
    del file, data_start
    shape = tuple(int(n) for n in info['shape'])
    return Source(name_to_key(name), shape, DTYPES[info['dtype']], None, 'jax.Array', True)


def _read_region(fd: int, offset: int, shape: Shape, dtype: np.dtype, region: Region) -> np.ndarray:
    """Reads an ascending region of a C-order array stored at `offset` in `fd`."""
    out_shape = regions.shape_of(region)
    out = np.empty(out_shape, dtype)
    if out.size == 0:
        return out
    itemsize = dtype.itemsize
    strides = [itemsize * math.prod(shape[a + 1 :]) for a in range(len(shape))]
    # Axes after `inner` are whole, so each run covers `inner`'s range (if unit-step) and them.
    inner = len(shape) - 1
    while inner >= 0 and region[inner] == range(shape[inner]):
        inner -= 1
    if inner < 0:
        _pread_into(fd, out, offset)
        return out
    r = region[inner]
    if r.step == 1:
        outer = region[:inner]
        n_runs = math.prod(len(x) for x in outer)
        start = offset + r.start * strides[inner]
        if n_runs <= _FEW_RUNS:
            flat = out.reshape(n_runs, -1)
            for i, index in enumerate(np.ndindex(*(len(x) for x in outer))):
                at = start + sum(x[j] * s for x, j, s in zip(outer, index, strides, strict=False))
                _pread_into(fd, flat[i], at)
            return out
    return _gather(fd, offset, shape, dtype, region, strides)


def _pread_into(fd: int, out: np.ndarray, at: int) -> None:
    view = out.reshape(-1).view(np.uint8).data
    got = os.preadv(fd, [view], at)
    while got < len(view):
        more = os.preadv(fd, [view[got:]], at + got)
        if more == 0:
            raise ValueError(f'the file ended {len(view) - got} bytes short at offset {at + got}')
        got += more


def _gather(
    fd: int, offset: int, shape: Shape, dtype: np.dtype, region: Region, strides: list[int]
) -> np.ndarray:
    """Many runs: copy them out of a memory map of just the span they cover."""
    first = offset + sum(r.start * s for r, s in zip(region, strides, strict=True))
    last = offset + sum(r[-1] * s for r, s in zip(region, strides, strict=True)) + dtype.itemsize
    page = mmap.ALLOCATIONGRANULARITY
    base = first - first % page
    with mmap.mmap(fd, last - base, access=mmap.ACCESS_READ, offset=base) as mm:
        view = np.ndarray(
            regions.shape_of(region),
            dtype,
            buffer=mm,
            offset=first - base,
            strides=tuple(s * r.step for s, r in zip(strides, region, strict=True)),
        )
        out = view.copy()
        del view
    return out
