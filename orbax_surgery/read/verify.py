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
(`export_checksums.block_shape`: contiguous blocks of at most 4 MiB, whole rows
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
import dataclasses
from collections.abc import Collection, Mapping

import numpy as np

from orbax_surgery import locations
from orbax_surgery.arrays import regions
from orbax_surgery.arrays.expr import Source
from orbax_surgery.arrays.regions import Region
from orbax_surgery.errors import ChecksumMismatchError, SourceReadError
from orbax_surgery.keys import KeyPath
from orbax_surgery.read.checksum_records import (
    CHECKSUMS_DIR,
    HOW_TO_RECORD,
    BlockId,
    Record,
    checksums_directory,
    digest,
    read_records,
)
from orbax_surgery.read.session import chunk_pieces, chunk_region, local_region
from orbax_surgery.sources.file_reads import open_file
from orbax_surgery.sources.orbax_checkpoint import OrbaxCheckpoint
from orbax_surgery.sources.safetensors import INDEX_FILE, SafetensorsCheckpoint
from orbax_surgery.sources.source import ArraySource, key_region


class Verified:
    """A source whose every read is checked against the checksums saved with it.

    `arrays` report the recorded block grid as each array's chunk shape, so a
    restore's `Session` reads each block once per host; `read` reads the
    blocks a region touches whole, hashes each, and serves the region only if
    all match. `bytes_read` counts the bytes of blocks read.

    Example:
        >>> import tempfile, orbax.checkpoint as ocp, orbax_surgery as osurg
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
        self._where = (
            locations.shown(source.location)
            if isinstance(source, SafetensorsCheckpoint)
            else source.directory
        )
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
                    f'checksums, or its {CHECKSUMS_DIR}/ files are incomplete. {HOW_TO_RECORD}'
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
        >>> from orbax_surgery.huggingface.export import save_safetensors
        >>> tree = {'w': np.ones(3, np.float32)}
        >>> out = save_safetensors(tree, tempfile.mkdtemp() + '/hf', checksums=True)
        >>> source = verified(SafetensorsCheckpoint(out.directory))
        >>> osurg.restore(source, {'w': ...})['w'].tolist(), source.bytes_read
        ([1.0, 1.0, 1.0], 12)
    """
    if isinstance(source, Verified):
        return source
    if isinstance(source, SafetensorsCheckpoint):
        index = open_file(locations.join(source.directory, INDEX_FILE))
        shard = source.location.endswith('.safetensors') and index.exists()
        return Verified(source, read_records(checksums_directory(source)), only_listed=shard)
    if not isinstance(source, OrbaxCheckpoint):
        raise SourceReadError(
            f'verify=True checks Orbax checkpoints and safetensors exports saved with '
            f'checksums=True; {source!r} carries no checksums. {HOW_TO_RECORD}'
        )
    return Verified(source, read_records(source.directory))
