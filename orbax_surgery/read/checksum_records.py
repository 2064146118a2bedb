"""Checksum records: what a save with `checksums=True` wrote, and how to read it back.

Each process of a save writes `_CHECKSUMS/process_<i>.json`: per array its shape,
stored dtype, block grid and a BLAKE2b-128 digest of each block it wrote. The
guarantee a verified restore gives is in `orbax_surgery.read.verify`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from orbax_surgery.errors import SourceReadError
from orbax_surgery.keys import KeyPath
from orbax_surgery.sources.safetensors import SafetensorsCheckpoint

CHECKSUMS_DIR = '_CHECKSUMS'
ALGORITHM = 'blake2b-128'
FORMAT_VERSION = 1
HOW_TO_RECORD = (
    'Record them when saving: SurgerySave(..., checksums=True), LoraSave(..., checksums=True), '
    'save_safetensors(..., checksums=True) or `orbax-surgery convert --checksums` (with or '
    'without --to safetensors).'
)
BlockId = tuple[int, ...]


def digest(block: np.ndarray) -> str:
    """The hex BLAKE2b-128 digest of an array's values, in C order.

    Example:
        >>> digest(np.zeros(2, np.float32)) == digest(np.zeros((1, 2), np.float32))
        True
    """
    data = np.ascontiguousarray(block).reshape(-1).view(np.uint8)
    return hashlib.blake2b(data.data, digest_size=16).hexdigest()


@dataclasses.dataclass(frozen=True)
class Record:
    """What a save recorded of one array.

    Attributes:
        shape: The array's shape.
        dtype: The stored dtype's name.
        block_shape: The grid the array was hashed in (the last block of an
            axis may be smaller).
        blocks: Each block's digest, by its position in the grid.
    """

    shape: tuple[int, ...]
    dtype: str
    block_shape: tuple[int, ...]
    blocks: dict[BlockId, str]

    def to_json(self) -> dict[str, Any]:
        return {
            'shape': list(self.shape),
            'dtype': self.dtype,
            'block_shape': list(self.block_shape),
            'blocks': {'.'.join(map(str, b)): d for b, d in sorted(self.blocks.items())},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Record:
        blocks = {
            tuple(int(i) for i in b.split('.')) if b else (): str(d)
            for b, d in data['blocks'].items()
        }
        return cls(
            tuple(int(n) for n in data['shape']),
            str(data['dtype']),
            tuple(int(n) for n in data['block_shape']),
            blocks,
        )

    @property
    def grid_size(self) -> int:
        """How many blocks the grid has."""
        pairs = zip(self.shape, self.block_shape, strict=True)
        return math.prod(-(-n // max(b, 1)) for n, b in pairs)


def checksums_directory(source: SafetensorsCheckpoint) -> str:
    """Where the checksums of safetensors files are: `_CHECKSUMS/` in the files' directory."""
    return source.directory


def read_records(directory: epath.PathLike) -> dict[KeyPath, Record]:
    """The checksums all processes recorded for the checkpoint item at `directory`.

    Raises:
        SourceReadError: none were recorded, or a record is unreadable or
            contradicts another.
    """
    if str(directory).startswith(('http://', 'https://')):
        raise SourceReadError(
            f'{directory} is served over HTTP, where checksum files cannot be listed; verify=True '
            'reads local, gs:// and s3:// checkpoints.'
        )
    directory = epath.Path(directory)
    folder = directory / CHECKSUMS_DIR
    if not folder.is_dir():
        raise SourceReadError(
            f'{directory} holds no checksums ({CHECKSUMS_DIR}/ is missing), so verify=True cannot '
            f'check it: it was saved without checksums. {HOW_TO_RECORD}'
        )
    merged: dict[KeyPath, Record] = {}
    files = sorted(folder.glob('process_*.json'))
    if not files:
        raise SourceReadError(f'{folder} holds no process_<i>.json checksum file. {HOW_TO_RECORD}')
    for file in files:
        try:
            data = json.loads(file.read_text())
            if data.get('algorithm') != ALGORITHM:
                raise ValueError(f'unknown algorithm {data.get("algorithm")!r}')
            records = {k: Record.from_json(v) for k, v in data['arrays'].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise SourceReadError(f'The checksum file {file} is damaged: {e}') from e
        for key, record in records.items():
            seen = merged.get(key)
            if seen is None:
                merged[key] = record
                continue
            same = (seen.shape, seen.dtype, seen.block_shape)
            if same != (record.shape, record.dtype, record.block_shape) or any(
                seen.blocks.get(b, d) != d for b, d in record.blocks.items()
            ):
                raise SourceReadError(
                    f'The checksum files in {folder} disagree about {key!r} ({file.name}).'
                )
            merged[key] = dataclasses.replace(seen, blocks={**seen.blocks, **record.blocks})
    return merged
