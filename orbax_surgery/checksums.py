"""Opt-in checksums of saved arrays: recorded when a checkpoint is saved, checked on restore.

Orbax's storage carries no checksum of array data: zarr chunks are zstd
frames without a content checksum, and OCDBT checksums its manifest and
b-tree nodes but not the values they point to. A flipped bit in stored data
can restore as a wrong number, silently. Saving with `checksums=True`
(`SurgerySave`, `LoraSave`, `orbax-surgery convert --checksums`) records, for
every saved array, its shape, stored dtype, a block grid and a BLAKE2b-128
digest of each block's values (C order, stored dtype). The blocks are what
each process writes (replica 0 of each of its shards of a `jax.Array`, cut
where save args make Orbax cut them into chunks; the whole array for NumPy leaves
and scalars, on process 0), so each process hashes only what it writes, and
writes `_CHECKSUMS/process_<i>.json` into the item directory before Orbax
finalizes it. Plain Orbax restores such a directory as before.

Exporting safetensors with `checksums=True` (`save_safetensors`, `orbax-surgery
convert --to safetensors --checksums`) records the same, in the same format,
for every tensor: its grid is fixed by shape and dtype alone
(`safetensors_checksums.block_shape`: contiguous blocks of at most 4 MiB, whole rows
along axis 0 unless a row is larger; the whole tensor if smaller; 0-d tensors
whole), not by how processes split the writes. Once every process has
written its bytes, each reads back its share of the blocks (block j of all,
in file, header and C order, to process j % count) from the unfinalized
files, hashes them and writes `_CHECKSUMS/process_<i>.json` beside them; after
one more barrier process 0 finalizes the directory. `_CHECKSUMS/` is in the
directory that holds the files (the export's directory), so a single file's
checksums are in its directory; `safetensors` and `transformers` ignore it.

Restoring with `verify=True` (`SurgeryRestore`, `restore`, `LoraRestore`,
`orbax-surgery convert --verify`) reads through `Verified`: every block any
read touches is read whole, hashed and compared before any of it is used, so
a restore reads whole blocks (each once per host, as `Session` shares them).

The guarantee, exactly (a restore with `verify=True` of a checkpoint saved
with `checksums=True`):
    Detected, as `ChecksumMismatchError` naming the checkpoint, key, block,
    region and (where the block is one stored chunk, and always for
    safetensors) its file: any change to the values of a block the restore
    reads that still decodes (flipped bits in zstd-compressed or uncompressed
    chunks and in OCDBT data files, a chunk replaced by another valid one;
    for safetensors, any changed byte of a tensor's data), unless the changed block's
    BLAKE2b-128 digest collides: at most 2**-128 per changed block for
    accidental damage. Also a stored shape or dtype other than the one
    recorded, records missing for a key or a block (a lost process file),
    and records for keys the checkpoint does not list. Damage that breaks
    decoding raises `SourceReadError`, with or without checksums.
    Not detected: blocks the restore does not read (each host checks only
    what its shards need, but whole blocks); string leaves (not hashed);
    metadata the values read do not depend on (`custom_metadata`, such as a
    LoRA layout's alpha, `_sharding`; for safetensors, `__metadata__`, the
    index's `metadata`, bytes between or after tensors, and which file holds
    a tensor); data and `_CHECKSUMS/` rewritten together (a digest is no
    signature); bytes that changed before the export read them back (a
    digest records what was on disk after the 'written' barrier); anything
    with `verify=False`, the default. A safetensors header that contradicts
    the records (shape, dtype) is a `ChecksumMismatchError`; one that no
    longer parses is a `SourceReadError`. `verify=True` refuses, as
    `SourceReadError`, checkpoints and safetensors saved without checksums.
    One shard file of an indexed set opened alone is checked for its own
    tensors only.

Costs: hashing runs at about 0.8 GB/s per core, in threads. Blocks are read
whole, so a partial read decodes and holds its whole blocks; file bytes read
stay the same while the grid is the storage chunk grid (the default, and with
`layer_axes`), but a shard that Orbax cuts into several chunks only because
it exceeds OCDBT's target data file size (2 GiB; 400 MiB on GCS) is one
block, read whole by a verified partial read. A safetensors export reads
back and hashes every byte once more, spread over the processes; a verified
safetensors read reads whole 4 MiB blocks, each once per host, where an
unverified one reads just its bytes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Collection, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.arrays import subchunking

from orbax_surgery import regions
from orbax_surgery.errors import ChecksumMismatchError, SourceReadError
from orbax_surgery.expr import Source
from orbax_surgery.keys import KeyPath, PyTree, flatten
from orbax_surgery.regions import Region
from orbax_surgery.safetensors import INDEX_FILE, SafetensorsCheckpoint
from orbax_surgery.session import chunk_pieces, chunk_region, local_region
from orbax_surgery.sources import ArraySource, OrbaxCheckpoint, key_region

CHECKSUMS_DIR = '_CHECKSUMS'
ALGORITHM = 'blake2b-128'
_FORMAT = 1
_HOW = (
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
            'format': _FORMAT,
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


def checksums_directory(source: SafetensorsCheckpoint) -> epath.Path:
    """Where the checksums of safetensors files are: `_CHECKSUMS/` in the files' directory."""
    return source.path if source.path.is_dir() else source.path.parent


