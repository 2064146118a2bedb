"""In-memory trees as a source: NumPy arrays, scalars and live (sharded) jax.Arrays."""

from __future__ import annotations

import collections
from collections.abc import Collection
from typing import Any

import jax
import numpy as np

from orbax_surgery.arrays import regions
from orbax_surgery.arrays.expr import Kind, Source
from orbax_surgery.arrays.prng_keys import is_key_array, key_impl_name
from orbax_surgery.arrays.regions import Region
from orbax_surgery.errors import SourceReadError
from orbax_surgery.keys import KeyPath, PyTree, Skeleton, flatten
from orbax_surgery.sources.source import key_region


class TreeSource:
    """An in-memory tree of arrays, read like a checkpoint; counts bytes read.

    A `jax.Array` is read from this process's own shards, never gathered, so
    a tree sharded over several processes works as a source where each
    process reads only what it holds (asking for more is a `SourceReadError`).

    Example:
        >>> import numpy as np
        >>> src = TreeSource({'w': np.arange(6.0).reshape(2, 3)})
        >>> src.arrays['w'].shape
        (2, 3)
    """

    def __init__(self, tree: PyTree):
        flat, treedef = flatten(tree)
        skeleton = Skeleton(treedef, tuple(flat))
        self.values: dict[KeyPath, Any] = {}
        self.arrays: dict[KeyPath, Source] = {}
        for key, value in flat.items():
            if value is None:
                continue
            impl = None
            if is_key_array(value):  # Typed PRNG keys are read as their key data.
                impl, value = key_impl_name(value.dtype), jax.random.key_data(value)
            self.values[key] = value
            self.arrays[key] = _source_of_value(key, value, skeleton, impl)
        self.bytes_read: collections.Counter[KeyPath] = collections.Counter()

    async def open(self, keys: Collection[KeyPath]) -> None:
        return None

    async def read(self, source: Source, region: Region) -> np.ndarray:
        value = self.values[source.key]
        if isinstance(value, jax.Array):
            block = _from_shards(source, value, region)
        elif isinstance(value, str):
            block = np.asarray(value, dtype=object)
        else:
            block = np.asarray(regions.take(np.asarray(value), region))
        self.bytes_read[source.key] += block.nbytes
        return block


def _from_shards(source: Source, value: jax.Array, region: Region) -> np.ndarray:
    """`region` of a live jax.Array, copied from the shards this process holds."""
    ascending, flips = regions.split_ascending(region)
    out = np.empty(regions.shape_of(ascending), source.dtype)
    filled = 0
    shards: dict[Region, Any] = {}
    for shard in value.addressable_shards:
        shards.setdefault(regions.from_index(shard.index, value.shape), shard)
    for box, shard in shards.items():
        inside = regions.clip(ascending, box)
        if inside is None:
            continue
        local = tuple(
            range(r.start - b.start, r.stop - b.start, r.step)
            for r, b in zip(inside, box, strict=True)
        )
        at = tuple(regions.positions(r, a) for r, a in zip(inside, ascending, strict=True))
        out[at] = _shard_part(shard.data, local)
        filled += regions.size_of(inside)
    if filled != out.size:
        raise SourceReadError(
            f'Process {jax.process_index()} holds only part of {key_region(source.key, region)} '
            f'of the live jax.Array {source.key!r} (sharded {value.sharding}); a tree in memory '
            'is read from local shards only, never gathered across processes. Save it first, '
            'or choose rules and a target whose shards need only local data.'
        )
    return np.flip(out, flips) if flips else out


def _shard_part(data: jax.Array, region: Region) -> np.ndarray:
    """A region of one device's shard on the host: a view on CPU, else a copy of just it."""
    if all(d.platform == 'cpu' for d in data.devices()):
        return regions.take(np.asarray(data), region)
    return np.asarray(data[tuple(regions.to_slice(r) for r in region)])


def _source_of_value(key: KeyPath, value: Any, skeleton: Skeleton, key_impl: str | None) -> Source:
    kind: Kind
    if isinstance(value, jax.Array):
        kind = 'jax.Array'
    elif isinstance(value, np.ndarray | np.generic):
        kind = 'np.ndarray'
    else:
        kind = 'scalar'
    if isinstance(value, str):  # As Orbax's string leaves: one object each.
        return Source(key, (), np.dtype(object), None, 'scalar', skeleton=skeleton)
    array = value if hasattr(value, 'dtype') else np.asarray(value)
    shape, dtype = tuple(np.shape(array)), np.dtype(array.dtype)
    return Source(key, shape, dtype, None, kind, skeleton=skeleton, key_impl=key_impl)
