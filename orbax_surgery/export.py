"""Export to Hugging Face safetensors: shard files and an index, each process writing its part.

The layout is fixed before any data moves: tensors go to files in key order
(a new file when the next tensor would pass `max_shard_size`), each file's
header is computed up front, so every process knows the byte offsets of every
tensor. A tensor's regions are assigned to processes (a sharded leaf's shards
to a process holding them, the rest balanced by bytes), each process computes
only its regions, a budget's worth at a time, and writes their bytes with
positioned writes into files preallocated by process 0. All of it happens in
a temporary directory beside the destination, which process 0 renames into
place only when every process is done; a failure leaves no destination.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import itertools
import json
import math
import os
import re
import secrets
import shutil
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from orbax_surgery import regions
from orbax_surgery.atomic import move_into_place
from orbax_surgery.barrier import DEFAULT_PEER_TIMEOUT_SECS, Barrier
from orbax_surgery.errors import DestinationExistsError, SurgeryError
from orbax_surgery.keys import KeyPath, PyTree
from orbax_surgery.materializer import DEFAULT_MAX_INFLIGHT_BYTES, run_sync
from orbax_surgery.plan import Rules, Step, resolve
from orbax_surgery.regions import Region
from orbax_surgery.safetensors import DTYPES, INDEX_FILE, SINGLE_FILE, key_to_name
from orbax_surgery.safetensors_checksums import record_safetensors
from orbax_surgery.saving import natural_sharding
from orbax_surgery.session import Session, Usage
from orbax_surgery.sources import ArraySource, TreeSource, key_region, open_source

__all__ = ['DestinationExistsError', 'Exported', 'save_safetensors']

DEFAULT_MAX_SHARD_SIZE = '5GB'
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_UNITS = {'KB': 10**3, 'MB': 10**6, 'GB': 10**9, 'TB': 10**12, 'KIB': 2**10, 'MIB': 2**20}
_UNITS |= {'GIB': 2**30, 'TIB': 2**40, 'B': 1}


@dataclasses.dataclass(frozen=True)
class Exported:
    """What `save_safetensors` wrote.

    Attributes:
        directory: The finalized destination.
        files: The safetensors files in it, in order (plus the index when several).
        total_size: Tensor bytes in all files (the index's `metadata.total_size`).
        bytes_written: Tensor bytes this process wrote.

    Example:
        >>> import tempfile, numpy as np
        >>> tree = {'a': np.ones(4, np.float32), 'b': np.ones(4, np.float32)}
        >>> out = save_safetensors(tree, tempfile.mkdtemp() + '/hf', max_shard_size=16)
        >>> out.files[0], out.files[-1], out.total_size, out.bytes_written
        ('model-00001-of-00002.safetensors', 'model.safetensors.index.json', 32, 32)
    """

    directory: epath.Path
    files: tuple[str, ...]
    total_size: int
    bytes_written: int


@dataclasses.dataclass(frozen=True)
class _Tensor:
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
class _Layout:
    names: tuple[str, ...]
    headers: tuple[bytes, ...]
    sizes: tuple[int, ...]
    tensors: tuple[_Tensor, ...]

    @property
    def total_size(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def save_safetensors(
    source: epath.PathLike | ArraySource | PyTree,
    directory: epath.PathLike,
    *,
    target: PyTree = None,
    rules: Rules = (),
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
    progress: Callable[[int], None] | None = None,
    peer_timeout_secs: float = DEFAULT_PEER_TIMEOUT_SECS,
    checksums: bool = False,
) -> Exported:
    """Writes a checkpoint or a live tree as Hugging Face safetensors, shard by shard.

    Every process calls it with the same arguments. Each computes and writes
    only the regions it is assigned: a sharded leaf's shards go to processes
    holding them; unsharded leaves are spread over processes by bytes. Nothing
    is written before the plan is checked; the destination appears only once
    complete.

    Args:
        source: An Orbax item directory, safetensors path, a source object, or
            an in-memory tree (jax.Arrays sharded across processes included).
        directory: The destination directory; its parent is created if needed.
        target: The exported tree (keys are tensor names with '.' as '/'), for
            shapes, dtypes and shardings; None takes them from the rules.
        rules: Typically `to_pytorch(...)`.
        max_shard_size: Tensor bytes per file before the next starts (an int,
            or a string like '5GB', '500MiB'); one `model.safetensors` if all fit.
        metadata: Strings for each file's `__metadata__` (`format` is 'pt'
            unless given).
        overwrite: Replace an existing destination, once the new one is complete.
        max_inflight_bytes: Host bytes computed but not yet written, per process.
        progress: Called with the tensor bytes of each block this process wrote.
        peer_timeout_secs: With several processes, how long each waits for the
            others at a barrier (created, written, hashed, finalized) before it gives up
            with `PeerTimeoutError`: a peer that died or hangs never holds the
            others forever. It must exceed the spread of the processes' write times.
            (Unless `jax_enable_recoverability` is set, JAX itself terminates the
            other processes once a peer misses its heartbeats for
            `jax.distributed.initialize(heartbeat_timeout_seconds=...)`, 100 s by default.)
        checksums: Also record a BLAKE2b-128 digest of every tensor's blocks
            (`safetensors_checksums.block_shape`), read back from the written
            files once all are written, in `_CHECKSUMS/process_<i>.json` inside
            `directory`, so that restores with `verify=True` detect changed
            bytes. Each process reads and hashes an even share of the blocks;
            safetensors and transformers loaders ignore the extra directory.

    Returns:
        What was written, with this process's share.

    Raises:
        SurgeryError: The plan has errors, a dtype safetensors cannot hold, two
            keys with one tensor name, or bad arguments; nothing was written.
        DestinationExistsError: `directory` exists and `overwrite` is False.
        PeerTimeoutError: Another process did not reach a barrier in time; the
            message says whether the export was finalized (only if the peer
            failed after every byte was written).

    Example:
        >>> import tempfile, numpy as np, orbax_surgery as osurg
        >>> from orbax_surgery.export import save_safetensors
        >>> tree = {'dense': {'kernel': np.ones((2, 3), np.float32)}}
        >>> out = save_safetensors(tree, tempfile.mkdtemp() + '/hf', rules=osurg.to_pytorch())
        >>> out.files, osurg.SafetensorsCheckpoint(out.directory).arrays['dense/weight'].shape
        (('model.safetensors',), (3, 2))
        >>> out = save_safetensors(tree, tempfile.mkdtemp() + '/hf', checksums=True)
        >>> osurg.restore(out.directory, verify=True)['dense']['kernel'].shape
        (2, 3)
    """
    directory = epath.Path(directory)
    if '://' in str(directory):
        raise SurgeryError(
            f'Cannot export to {directory}: the export writes its files in place, on a local '
            'or mounted filesystem. Export to a local directory, then copy it.'
        )
    src = _as_source(source)
    plan = resolve(src.arrays, target, rules)
    plan.check()
    steps = [_with_natural_sharding(step, src) for step in plan.steps]
    layout = _layout(steps, _parse_size(max_shard_size), _file_metadata(metadata))
    mine = _my_blocks(layout.tensors, src, max(1, max_inflight_bytes // 4))
    if os.path.lexists(directory) and not overwrite:
        raise DestinationExistsError(
            f'{directory} exists; the export leaves it untouched. Choose another directory, '
            'or pass overwrite=True to replace it once the new export is complete.'
        )
    barrier = Barrier.start('orbax_surgery.export', timeout_secs=peer_timeout_secs)
    tmp = directory.parent / f'{directory.name}.tmp-{barrier.share(secrets.token_hex(4))}'
    unfinished = f'The export left nothing finalized: {directory} is as it was.'
    try:
        if jax.process_index() == 0:
            directory.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            _create_files(tmp, layout)
        barrier.wait('created', left=unfinished)
        written = run_sync(_write_blocks(mine, src, tmp, layout, max_inflight_bytes, progress))
        barrier.wait('written', left=unfinished)
        if checksums:
            paths = [tmp / name for name in layout.names]
            record_safetensors(paths, process=barrier.process, count=barrier.count).write_now(tmp)
            barrier.wait('hashed', left=unfinished)
        if jax.process_index() == 0:
            _write_index(tmp, layout)
            move_into_place(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    done = f'The export is finalized and whole at {directory}.'
    if jax.process_index() != 0:
        done = f'Every byte was written; {directory} is whole if process 0 finalized it.'
    barrier.wait('finalized', left=done)
    files = layout.names + ((INDEX_FILE,) if len(layout.names) > 1 else ())
    return Exported(directory, files, layout.total_size, written)


def _as_source(source: Any) -> ArraySource:
    if isinstance(source, str | os.PathLike):
        return open_source(source)
    kind = type(source)
    if callable(getattr(kind, 'read', None)) and hasattr(kind, 'open'):
        return source
    return TreeSource(source)


def _with_natural_sharding(step: Step, source: ArraySource) -> Step:
    """A live tree's sharding carries over to an unsharded target, as in a save."""
    leaf = step.target
    if leaf.sharding is not None or not isinstance(source, TreeSource):
        return step
    sharding = natural_sharding(step.expr, source.values)
    return dataclasses.replace(step, target=dataclasses.replace(leaf, sharding=sharding))