def read_records(directory: epath.PathLike) -> dict[KeyPath, Record]:
    """The checksums all processes recorded for the checkpoint item at `directory`.

    Raises:
        SourceReadError: none were recorded, or a record is unreadable or
            contradicts another.
    """
    directory = epath.Path(directory)
    folder = directory / CHECKSUMS_DIR
    if not folder.is_dir():
        raise SourceReadError(
            f'{directory} holds no checksums ({CHECKSUMS_DIR}/ is missing), so verify=True cannot '
            f'check it: it was saved without checksums. {_HOW}'
        )
    merged: dict[KeyPath, Record] = {}
    files = sorted(folder.glob('process_*.json'))
    if not files:
        raise SourceReadError(f'{folder} holds no process_<i>.json checksum file. {_HOW}')
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


class Verified:
    """A source whose every read is checked against the checksums saved with it.

    `arrays` report the recorded block grid as each array's chunk shape, so a
    restore's `Session` reads each block once per host; `read` reads the
    blocks a region touches whole, hashes each, and serves the region only if
    all match. `bytes_read` counts the bytes of blocks read.

    Example:
        >>> import tempfile, orbax_surgery as osurg
        >>> path = tempfile.mkdtemp() + '/ckpt'
        >>> with ocp.Checkpointer(osurg.SurgeryCheckpointHandler()) as ckptr:
        ...     ckptr.save(path, args=osurg.SurgerySave(item={'w': np.ones(4)}, checksums=True))
        >>> source = verified(OrbaxCheckpoint(path))
        >>> osurg.materialize(osurg.resolve(source.arrays, None), source)['w'].tolist()
        [1.0, 1.0, 1.0, 1.0]
    """

    def __init__(
        self,
        source: OrbaxCheckpoint | SafetensorsCheckpoint,
        records: Mapping[KeyPath, Record],
        *,
        only_listed: bool = False,
    ):
        self.source = source
        self.bytes_read = 0
        self._where = source.path if isinstance(source, SafetensorsCheckpoint) else source.directory
        self._records: dict[KeyPath, Record] = {}
        self.arrays: dict[KeyPath, Source] = {}
        for key, src in source.arrays.items():
            if src.dtype == object:
                self.arrays[key] = src
                continue
            record = records.get(key)
            if record is None:
                raise SourceReadError(
                    f'{self._where} has no checksum recorded for {key!r}: it was saved without '
                    f'checksums, or its {CHECKSUMS_DIR}/ files are incomplete. {_HOW}'
                )
            self._check_record(src, record)
            self._records[key] = record
            self.arrays[key] = dataclasses.replace(
                src, chunk_shape=record.block_shape, byte_ranges=False
            )
        extra = sorted(set(records) - set(self._records))
        if extra and not only_listed:
            raise ChecksumMismatchError(
                f'{self._where}: checksums were recorded for {len(extra)} arrays the checkpoint '
                f'does not list, e.g. {extra[0]!r}: its _METADATA does not match what was saved.'
            )

    def __repr__(self):
        return f'Verified({self.source!r})'

    def _check_record(self, src: Source, record: Record) -> None:
        if (tuple(src.shape), src.dtype.name) != (record.shape, record.dtype):
            raise ChecksumMismatchError(
                f'{self._where}: {src.key!r} is stored as {src.dtype.name}{list(src.shape)}, but '
                f'was saved as {record.dtype}{list(record.shape)}.'
            )
        if len(record.blocks) != record.grid_size and 0 not in record.shape:
            raise SourceReadError(
                f'{self._where}: checksums of {record.grid_size - len(record.blocks)} of the '
                f'{record.grid_size} blocks of {src.key!r} are missing (a process_<i>.json file '
                f'of {CHECKSUMS_DIR}/ was lost?).'
            )

    async def open(self, keys: Collection[KeyPath]) -> None:
        await self.source.open(keys)

    def _mismatch(
        self, key: KeyPath, block: BlockId, whole: Region, region: Region
    ) -> ChecksumMismatchError:
        record, stored = self._records[key], self.source.arrays[key]
        file = ''
        if isinstance(self.source, SafetensorsCheckpoint):
            file = self.source.region_file(key, whole)
        elif stored.chunk_shape == record.block_shape:  # The block is one stored chunk.
            file = self.source.chunk_file(key, block)
        return ChecksumMismatchError(
            f'{self._where}: {key!r} block {block} {key_region(key, whole)[len(repr(key)) :]} '
            'does not match the checksum recorded when it was saved: the stored data changed'
            + (f' (stored in {file})' if file else '')
            + f'. Reading {key_region(key, region)}.'
        )

    async def read(self, source: Source, region: Region) -> np.ndarray:
        record = self._records.get(source.key)
        if record is None or regions.size_of(region) == 0:
            return await self.source.read(source, region)
        ascending, flips = regions.split_ascending(region)
        out = np.empty(regions.shape_of(ascending), source.dtype)

        async def fill(block: BlockId, at: tuple[slice, ...], sub: Region) -> None:
            whole = chunk_region(block, record.shape, record.block_shape)
            data = await self.source.read(source, whole)
            self.bytes_read += data.nbytes
            # hashlib releases the GIL: blocks are hashed in parallel, off the event loop.
            if await asyncio.to_thread(digest, data) != record.blocks[block]:
                raise self._mismatch(source.key, block, whole, region)
            out[at] = regions.take(data, local_region(sub, block, record.block_shape))

        pieces = chunk_pieces(ascending, source.shape, record.block_shape)
        await asyncio.gather(*(fill(*p) for p in pieces))
        return np.flip(out, flips) if flips else out


