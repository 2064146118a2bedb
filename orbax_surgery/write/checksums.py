"""Recording checksums while saving: each process hashes the blocks it writes.

The blocks are what each process writes (replica 0 of each of its shards of a
`jax.Array`, cut where save args make Orbax cut them into chunks; the whole array
for NumPy leaves and scalars, on process 0), so each process hashes only what it
writes, and writes `_CHECKSUMS/process_<i>.json` into the item directory before
Orbax finalizes it. Plain Orbax restores such a directory as before.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.arrays import subchunking

from orbax_surgery.arrays import regions
from orbax_surgery.arrays.regions import Region
from orbax_surgery.keys import KeyPath, PyTree, flatten
from orbax_surgery.read.checksum_records import (
    ALGORITHM,
    CHECKSUMS_DIR,
    FORMAT_VERSION,
    BlockId,
    Record,
    digest,
)
from orbax_surgery.read.session import chunk_region


class Recorder:
    """Digests of the blocks this process saves, written beside Orbax's files.

    Example:
        >>> recorder = Recorder()
        >>> recorder.add('w', np.arange(4.0))
        >>> recorder.records['w'].blocks == {(0,): digest(np.arange(4.0))}
        True
    """

    def __init__(self):
        self.records: dict[KeyPath, Record] = {}

    def add_tree(self, tree: PyTree, save_args: PyTree | None = None) -> None:
        """Records every array leaf of `tree` (saved with `save_args`, Orbax's tree)."""
        flat, _ = flatten(tree)
        args: dict[KeyPath, Any] = {}
        if save_args is not None:
            args = flatten(save_args, is_leaf=lambda x: x is None or isinstance(x, ocp.SaveArgs))[0]
        for key, value in flat.items():
            self.add(key, value, args.get(key))

    def add(self, key: KeyPath, value: Any, save_args: ocp.SaveArgs | None = None) -> None:
        """Records one saved leaf: the blocks of it this process writes."""
        if isinstance(value, str | bytes) or value is None:
            return  # Strings are not covered (see the module docstring).
        dtype = getattr(save_args, 'dtype', None)
        if isinstance(value, jax.Array):
            shape = tuple(value.shape)
            stored = np.dtype(dtype or value.dtype)
            write_shape = tuple(value.sharding.shard_shape(value.shape))
            block_shape = _block_shape(shape, write_shape, stored, save_args)
            parts: dict[BlockId, np.ndarray] = {}
            for shard in value.addressable_shards:
                if shard.replica_id != 0:
                    continue  # Orbax writes replica 0 of each shard; so its process hashes it.
                data = np.asarray(shard.data).astype(stored, copy=False)
                region = regions.from_index(shard.index, shape)
                parts |= _blocks(data, region, shape, block_shape)
        else:
            if jax.process_index() != 0:
                return  # Host values are written by the primary process alone.
            array = np.asarray(value)
            array = array.astype(np.dtype(dtype or array.dtype), copy=False)
            shape = tuple(array.shape)
            block_shape = _block_shape(shape, shape, array.dtype, save_args)
            stored = array.dtype
            parts = _blocks(array, regions.full(shape), shape, block_shape)
        self.records[key] = Record(shape, stored.name, block_shape, _digests(parts))

    def commit(self, directory: Any) -> ocp.future.Future:
        """Writes the records once Orbax has created `directory`, as its own writers do.

        Orbax may create item directories in the background; its commit
        futures wait for that, and it finalizes the directory after them.
        """
        return ocp.future.CommitFutureAwaitingContractedSignals(
            self.write(directory), name='write_checksums'
        )

    async def write(self, directory: Any) -> None:
        """Writes this process's records into `directory`, which must exist."""
        if not isinstance(directory, epath.Path) and hasattr(directory, 'await_creation'):
            directory = await directory.await_creation()  # Orbax's deferred directories.
        await asyncio.to_thread(self.write_now, epath.Path(directory))

    def write_now(self, directory: epath.Path) -> None:
        """Writes this process's records into `directory`, blocking."""
        folder = directory / CHECKSUMS_DIR
        data = {
            'format': FORMAT_VERSION,
            'algorithm': ALGORITHM,
            'arrays': {k: r.to_json() for k, r in sorted(self.records.items())},
        }
        folder.mkdir(exist_ok=True)
        (folder / f'process_{jax.process_index()}.json').write_text(
            json.dumps(data, separators=(',', ':'))
        )


def _block_shape(
    shape: tuple[int, ...], write_shape: tuple[int, ...], dtype: np.dtype, save_args: Any
) -> tuple[int, ...]:
    """Each written shard cut where Orbax cuts it into storage chunks, if save args say so."""
    chunk_bytes = getattr(save_args, 'chunk_byte_size', None)
    shard_axes = tuple(getattr(save_args, 'shard_axes', None) or ())
    if not shape or 0 in shape or (chunk_bytes is None and not shard_axes):
        return write_shape
    chosen = subchunking.choose_chunk_shape(
        shape, write_shape, dtype, chunk_bytes, shard_axes=shard_axes
    )
    return tuple(int(n) for n in chosen)


def _blocks(
    data: np.ndarray, region: Region, shape: tuple[int, ...], block_shape: tuple[int, ...]
) -> dict[BlockId, np.ndarray]:
    """The blocks inside `region`, whose values are `data`, by position (views)."""
    if 0 in shape:
        return {}
    parts = {}
    for block in regions.chunk_cover(region, block_shape):
        where = chunk_region(block, shape, block_shape)
        local = tuple(
            slice(w.start - r.start, w.stop - r.start) for w, r in zip(where, region, strict=True)
        )
        parts[block] = data[local]
    return parts


def _digests(parts: Mapping[BlockId, np.ndarray]) -> dict[BlockId, str]:
    if len(parts) <= 1:
        return {block: digest(part) for block, part in parts.items()}
    # hashlib releases the GIL, so the blocks of a shard are hashed in parallel.
    with concurrent.futures.ThreadPoolExecutor(min(len(parts), os.cpu_count() or 1)) as pool:
        return dict(zip(parts, pool.map(digest, parts.values()), strict=True))