def _parse_size(size: int | str) -> int:
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r'\s*(\d+)\s*([a-zA-Z]*)\s*', size) if isinstance(size, str) else None
    unit = match and _UNITS.get(match[2].upper() or 'B')
    if not match or not unit or int(match[1]) <= 0:
        raise SurgeryError(
            f'max_shard_size={size!r} is not a size: pass bytes (an int > 0) or a string '
            "such as '5GB' or '500MiB'."
        )
    return int(match[1]) * unit


def _file_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
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


def _layout(steps: Sequence[Step], max_shard_size: int, metadata: dict[str, str]) -> _Layout:
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
            tensors.append(_Tensor(named[name], name, dtypes[name], i, at))
    return _Layout(tuple(names), tuple(headers), tuple(file_sizes), tuple(tensors))


def _my_blocks(
    tensors: Sequence[_Tensor], source: ArraySource, block_bytes: int
) -> list[tuple[_Tensor, Region]]:
    """This process's blocks, in file order: its regions, cut to at most `block_bytes`.

    Every process makes the same choices: a region goes to the least loaded
    process that holds it (by the target's sharding) and can read its inputs.
    """
    count, here = jax.process_count(), jax.process_index()
    held: dict[KeyPath, Any] = {}  # Who holds each live source array's regions.
    todo = []
    for order, tensor in enumerate(tensors):
        for region, holders in _regions(tensor.step, count).items():
            readers = _readers(tensor.step, region, source, count, held) if count > 1 else holders
            able = (holders & readers) or readers
            if not able:
                raise SurgeryError(
                    f'No process holds all the data of {key_region(tensor.step.key, region)} '
                    f'(tensor {tensor.name!r}): a live tree sharded across processes is '
                    'exported shard by shard, without gathering. Give the target a sharding '
                    'aligned with the live arrays (target=...), or export from a checkpoint.'
                )
            nbytes = regions.size_of(region) * tensor.dtype.itemsize
            todo.append((nbytes, order, tensor, region, able))
    load = [0] * count
    mine: list[tuple[int, _Tensor, Region]] = []
    for nbytes, order, tensor, region, able in sorted(todo, key=lambda t: (-t[0], t[1])):
        owner = min(able, key=lambda p: (load[p], p))
        load[owner] += nbytes
        if owner == here:
            mine.extend(
                (order, tensor, part) for part in _split(region, tensor.dtype.itemsize, block_bytes)
            )
    mine.sort(key=lambda t: (t[1].file, t[1].offset, [r.start for r in t[2]]))
    return [(tensor, region) for _, tensor, region in mine]