def verified(source: ArraySource) -> Verified:
    """`source` with every read checked against its recorded checksums.

    An Orbax checkpoint's checksums are in its item directory; safetensors
    files' are in the directory holding them (`checksums_directory`). One
    shard file of an indexed set is checked against the records of its own
    tensors; a whole set, against all records.

    Raises:
        SourceReadError: `source` carries no checksums (not an Orbax checkpoint
            or safetensors export saved with `checksums=True`).

    Example:
        >>> import tempfile, orbax_surgery as osurg
        >>> from orbax_surgery.export import save_safetensors
        >>> tree = {'w': np.ones(3, np.float32)}
        >>> out = save_safetensors(tree, tempfile.mkdtemp() + '/hf', checksums=True)
        >>> source = verified(SafetensorsCheckpoint(out.directory))
        >>> osurg.restore(source, {'w': ...})['w'].tolist(), source.bytes_read
        ([1.0, 1.0, 1.0], 12)
    """
    if isinstance(source, Verified):
        return source
    if isinstance(source, SafetensorsCheckpoint):
        path = source.path
        shard = path.name.endswith('.safetensors') and (path.parent / INDEX_FILE).exists()
        return Verified(source, read_records(checksums_directory(source)), only_listed=shard)
    if not isinstance(source, OrbaxCheckpoint):
        raise SourceReadError(
            f'verify=True checks Orbax checkpoints and safetensors exports saved with '
            f'checksums=True; {source!r} carries no checksums. {_HOW}'
        )
    return Verified(source, read_records(source.directory))
