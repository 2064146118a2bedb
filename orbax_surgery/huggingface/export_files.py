"""An export's files: which tensor goes in which file at which offset, and the writes."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from orbax_surgery.arrays.regions import Region
from orbax_surgery.errors import SurgeryError
from orbax_surgery.plan.plan import Step
from orbax_surgery.sources.safetensors import DTYPES, INDEX_FILE, SINGLE_FILE, key_to_name

_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class Tensor:
    step: Step
    name: str
    dtype: np.dtype
    file: int
    offset: int
    """Where its bytes start in its file (after the header)."""

    @property
    def nbytes(self) -> int:
        return math.prod(self.step.target.shape or ()) * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class Layout:
    names: tuple[str, ...]
    headers: tuple[bytes, ...]
    sizes: tuple[int, ...]
    tensors: tuple[Tensor, ...]

    @property
    def total_size(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def file_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    out = {'format': 'pt', **(metadata or {})}
    bad = {k: v for k, v in out.items() if not (isinstance(k, str) and isinstance(v, str))}
    if bad:
        raise SurgeryError(
            f'safetensors metadata maps strings to strings; these entries are not: {bad}. '
            'Convert them with str() or json.dumps().'
        )
    return out


def _dtype_of(step: Step, name: str) -> np.dtype:
    dtype = step.target.dtype
    assert dtype is not None, f'unresolved {step.key!r}'
    if dtype.byteorder == '>':
        dtype = dtype.newbyteorder('<')
    if dtype not in _DTYPE_NAMES:
        fix = (
            f"Cast it on purpose, with a rule after the others: Cast({step.key!r}, 'float32'), "
            f'or leave it out: Drop({step.key!r}).'
        )
        if dtype.kind not in 'biufc':
            fix = f'Leave it out with Drop({step.key!r}).'
        raise SurgeryError(
            f'{step.key!r} (tensor {name!r}, from {", ".join(step.sources) or "no source"}) has '
            f'dtype {dtype}, which safetensors cannot hold (it holds {", ".join(DTYPES)}). {fix}'
        )
    return dtype


def plan_files(steps: Sequence[Step], max_shard_size: int, metadata: dict[str, str]) -> Layout:
    """Files, headers and every tensor's offset: the same on every process."""
    named: dict[str, Step] = {}
    for step in steps:
        name = key_to_name(step.key)
        if name in named:
            raise SurgeryError(
                f'{named[name].key!r} and {step.key!r} are both tensor {name!r} once '
                "'/' becomes '.'; rename one of them."
            )
        named[name] = step
    dtypes = {name: _dtype_of(step, name) for name, step in named.items()}
    sizes = {n: math.prod(s.target.shape or ()) * dtypes[n].itemsize for n, s in named.items()}
    groups: list[list[str]] = [[]]
    used = 0
    for name in named:
        if groups[-1] and used + sizes[name] > max_shard_size:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += sizes[name]
    count = len(groups)
    names = (
        [SINGLE_FILE]
        if count == 1
        else [f'model-{i + 1:05d}-of-{count:05d}.safetensors' for i in range(count)]
    )
    tensors, headers, file_sizes = [], [], []
    for i, group in enumerate(groups):
        # Widest items first: with the header padded to 8 bytes, every tensor is aligned.
        group = sorted(group, key=lambda n: -dtypes[n].itemsize)
        header: dict[str, Any] = {'__metadata__': metadata}
        begin = 0
        for name in group:
            shape = list(named[name].target.shape or ())
            header[name] = {
                'dtype': _DTYPE_NAMES[dtypes[name]],
                'shape': shape,
                'data_offsets': [begin, begin + sizes[name]],
            }
            begin += sizes[name]
        raw = json.dumps(header, separators=(',', ':')).encode()
        raw += b' ' * (-len(raw) % 8)
        start = 8 + len(raw)
        headers.append(struct.pack('<Q', len(raw)) + raw)
        file_sizes.append(start + begin)
        for name in group:
            at = start + header[name]['data_offsets'][0]
            tensors.append(Tensor(named[name], name, dtypes[name], i, at))
    return Layout(tuple(names), tuple(headers), tuple(file_sizes), tuple(tensors))


def create_files(directory: epath.Path, layout: Layout) -> None:
    """Each file with its header, at its full size (sparse until written)."""
    for name, header, size in zip(layout.names, layout.headers, layout.sizes, strict=True):
        with open(directory / name, 'wb') as f:
            f.write(header)
            f.truncate(size)
            os.fsync(f.fileno())


def write_region(fd: int, tensor: Tensor, region: Region, data: np.ndarray) -> None:
    """Writes a C-order block of a tensor where it lies in the file: one write per run."""
    shape = tensor.step.target.shape or ()
    if not data.size:
        return
    strides = [tensor.dtype.itemsize * math.prod(shape[a + 1 :]) for a in range(len(shape))]
    flat = data.reshape(-1).view(np.uint8).data
    inner = len(shape) - 1  # Axes after `inner` are whole: each run covers them.
    while inner >= 0 and region[inner] == range(shape[inner]):
        inner -= 1
    if inner < 0:
        _pwrite_all(fd, flat, tensor.offset)
        return
    r = region[inner]
    assert r.step == 1, f'{tensor.name}: a strided block {region} cannot be written in runs'
    run = len(r) * strides[inner]
    start = tensor.offset + r.start * strides[inner]
    for i, index in enumerate(itertools.product(*region[:inner])):
        at = start + sum(x * s for x, s in zip(index, strides, strict=False))
        _pwrite_all(fd, flat[i * run : (i + 1) * run], at)


def _pwrite_all(fd: int, data: memoryview, at: int) -> None:
    done = 0
    while done < len(data):
        n = os.pwrite(fd, data[done:], at + done)
        if n <= 0:
            raise OSError(f'wrote nothing at offset {at + done} ({len(data) - done} bytes left)')
        done += n


def write_index(directory: epath.Path, layout: Layout) -> None:
    """Writes the index of a layout of several files (one file needs none)."""
    if len(layout.names) == 1:
        return
    with open(directory / INDEX_FILE, 'w') as f:
        f.write(index_text(layout))
        os.fsync(f.fileno())


def index_text(layout: Layout) -> str:
    """The `model.safetensors.index.json` of a layout: each tensor's file, and the totals."""
    weight_map = {t.name: layout.names[t.file] for t in layout.tensors}
    index = {
        'metadata': {
            'total_parameters': sum(math.prod(t.step.target.shape or ()) for t in layout.tensors),
            'total_size': layout.total_size,
        },
        'weight_map': dict(sorted(weight_map.items())),
    }
    return json.dumps(index, indent=2) + '\n'