def _regions(step: Step, count: int) -> dict[Region, set[int]]:
    """The distinct regions of a leaf, with the processes whose devices hold each."""
    leaf = step.target
    assert leaf.shape is not None, f'unresolved {leaf.key!r}'
    if leaf.sharding is None or leaf.kind != 'jax.Array':
        return {regions.full(leaf.shape): set(range(count))}
    return _held(leaf.sharding, tuple(leaf.shape))


def _held(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> dict[Region, set[int]]:
    out: dict[Region, set[int]] = {}
    for device, index in sharding.devices_indices_map(shape).items():
        region = regions.from_index(index, shape)
        out.setdefault(region, set()).add(device.process_index)  # type: ignore[attr-defined]
    return out


def _readers(
    step: Step, region: Region, source: ArraySource, count: int, cache: dict[KeyPath, Any]
) -> set[int]:
    """Processes that can compute `region`: all, but for a live tree those holding its inputs."""
    able = set(range(count))
    if not isinstance(source, TreeSource):
        return able
    for src, sub in step.expr.requests(region):
        value = source.values.get(src.key)
        if not isinstance(value, jax.Array) or not regions.size_of(sub):
            continue
        sub, _ = regions.split_ascending(sub)
        by_process: dict[int, list[Region]] = {}
        if src.key not in cache:
            cache[src.key] = _held(value.sharding, tuple(value.shape))
        for box, processes in cache[src.key].items():
            inside = regions.clip(sub, box)
            if inside is None:
                continue
            # Counted in `sub`'s own positions, so strided requests count elements, not spans.
            at = tuple(range(p.start, p.stop) for p in map(regions.positions, inside, sub))
            for p in processes:
                by_process.setdefault(p, []).append(at)
        size = regions.size_of(sub)
        able &= {p for p, parts in by_process.items() if regions.union_size(parts) == size}
    return able


def _split(region: Region, itemsize: int, limit: int) -> list[Region]:
    """`region` cut along its leading axes into parts of at most `limit` bytes."""
    nbytes = regions.size_of(region) * itemsize
    axis = next((a for a, r in enumerate(region) if len(r) > 1), None)
    if nbytes <= limit or axis is None:
        return [region]
    r = region[axis]
    per = nbytes // len(r)
    step = max(1, limit // per)
    parts = [
        region[:axis] + (r[i : i + step],) + region[axis + 1 :] for i in range(0, len(r), step)
    ]
    return [piece for part in parts for piece in _split(part, itemsize, limit)]


def _create_files(directory: epath.Path, layout: _Layout) -> None:
    """Each file with its header, at its full size (sparse until written)."""
    for name, header, size in zip(layout.names, layout.headers, layout.sizes, strict=True):
        with open(directory / name, 'wb') as f:
            f.write(header)
            f.truncate(size)
            os.fsync(f.fileno())


async def _write_blocks(
    blocks: Sequence[tuple[_Tensor, Region]],
    source: ArraySource,
    directory: epath.Path,
    layout: _Layout,
    budget: int,
    progress: Callable[[int], None] | None,
) -> int:
    """Computes this process's blocks under the byte budget and writes each in place."""
    await source.open({s.key for tensor, _ in blocks for s in tensor.step.expr.sources()})
    usage = Usage.count((tensor.step.expr, region) for tensor, region in blocks)
    session = Session(source, usage)
    loop = asyncio.get_running_loop()
    fds: dict[int, int] = {}
    written = 0

    async def write(tensor: _Tensor, region: Region) -> None:
        nonlocal written
        block = await tensor.step.expr.evaluate(region, session)
        assert block.shape == regions.shape_of(region), (tensor.step.key, block.shape, region)
        data = np.ascontiguousarray(block, dtype=tensor.dtype)
        if tensor.file not in fds:
            fds[tensor.file] = os.open(directory / layout.names[tensor.file], os.O_WRONLY)
        await loop.run_in_executor(pool, _write_region, fds[tensor.file], tensor, region, data)
        written += data.nbytes
        if progress is not None:
            progress(data.nbytes)

    def cost(block: tuple[_Tensor, Region]) -> int:
        tensor, region = block
        reads = tensor.step.expr.requests(region)
        out = regions.size_of(region) * tensor.dtype.itemsize
        return out + sum(regions.size_of(sub) * s.dtype.itemsize for s, sub in reads)

    try:
        # Leaving the pool waits for writes in flight, so no descriptor closes under one.
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            await _run_under_budget([blocks[i] for i in usage.order()], write, cost, budget)
        for fd in fds.values():
            os.fsync(fd)
    finally:
        for fd in fds.values():
            os.close(fd)
    return written


async def _run_under_budget(
    items: Iterable[tuple[_Tensor, Region]],
    run: Callable[[_Tensor, Region], Any],
    cost: Callable[[tuple[_Tensor, Region]], int],
    limit: int,
) -> None:
    """Starts items in order while their costs fit in `limit` (one at least); stops at a failure."""
    limit = max(1, limit)
    used = 0
    failed = False
    changed = asyncio.Condition()
    tasks: list[asyncio.Future[None]] = []

    def fits(nbytes: int) -> bool:
        return failed or used + nbytes <= limit

    async def one(item: tuple[_Tensor, Region], nbytes: int) -> None:
        nonlocal used, failed
        try:
            await run(*item)
        except BaseException:
            failed = True
            raise
        finally:
            async with changed:
                used -= nbytes
                changed.notify_all()

    try:
        for item in items:
            nbytes = min(cost(item), limit)
            async with changed:
                await changed.wait_for(functools.partial(fits, nbytes))
                if failed:
                    break
                used += nbytes
            tasks.append(asyncio.ensure_future(one(item, nbytes)))
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _write_region(fd: int, tensor: _Tensor, region: Region, data: np.ndarray) -> None:
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


def _write_index(directory: epath.Path, layout: _Layout) -> None:
    if len(layout.names) == 1:
        return
    weight_map = {t.name: layout.names[t.file] for t in layout.tensors}
    index = {
        'metadata': {
            'total_parameters': sum(math.prod(t.step.target.shape or ()) for t in layout.tensors),
            'total_size': layout.total_size,
        },
        'weight_map': dict(sorted(weight_map.items())),
    }
    with open(directory / INDEX_FILE, 'w') as f:
        f.write(json.dumps(index, indent=2) + '\n')
        os.fsync(f.fileno())
