"""Turning a plan into arrays: each host computes only its addressable shards.

For a `jax.Array` target, every distinct region in
`sharding.addressable_devices_indices_map` is evaluated once (replicas share
it), read from the source, and put on its devices. All shards of a leaf, and
of every leaf that reads a common stored array (tied weights), are read
together, so shards that need the same stored chunk share a read in flight or
in the chunk cache. Such groups are admitted first come, first served under a
byte budget: host memory in flight stays under max(budget, one group's share on
this host) plus the cache.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import jax
import numpy as np

from orbax_surgery import expr as ex
from orbax_surgery import regions
from orbax_surgery.keys import KeyPath, PyTree
from orbax_surgery.plan import Plan, Rules, Step, resolve
from orbax_surgery.regions import Region
from orbax_surgery.sources import ArraySource, TreeSource
from orbax_surgery.value_fns import Apply

DEFAULT_MAX_INFLIGHT_BYTES = 256 * 2**20

T = TypeVar('T')
Progress = Callable[[int], None]


def materialize(
    plan: Plan,
    source: ArraySource,
    *,
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
    on_bytes: Progress | None = None,
) -> Any:
    """Computes the target tree of a checked plan, reading only local shards.

    Args:
        plan: The plan; if it has errors, the first is raised before any read.
        source: Where the plan's source arrays are read from.
        max_inflight_bytes: Host bytes read but not yet placed on devices.
        on_bytes: Called with the bytes of each block as it is placed.

    Returns:
        The target tree, with the target's structure.
    """
    plan.check()
    values = run_sync(_materialize(plan, source, max_inflight_bytes, on_bytes))
    return jax.tree_util.tree_unflatten(plan.treedef, [values[k] for k in plan.target_keys])


def apply_rules(
    tree: PyTree,
    target: PyTree = None,
    rules: Rules = (),
    *,
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
) -> PyTree:
    """Applies rules to an in-memory tree exactly as a restore would.

    Example:
        >>> import numpy as np
        >>> import orbax_surgery as osurg
        >>> apply_rules({'w': np.arange(6).reshape(2, 3)}, {'W': ...},
        ...             [osurg.Rename('w', 'W'), osurg.Transpose('W', (1, 0))])
        {'W': array([[0, 3],
               [1, 4],
               [2, 5]])}
    """
    source = TreeSource(tree)
    plan = resolve(source.arrays, target, rules)
    return materialize(plan, source, max_inflight_bytes=max_inflight_bytes)


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Runs a coroutine to completion, also from inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        in_loop = False  # Run below, so errors do not chain onto this RuntimeError.
    else:
        in_loop = True
    if not in_loop:
        return _run_in_new_loop(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(_run_in_new_loop, coro).result()


def _run_in_new_loop(coro: Coroutine[Any, Any, T]) -> T:
    # Not asyncio.run: on Python 3.11 it formats its SIGINT handler on exit, whose
    # repr includes the main task's result, copying restored arrays to the host.
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        try:
            pending = asyncio.all_tasks(loop)  # Left by a failure: cancel, as asyncio.run does.
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


class _Budget:
    """A first-come, first-served limit on host bytes in flight."""

    def __init__(self, limit: int):
        self._limit = max(1, limit)
        self._used = 0
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        nbytes = min(nbytes, self._limit)  # A block bigger than the budget runs alone.
        if self._waiting or self._used + nbytes > self._limit:
            turn = asyncio.get_running_loop().create_future()
            entry = (nbytes, turn)
            self._waiting.append(entry)
            try:
                await turn  # The releaser has counted our bytes.
            except asyncio.CancelledError:
                if turn.cancelled():
                    self._waiting.remove(entry)
                else:
                    self._release(nbytes)
                raise
        else:
            self._used += nbytes
        try:
            yield
        finally:
            self._release(nbytes)

    def _release(self, nbytes: int) -> None:
        self._used -= nbytes
        while self._waiting and self._used + self._waiting[0][0] <= self._limit:
            n, turn = self._waiting.popleft()
            self._used += n
            turn.set_result(None)


class _Session:
    """The evaluation context of one restore: reads, and whole-array results."""

    def __init__(self, source: ArraySource):
        self._source = source
        self._whole: dict[int, asyncio.Task[np.ndarray]] = {}

    async def read(self, source: ex.Source, region: Region) -> np.ndarray:
        return await self._source.read(source, region)

    async def whole(self, node: Apply) -> np.ndarray:
        task = self._whole.get(id(node))
        if task is None:
            task = asyncio.ensure_future(node.evaluate_whole(self))
            self._whole[id(node)] = task
        return await task


async def _materialize(
    plan: Plan, source: ArraySource, max_inflight_bytes: int, on_bytes: Progress | None
) -> dict[str, Any]:
    await source.open({s.key for step in plan.steps for s in step.expr.sources()})
    session = _Session(source)
    budget = _Budget(max_inflight_bytes)
    groups = await asyncio.gather(
        *(_group(steps, session, budget, on_bytes) for steps in _sharing_groups(plan.steps))
    )
    return {key: value for group in groups for key, value in group.items()}


def _sharing_groups(steps: Sequence[Step]) -> list[list[Step]]:
    """Steps that read a common stored array, grouped so they are read together."""
    owner: dict[KeyPath, int] = {}
    parent = list(range(len(steps)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, step in enumerate(steps):
        for src in step.expr.sources():
            j = owner.setdefault(src.key, i)
            parent[root(i)] = root(j)
    groups: dict[int, list[Step]] = collections.defaultdict(list)
    for i, step in enumerate(steps):
        groups[root(i)].append(step)
    return list(groups.values())


async def _group(
    steps: Sequence[Step], session: _Session, budget: _Budget, on_bytes: Progress | None
) -> dict[KeyPath, Any]:
    """Reads every shard of every step in the group at once, under one budget hold.

    Shards and tied targets that need the same stored chunk then share one read.
    """
    jobs = [_LeafJob(step) for step in steps]
    async with budget.hold(sum(job.inflight_bytes for job in jobs)):
        values = await asyncio.gather(*(job.run(session, on_bytes) for job in jobs))
    return {step.key: value for step, value in zip(steps, values, strict=True)}


class _LeafJob:
    """One target leaf: the distinct regions this host holds, and how to place them."""

    def __init__(self, step: Step):
        leaf = step.target
        assert leaf.shape is not None and leaf.dtype is not None, f'unresolved {leaf.key!r}'
        self.step = step
        self.by_region: dict[Region, list[jax.Device]] = collections.defaultdict(list)
        if leaf.kind != 'jax.Array':
            self.by_region[regions.full(leaf.shape)] = []
        elif not _placed_whole(step):
            for device, index in self.sharding.addressable_devices_indices_map(leaf.shape).items():
                assert index is not None, f'{leaf.key!r} has no index on {device}'
                self.by_region[regions.from_index(index, leaf.shape)].append(device)
        self.inflight_bytes = sum(_inflight_bytes(step, r) for r in self.by_region)

    @property
    def sharding(self) -> jax.sharding.Sharding:
        return self.step.target.sharding or jax.sharding.SingleDeviceSharding(
            jax.local_devices()[0]
        )

    async def run(self, session: _Session, on_bytes: Progress | None) -> Any:
        leaf, step = self.step.target, self.step
        assert leaf.shape is not None
        if _placed_whole(step):
            assert isinstance(step.expr, ex.Constant)
            return jax.device_put(step.expr.value, self.sharding)
        if leaf.kind != 'jax.Array':
            block = await _block(step, regions.full(leaf.shape), session, on_bytes)
            if leaf.kind == 'np.ndarray':
                return np.array(block, copy=True)
            value = block.item()
            return type(leaf.value)(value) if leaf.has_value else value

        async def place(region: Region, devices: list[jax.Device]) -> list[jax.Array]:
            block = await _block(step, region, session, on_bytes)
            return [jax.device_put(block, d) for d in devices]

        placed = await asyncio.gather(*(place(r, ds) for r, ds in self.by_region.items()))
        shards = [a for group in placed for a in group]
        return jax.make_array_from_single_device_arrays(leaf.shape, self.sharding, shards)


def _placed_whole(step: Step) -> bool:
    """A target's own jax.Array (a fallback) is put in place whole, not read by regions."""
    return (
        step.target.kind == 'jax.Array'
        and isinstance(step.expr, ex.Constant)
        and isinstance(step.expr.value, jax.Array)
    )


def _inflight_bytes(step: Step, region: Region) -> int:
    """Host bytes a block takes while in flight: what it reads, and itself."""
    out = regions.size_of(region) * step.expr.dtype.itemsize
    reads = sum(regions.size_of(sub) * s.dtype.itemsize for s, sub in step.expr.requests(region))
    return out + reads


async def _block(
    step: Step, region: Region, session: _Session, on_bytes: Progress | None
) -> np.ndarray:
    block = await step.expr.evaluate(region, session)
    assert block.shape == regions.shape_of(region), (step.key, block.shape, region)
    if on_bytes is not None:
        on_bytes(block.nbytes)
    return block
