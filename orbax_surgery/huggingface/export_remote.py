"""Exports to object storage (gs://, s3://): each file one upload, the index last.

Object stores have no positioned writes and no renames. Each file is one
object, uploaded by one process in file order (a multipart or resumable upload
through `etils.epath`, so memory stays near the in-flight budget) and visible
only once complete; the index is written last, and a single-file export's file
is itself the last object. A reader never sees a half-written model, and an
interrupted export leaves no index.

File i goes to process i % count. When every process can read every input (a
checkpoint, or a tree held in one process) that process computes the file's
bytes itself, slab by slab. When the data is a live tree sharded over the
processes, each process first writes the blocks it holds as part objects under
`DST.tmp-*/`, and the file's process reads them back, one ranged read per part
a slab crosses; then the parts are removed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import tensorstore as ts
from etils import epath

from orbax_surgery import locations
from orbax_surgery.arrays import regions
from orbax_surgery.arrays.regions import Region
from orbax_surgery.errors import DestinationExistsError, SourceReadError
from orbax_surgery.huggingface.export_blocks import assign_blocks, split
from orbax_surgery.huggingface.export_checksums import record_safetensors
from orbax_surgery.huggingface.export_files import Layout, Tensor, index_text
from orbax_surgery.read.checksum_records import CHECKSUMS_DIR
from orbax_surgery.read.materialize import run_sync
from orbax_surgery.read.session import Session, Usage
from orbax_surgery.sources.file_reads import open_file
from orbax_surgery.sources.safetensors import INDEX_FILE, SINGLE_FILE
from orbax_surgery.sources.source import ArraySource
from orbax_surgery.sources.tree import TreeSource
from orbax_surgery.write.barrier import Barrier

CONFIG_FILES = ('config.json', 'generation_config.json')
"""Copied from a Hugging Face source directory into the export, before the index."""


def export_to_object_storage(
    source: ArraySource,
    layout: Layout,
    directory: str,
    *,
    barrier: Barrier,
    overwrite: bool,
    budget: int,
    progress: Callable[[int], None] | None,
    checksums: bool,
    configs_from: str | None,
    config: Mapping[str, Any] | None = None,
) -> int:
    """Writes `layout` to `directory` in object storage; returns this process's bytes."""
    here, count = barrier.process, barrier.count
    existing = _existing(directory, overwrite)
    barrier.wait('checked', left=f'Nothing was written to {locations.shown(directory)}.')
    if here == 0:
        for name in existing:  # The old model stops reading as whole before any new byte lands.
            epath.Path(locations.join(directory, name)).unlink()
    unfinished = f'The export left no index: {locations.shown(directory)} holds no new model.'
    tmp = f'{directory}.tmp-{barrier.share(_token())}'
    slab_bytes = max(1, budget // 4)
    mine = [f for f in range(len(layout.names)) if f % count == here]
    try:
        parts = None if _reads_everything(source) else tmp
        if parts is not None:
            run_sync(_write_parts(source, layout, parts, slab_bytes))
            barrier.wait('parts', left=unfinished)
        written = run_sync(
            _write_files(source, layout, directory, mine, parts, slab_bytes, progress)
        )
        barrier.wait('written', left=unfinished)
        if checksums:
            files = [locations.join(directory, name) for name in layout.names]
            record_safetensors(files, process=here, count=count).write_now(epath.Path(directory))
            barrier.wait('hashed', left=unfinished)
        if here == 0:
            copy_configs(configs_from, directory, config)
            if len(layout.names) > 1:
                epath.Path(locations.join(directory, INDEX_FILE)).write_text(index_text(layout))
            _remove_others(directory, layout, checksums)
    finally:
        if here == 0:
            _remove(tmp)
    return written


def _reads_everything(source: ArraySource) -> bool:
    """Whether every process can read every input (then each file needs no parts)."""
    if jax.process_count() == 1 or not isinstance(source, TreeSource):
        return True
    return all(
        not isinstance(v, jax.Array) or v.is_fully_addressable for v in source.values.values()
    )


def _existing(directory: str, overwrite: bool) -> list[str]:
    """The files of a whole model there (an index, or one file); kept unless `overwrite`."""
    existing = [
        f for f in (INDEX_FILE, SINGLE_FILE) if open_file(locations.join(directory, f)).exists()
    ]
    if existing and not overwrite:
        raise DestinationExistsError(
            f'{locations.shown(directory)} holds a model ({existing[0]}); the export leaves it '
            'untouched. Choose another directory, or pass overwrite=True to replace it.'
        )
    return existing


async def _write_parts(source: ArraySource, layout: Layout, tmp: str, slab_bytes: int) -> None:
    """Writes the blocks this process holds as part objects, C-order bytes each."""
    mine = assign_blocks(layout.tensors, source, slab_bytes).get(jax.process_index(), [])
    await source.open({s.key for tensor, _ in mine for s in tensor.step.expr.sources()})
    session = Session(source, Usage.count((tensor.step.expr, region) for tensor, region in mine))
    store = await ts.KvStore.open(locations.kvstore(tmp))
    for tensor, region in mine:
        block = await tensor.step.expr.evaluate(region, session)
        data = np.ascontiguousarray(block, dtype=tensor.dtype)
        await store.write(_part_key(tensor, region), data.tobytes())


async def _write_files(
    source: ArraySource,
    layout: Layout,
    directory: str,
    files: Sequence[int],
    parts: str | None,
    slab_bytes: int,
    progress: Callable[[int], None] | None,
) -> int:
    """Uploads each of `files` in order: its header, then its tensors slab by slab."""
    slabs = [
        (tensor, slab)
        for tensor in layout.tensors
        if tensor.file in files
        for slab in split(_whole(tensor), tensor.dtype.itemsize, slab_bytes)
    ]
    read: Callable[[Tensor, Region], Any]
    if parts is None:
        await source.open({s.key for tensor, _ in slabs for s in tensor.step.expr.sources()})
        session = Session(source, Usage.count((t.step.expr, slab) for t, slab in slabs))

        async def read(tensor: Tensor, slab: Region) -> np.ndarray:
            return await tensor.step.expr.evaluate(slab, session)
    else:
        blocks = assign_blocks(layout.tensors, source, slab_bytes)
        by_tensor: dict[str, list[Region]] = {}
        for process_blocks in blocks.values():
            for tensor, region in process_blocks:
                by_tensor.setdefault(tensor.name, []).append(region)
        store = await ts.KvStore.open(locations.kvstore(parts))

        async def read(tensor: Tensor, slab: Region) -> np.ndarray:
            return await _assemble(store, tensor, slab, by_tensor[tensor.name])

    written = 0
    for file in files:
        with epath.Path(locations.join(directory, layout.names[file])).open('wb') as out:
            await asyncio.to_thread(out.write, layout.headers[file])
            for tensor, slab in slabs:
                if tensor.file != file:
                    continue
                data = np.ascontiguousarray(await read(tensor, slab), dtype=tensor.dtype)
                await asyncio.to_thread(out.write, data.reshape(-1).view(np.uint8).data)
                written += data.nbytes
                if progress is not None:
                    progress(data.nbytes)
    return written


async def _assemble(
    store: ts.KvStore, tensor: Tensor, slab: Region, parts: Sequence[Region]
) -> np.ndarray:
    """A slab of a tensor from the part objects it crosses: one ranged read per part."""
    out = np.empty(regions.shape_of(slab), tensor.dtype)
    reads = []
    for part in parts:
        inside = regions.clip(slab, part)
        if inside is None:
            continue
        # `inside` is contiguous in the part's C order (a slab holds whole rows of it).
        first = _offset(part, [r.start for r in inside]) * tensor.dtype.itemsize
        nbytes = regions.size_of(inside) * tensor.dtype.itemsize
        future = store.read(_part_key(tensor, part), byte_range=slice(first, first + nbytes))
        reads.append((inside, future))
    filled = 0
    for inside, future in reads:
        value = (await future).value
        block = np.frombuffer(value, tensor.dtype).reshape(regions.shape_of(inside))
        out[tuple(regions.positions(i, s) for i, s in zip(inside, slab, strict=True))] = block
        filled += block.size
    if filled != out.size:
        raise SourceReadError(
            f'The parts of tensor {tensor.name!r} cover {filled} of the {out.size} elements of '
            f'{slab}: a process did not write its share.'
        )
    return out


def _whole(tensor: Tensor) -> Region:
    return regions.full(tuple(tensor.step.target.shape or ()))


def _part_key(tensor: Tensor, region: Region) -> str:
    box = '_'.join(f'{r.start}-{r.stop}' for r in region) or 'scalar'
    return f'parts/{tensor.name}/{box}'


def _offset(box: Region, index: Sequence[int]) -> int:
    """The C-order position of `index` (global) inside `box`."""
    position = 0
    for r, i in zip(box, index, strict=True):
        position = position * len(r) + (i - r.start)
    return position


def copy_configs(
    source: str | None, directory: str, config: Mapping[str, Any] | None = None
) -> None:
    """Copies `config.json` and `generation_config.json` from a Hugging Face source.

    A given `config` is written as `config.json` instead of the source's.
    """
    if config is not None:
        text = json.dumps(dict(config), indent=2, sort_keys=True) + '\n'
        epath.Path(locations.join(directory, CONFIG_FILES[0])).write_text(text)
    if source is None:
        return
    for name in CONFIG_FILES[1:] if config is not None else CONFIG_FILES:
        file = open_file(locations.join(source, name))
        if file.exists():
            epath.Path(locations.join(directory, name)).write_bytes(file.read(0))


def _remove_others(directory: str, layout: Layout, checksums: bool) -> None:
    """Removes what an older or interrupted export left that this one did not write."""
    kept = {*layout.names, INDEX_FILE, *CONFIG_FILES}
    for path in epath.Path(directory).iterdir():
        if path.name.endswith('.safetensors') and path.name not in kept:
            path.unlink()
        elif path.name == CHECKSUMS_DIR and not checksums:
            path.rmtree()  # Stale: they would fail a verified read of the new files.


def _remove(location: str) -> None:
    path = epath.Path(location)
    if path.exists():
        path.rmtree()


def _token() -> str:
    import secrets

    return secrets.token_hex(4)
