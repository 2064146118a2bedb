"""Turning a plan into arrays: each host computes only its addressable shards.

For a `jax.Array` target, every distinct region in
`sharding.addressable_devices_indices_map` is a block, evaluated once (replicas
share it) and put on its devices. A `Session` reads each stored chunk once per
host, however many blocks of however many leaves need it (see
`orbax_surgery.read.session`). Blocks are admitted first come, first served under a
byte budget, in an order that keeps blocks sharing a chunk together: host
memory in flight stays under the budget plus the shared chunks in use.
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

from orbax_surgery.arrays import expr as ex
from orbax_surgery.arrays import regions
from orbax_surgery.arrays.regions import Region
from orbax_surgery.errors import SurgeryError
from orbax_surgery.keys import KeyPath, PyTree
from orbax_surgery.plan.plan import Plan, Step
from orbax_surgery.plan.resolve import Rules, resolve
from orbax_surgery.read.session import Session, Usage
from orbax_surgery.sources.source import ArraySource
from orbax_surgery.sources.tree import TreeSource

DEFAULT_MAX_INFLIGHT_BYTES = 128 * 2**20
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

    Example:
        >>> import numpy as np
        >>> from orbax_surgery import Transpose, TreeSource, resolve
        >>> source = TreeSource({'w': np.arange(6).reshape(2, 3)})
        >>> plan = resolve(source.arrays, None, [Transpose('w', (1, 0))])
        >>> plan.steps[0].expr.describe()  # Inspect first; nothing was read yet.
        'transpose(w, (1, 0))'
        >>> materialize(plan, source)['w'].tolist()
        [[0, 3], [1, 4], [2, 5]]
    """
    plan.check()
    return run_sync(materialize_async(plan, source, max_inflight_bytes, on_bytes))


async def materialize_async(
    plan: Plan,
    source: ArraySource,
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
    on_bytes: Progress | None = None,
) -> Any:
    """`materialize` in a running event loop, for a plan already checked.

    Orbax v1 handlers plan and check in their blocking part and await this in
    the background (see `orbax_surgery.orbax.v1_handler`).
    """
    values = await compute_leaves(plan.steps, source, max_inflight_bytes, on_bytes)
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
        >>> out = apply_rules({'w': np.arange(6).reshape(2, 3)}, {'W': ...},
        ...                   [osurg.Rename('w', 'W'), osurg.Transpose('W', (1, 0))])
        >>> out['W'].tolist()
        [[0, 3], [1, 4], [2, 5]]
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


async def compute_leaves(
    steps: Sequence[Step],
    source: ArraySource,
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
    on_bytes: Progress | None = None,
) -> dict[KeyPath, Any]:
    """The values of `steps` (checked steps of a plan), by target key."""
    await source.open({s.key for step in steps for s in step.expr.sources()})
    jobs = [_LeafJob(step) for step in steps]
    blocks = [(job, region) for job in jobs for region in job.by_region]
    usage = Usage.count((job.step.expr, region) for job, region in blocks)
    session = Session(source, usage)
    budget = _Budget(max_inflight_bytes)

    async def compute(job: _LeafJob, region: Region) -> Any:
        async with budget.hold(_inflight_bytes(job.step, region)):
            block = await _block(job.step, region, session, on_bytes)
            return job.place(region, block)

    # Tasks start in this order, so the budget admits blocks that share chunks together.
    tasks = {i: asyncio.ensure_future(compute(*blocks[i])) for i in usage.order()}
    done = iter(await asyncio.gather(*(tasks[i] for i in range(len(blocks)))))
    return {job.step.key: job.assemble([next(done) for _ in job.by_region]) for job in jobs}


class _LeafJob:
    """One target leaf: the distinct regions this host holds, and how to place them."""

    def __init__(self, step: Step):
        self.step = step
        self.by_region = {} if _placed_whole(step) else host_regions(step)

    @property
    def sharding(self) -> jax.sharding.Sharding:
        return placed_sharding(self.step)

    def place(self, region: Region, block: np.ndarray) -> Any:
        """A computed block put on its devices, so it no longer counts as in flight."""
        if self.step.target.kind != 'jax.Array':
            return block
        return [jax.device_put(block, d) for d in self.by_region[region]]

    def assemble(self, placed: list[Any]) -> Any:
        """The target leaf from its placed blocks, in `by_region` order."""
        leaf, step = self.step.target, self.step
        assert leaf.shape is not None
        if _placed_whole(step):
            assert isinstance(step.expr, ex.Constant)
            array = jax.device_put(step.expr.value, self.sharding)
            if leaf.key_impl is not None:
                return jax.random.wrap_key_data(array, impl=leaf.key_impl)
            return array
        if leaf.kind != 'jax.Array':
            (block,) = placed
            if leaf.kind == 'np.ndarray':
                return np.array(block, copy=True)
            value = block.item()
            return type(leaf.value)(value) if leaf.has_value else value
        shards = [a for group in placed for a in group]
        array = jax.make_array_from_single_device_arrays(leaf.shape, self.sharding, shards)
        if leaf.key_impl is not None:  # Key data back into typed PRNG keys, as Orbax does.
            return jax.random.wrap_key_data(array, impl=leaf.key_impl)
        return array


def placed_sharding(step: Step) -> jax.sharding.Sharding:
    """The target's sharding; without one, this host's first device."""
    return step.target.sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def host_regions(step: Step) -> dict[Region, list[jax.Device]]:
    """The distinct regions of a target leaf this host holds, each with its devices.

    Replicas share one region; host kinds (NumPy, scalars) are one whole region.
    """
    leaf = step.target
    assert leaf.shape is not None and leaf.dtype is not None, f'unresolved {leaf.key!r}'
    if leaf.kind != 'jax.Array':
        return {regions.full(leaf.shape): []}
    by_region: dict[Region, list[jax.Device]] = collections.defaultdict(list)
    for device, index in placed_sharding(step).addressable_devices_indices_map(leaf.shape).items():
        assert index is not None, f'{leaf.key!r} has no index on {device}'
        by_region[regions.from_index(index, leaf.shape)].append(device)
    return by_region


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
    step: Step, region: Region, session: Session, on_bytes: Progress | None
) -> np.ndarray:
    try:
        block = await step.expr.evaluate(region, session)
    except SurgeryError as e:
        e.add_note(f'while computing target {step.key!r}')
        raise
    assert block.shape == regions.shape_of(region), (step.key, block.shape, region)
    if on_bytes is not None:
        on_bytes(block.nbytes)
    return block


def check_budget(max_inflight_bytes: int) -> None:
    """Raises unless the in-flight byte budget is positive."""
    if max_inflight_bytes <= 0:
        raise SurgeryError(f'max_inflight_bytes must be positive, not {max_inflight_bytes}.')
