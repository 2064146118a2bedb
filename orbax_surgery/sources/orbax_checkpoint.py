"""Orbax PyTree checkpoint items as a source, read region by region through TensorStore."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from orbax_surgery import locations
from orbax_surgery.arrays import regions
from orbax_surgery.arrays.expr import Kind, Source
from orbax_surgery.arrays.regions import Region
from orbax_surgery.errors import SourceReadError, SurgeryError
from orbax_surgery.keys import KeyPath, Skeleton, flatten
from orbax_surgery.sources import orbax_on_s3
from orbax_surgery.sources.orbax_files import (
    checked_directory,
    key_impls,
    ocdbt_location,
    orbax_metadata,
    read_tree_file,
    stored_names,
    ts_reason,
)
from orbax_surgery.sources.source import key_region

DEFAULT_CACHE_BYTES = 0
ORBAX_READ_GAP_BYTES = 1_000_000  # What Orbax itself lets a remote read fetch in between.

orbax_on_s3.allow()  # Orbax itself reads s3:// through TensorStore's s3 driver.


class OrbaxCheckpoint:
    """An Orbax PyTree checkpoint item, opened for lazy region reads.

    Opening reads only metadata (the tree structure, shapes, dtypes, chunks),
    and opens every array's store, so that a damaged file raises
    `SourceReadError` naming it and the key before anything is planned.
    All arrays share one TensorStore context with an optional chunk cache
    (`cache_bytes`, off by default: a restore's `Session` already reads each
    chunk once and keeps it only while it is needed).

    In object storage, chunks of one OCDBT data file that are read together go
    out as few ranged requests: adjacent chunks merge, and `read_gap_bytes`
    bounds the unneeded bytes between two chunks that one request may fetch to
    save a round trip. The default 0 reads exactly the chunks a process needs;
    `ORBAX_READ_GAP_BYTES` (1 MB) is what Orbax itself allows.

    Example:
        >>> import tempfile, numpy as np
        >>> path = tempfile.mkdtemp() + '/ckpt'
        >>> with ocp.StandardCheckpointer() as ckptr:
        ...     ckptr.save(path, {'dense': {'kernel': np.ones((512, 1024), np.float32)}})
        >>> OrbaxCheckpoint(path).arrays['dense/kernel'].shape
        (512, 1024)
    """

    def __init__(
        self,
        directory: epath.PathLike,
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        read_gap_bytes: int = 0,
    ):
        if read_gap_bytes < 0:
            raise ValueError(f'read_gap_bytes must be >= 0, got {read_gap_bytes}')
        self._read_gap_bytes = read_gap_bytes
        self.directory = checked_directory(epath.Path(locations.absolute(directory)))
        tree = read_tree_file(self.directory)
        self._use_zarr3 = bool(tree.get('use_zarr3', False))
        self._use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(self.directory)
        self._ocdbt_saved = bool(tree.get('use_ocdbt', self._use_ocdbt))
        base = ocp.type_handlers.get_ts_context(use_ocdbt=self._use_ocdbt)
        self._context = ts.Context(
            ts.Context.Spec(
                {**locations.context_spec(), 'cache_pool': {'total_bytes_limit': cache_bytes}}
            ),
            parent=base,
        )
        self._stores: dict[KeyPath, ts.TensorStore] = {}
        self._remote = locations.is_url(str(self.directory))
        self._pending: ts.Batch | None = None
        self._names: dict[KeyPath, str] = stored_names(tree)
        # Orbax's metadata reader opens every array too, but stops at the first failure
        # and leaves the rest running; opened here first, each failure is named.
        self._open_now(list(self._names))
        metadata = orbax_metadata(self.directory)
        self.custom_metadata: dict[str, Any] = dict(metadata.custom_metadata or {})
        flat, treedef = flatten(metadata.tree)
        skeleton = Skeleton(treedef, tuple(flat))  # Lists as lists, as Orbax restores them.
        impls = key_impls(self.directory)
        self._strings: dict[str, Any] | None = None
        self.arrays: dict[KeyPath, Source] = {}
        for key, meta in flat.items():
            if self._names.get(key) != meta.name:
                self._stores.pop(key, None)  # Named otherwise than assumed: opened on use.
            self._names[key] = meta.name
            self.arrays[key] = _source(key, meta, skeleton, impls.get(meta.name))

    def __repr__(self):
        return f'OrbaxCheckpoint({str(self.directory)!r}, {len(self.arrays)} arrays)'

    async def open(self, keys: Collection[KeyPath]) -> None:
        todo = [k for k in keys if k not in self._stores and self.arrays[k].dtype != object]
        stores = await asyncio.gather(*(self._open_one(k) for k in todo))
        self._stores.update(zip(todo, stores, strict=True))

    def _start_open(self, key: KeyPath) -> ts.Future:
        info = ocp.type_handlers.ParamInfo(
            name=self._names[key],
            parent_dir=self.directory,
            use_zarr3=self._use_zarr3,
            is_ocdbt_checkpoint=self._use_ocdbt,
            ts_context=self._context,
        )
        spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._use_ocdbt)
        if 'experimental_read_coalescing_threshold_bytes' in spec['kvstore']:  # Remote OCDBT.
            spec['kvstore']['experimental_read_coalescing_threshold_bytes'] = self._read_gap_bytes
        return ts.open(spec, context=self._context, open=True, read=True)

    async def _open_one(self, key: KeyPath) -> ts.TensorStore:
        try:
            return await _awaited(self._start_open(key))
        except ValueError as e:
            raise self._open_error(key, e) from e

    def _open_now(self, keys: Sequence[KeyPath]) -> None:
        """Opens `keys` (all at once), waiting for every one; raises for the first failed."""
        started = [(key, self._start_open(key)) for key in keys]
        failed: list[tuple[KeyPath, ValueError]] = []
        for key, future in started:
            try:
                self._stores[key] = future.result()
            except ValueError as e:
                failed.append((key, e))
        if failed:
            key, error = failed[0]
            more = f' ({len(failed) - 1} more arrays fail to open too.)' if len(failed) > 1 else ''
            raise self._open_error(key, error, more) from error

    def _open_error(self, key: KeyPath, error: ValueError, more: str = '') -> SourceReadError:
        manifest = self.directory / 'manifest.ocdbt'
        hint = ''
        if self._ocdbt_saved and not manifest.is_file():
            hint = f'its OCDBT manifest {manifest}, which indexes all arrays, is missing: '
        return SourceReadError(
            f'Cannot open {key!r} (stored as {self._names[key]!r}) in {self.directory}; the '
            f'checkpoint is damaged or unreadable: {hint}{ts_reason(error)}{more}'
        )

    async def read(self, source: Source, region: Region) -> np.ndarray:
        if source.dtype == object:
            return np.asarray(self._string(source.key), dtype=object)
        if source.key not in self._stores:
            await self.open([source.key])
        ascending, flips = regions.split_ascending(region)
        index = tuple(regions.to_slice(r) for r in ascending)
        try:
            if self._remote:  # Reads started together go out together, fewer requests.
                block = await _awaited(self._stores[source.key][index].read(batch=self._batch()))
            else:  # Like Orbax: TensorStore copies chunks straight into a buffer we own.
                block = np.empty(regions.shape_of(ascending), source.dtype)
                await _awaited(ts.array(block).write(self._stores[source.key][index]).commit)
        except ValueError as e:
            match = re.search(r'Error reading "([^"]+)" in OCDBT database', ts_reason(e))
            where = ocdbt_location(self.directory, match[1]) if match else ''
            raise SourceReadError(
                f'Reading {key_region(source.key, region)} from {self.directory} failed; the '
                f'checkpoint is damaged or unreadable: {ts_reason(e)}'
                + (f' (stored in {where})' if where else '')
            ) from e
        return np.flip(block, flips) if flips else block

    def _batch(self) -> ts.Batch:
        """The TensorStore batch of this event-loop turn's reads, submitted at its end.

        In object storage TensorStore then reads chunks of one OCDBT data file in
        few requests instead of one each (each request costs a round trip).
        """
        if self._pending is None:
            self._pending = ts.Batch()
            asyncio.get_running_loop().call_soon(self._submit)
        return self._pending

    def _submit(self) -> None:
        batch, self._pending = self._pending, None
        if batch is not None:
            batch.submit()

    def chunk_file(self, key: KeyPath, chunk: Sequence[int]) -> str:
        """Where stored chunk `chunk` of `key` lies, for messages; '' if unknown.

        A file (zarr), or a data file and byte range (OCDBT, from its b-tree).
        """
        name = self._names[key]
        if self._use_zarr3:
            chunk_key = f'{name}/c/' + '/'.join(map(str, chunk))
        else:
            chunk_key = f'{name}/' + ('.'.join(map(str, chunk)) or '0')
        if self._use_ocdbt:
            return ocdbt_location(self.directory, chunk_key)
        return str(self.directory / chunk_key)

    def _string(self, key: KeyPath) -> Any:
        file = self.directory / '_strings.json'
        try:
            if self._strings is None:
                self._strings = json.loads(file.read_text())
            return self._strings[self._names[key]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SourceReadError(
                f'Reading the string {key!r} from {file} failed; the file is damaged or '
                f'unreadable: {type(e).__name__}: {e}'
            ) from e


def _awaited(future: ts.Future) -> asyncio.Future:
    """A TensorStore future as an asyncio one that tolerates its loop closing first.

    When one read of a restore fails, the others are cancelled and the loop
    closes; TensorStore may still finish them and call back into the closed
    loop, an error nobody can catch. Here such late results are dropped.
    """
    loop = asyncio.get_running_loop()
    out: asyncio.Future = loop.create_future()

    def settle(done: ts.Future) -> None:
        if out.done():
            return
        if done.cancelled():
            out.cancel()
        elif done.exception() is not None:
            out.set_exception(done.exception())
        else:
            out.set_result(done.result())

    def finished(done: ts.Future) -> None:
        try:
            loop.call_soon_threadsafe(settle, done)
        except RuntimeError:
            pass  # The loop closed: nobody awaits this result any more.

    future.add_done_callback(finished)
    out.add_done_callback(lambda o: future.cancel() if o.cancelled() else None)
    return out


def _source(key: KeyPath, meta: Any, skeleton: Skeleton, key_impl: str | None) -> Source:
    if isinstance(meta, ocp.metadata.StringMetadata):
        return Source(key, (), np.dtype(object), None, 'scalar', skeleton=skeleton)
    if not isinstance(meta, ocp.metadata.ArrayMetadata):
        raise SurgeryError(
            f'Checkpoint key {key!r} holds a {type(meta).__name__}; surgery restores arrays, '
            'scalars and strings. Drop it with a rule, or restore it with plain Orbax.'
        )
    kind: Kind
    if isinstance(meta, ocp.metadata.ScalarMetadata):
        kind = 'scalar'
    else:
        kind = 'np.ndarray' if meta.sharding is None else 'jax.Array'
    storage = getattr(meta, 'storage', None)
    chunks = tuple(storage.chunk_shape) if storage and storage.chunk_shape else None
    shape, dtype = tuple(meta.shape), np.dtype(meta.dtype)
    return Source(key, shape, dtype, chunks, kind, skeleton=skeleton, key_impl=key_impl)
