"""Which process writes which bytes of an export, cut to blocks that fit the budget."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from orbax_surgery.arrays import regions
from orbax_surgery.arrays.regions import Region
from orbax_surgery.errors import SurgeryError
from orbax_surgery.huggingface.export_files import Layout, Tensor, write_region
from orbax_surgery.keys import KeyPath
from orbax_surgery.plan.plan import Step
from orbax_surgery.read.session import Session, Usage
from orbax_surgery.sources.source import ArraySource, key_region
from orbax_surgery.sources.tree import TreeSource


def my_blocks(
    tensors: Sequence[Tensor], source: ArraySource, block_bytes: int
) -> list[tuple[Tensor, Region]]:
    """This process's blocks, in file order: its regions, cut to at most `block_bytes`."""
    return assign_blocks(tensors, source, block_bytes).get(jax.process_index(), [])


def assign_blocks(
    tensors: Sequence[Tensor], source: ArraySource, block_bytes: int
) -> dict[int, list[tuple[Tensor, Region]]]:
    """Every process's blocks, in file order: regions cut to at most `block_bytes`.

    Every process makes the same choices: a region goes to the least loaded
    process that holds it (by the target's sharding) and can read its inputs.
    """
    count = jax.process_count()
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
    chosen: dict[int, list[tuple[int, Tensor, Region]]] = {}
    for nbytes, order, tensor, region, able in sorted(todo, key=lambda t: (-t[0], t[1])):
        owner = min(able, key=lambda p: (load[p], p))
        load[owner] += nbytes
        chosen.setdefault(owner, []).extend(
            (order, tensor, part) for part in split(region, tensor.dtype.itemsize, block_bytes)
        )
    out = {}
    for process, blocks in chosen.items():
        blocks.sort(key=lambda t: (t[1].file, t[1].offset, [r.start for r in t[2]]))
        out[process] = [(tensor, region) for _, tensor, region in blocks]
    return out


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


def split(region: Region, itemsize: int, limit: int) -> list[Region]:
    """`region` cut along its leading axes into parts of at most `limit` bytes.

    A part of a whole array is contiguous in C order, and so is its overlap
    with any box that holds whole rows of it.
    """
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
    return [piece for part in parts for piece in split(part, itemsize, limit)]


async def write_blocks(
    blocks: Sequence[tuple[Tensor, Region]],
    source: ArraySource,
    directory: epath.Path,
    layout: Layout,
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

    async def write(tensor: Tensor, region: Region) -> None:
        nonlocal written
        block = await tensor.step.expr.evaluate(region, session)
        assert block.shape == regions.shape_of(region), (tensor.step.key, block.shape, region)
        data = np.ascontiguousarray(block, dtype=tensor.dtype)
        if tensor.file not in fds:
            fds[tensor.file] = os.open(directory / layout.names[tensor.file], os.O_WRONLY)
        await loop.run_in_executor(pool, write_region, fds[tensor.file], tensor, region, data)
        written += data.nbytes
        if progress is not None:
            progress(data.nbytes)

    def cost(block: tuple[Tensor, Region]) -> int:
        tensor, region = block
        reads = tensor.step.expr.requests(region)
        out = regions.size_of(region) * tensor.dtype.itemsize
        return out + sum(regions.size_of(sub) * s.dtype.itemsize for s, sub in reads)

    try:
        # Leaving the pool waits for writes in flight, so no descriptor closes under one.
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            await run_under_budget([blocks[i] for i in usage.order()], write, cost, budget)
        for fd in fds.values():
            os.fsync(fd)
    finally:
        for fd in fds.values():
            os.close(fd)
    return written


async def run_under_budget(
    items: Iterable[tuple[Tensor, Region]],
    run: Callable[[Tensor, Region], Any],
    cost: Callable[[tuple[Tensor, Region]], int],
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

    async def one(item: tuple[Tensor, Region], nbytes: int) -> None:
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
