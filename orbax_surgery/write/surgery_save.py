"""Surgery on save: write a tree in another layout without building it whole.

`SurgerySave(item, rules=...)` plans the target from the live tree, as a
restore plans from a checkpoint, then computes the target a few leaves at a
time (at most `max_inflight_bytes` of this host's shards), hands each group
to Orbax's own array writers and frees it before the next. The result is an
ordinary Orbax PyTree checkpoint, with `_METADATA` written last for the whole
tree. Orbax's checkpointers write into a temporary directory and finalize it
only after the save succeeds, so a failed save leaves no finalized checkpoint.

This drives three internals of `ocp.BasePyTreeCheckpointHandler` (its param
infos, its I/O engine and its metadata writer); `tests/write/surgery_save_test.py` pins
the output against plain Orbax restores.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec
from orbax.checkpoint._src.handlers import base_pytree_checkpoint_handler as base_handler

from orbax_surgery.arrays import expr as ex
from orbax_surgery.arrays import ops, regions
from orbax_surgery.arrays.value_functions import Elementwise
from orbax_surgery.errors import RuleError
from orbax_surgery.keys import KeyPath, KeyPattern, PyTree, did_you_mean, flatten
from orbax_surgery.plan.plan import Plan, Step
from orbax_surgery.plan.resolve import Rules, resolve
from orbax_surgery.read.materialize import compute_leaves, host_regions
from orbax_surgery.sources.source import ArraySource
from orbax_surgery.sources.tree import TreeSource
from orbax_surgery.write.checksums import Recorder


def layer_save_args(tree: PyTree, layer_axes: Mapping[str, int]) -> PyTree:
    r"""`ocp.SaveArgs` that store one layer per chunk, for stacked arrays.

    Later reads of single layers (unrolling, pipeline stages, layer subsets)
    then read only their layers. Works with plain `StandardSave`/`PyTreeSave`
    too. Leaves whose key fully matches a pattern of `layer_axes` are chunked
    along that pattern's layer axis; others keep Orbax's default.

    Example:
        >>> import numpy as np
        >>> args = layer_save_args({'layers': {'w': np.zeros((4, 8))}}, {'layers/.*': 0})
        >>> args['layers']['w'].shard_axes
        (0,)
    """
    flat, treedef = flatten(tree)
    patterns = {KeyPattern(p, 'layer_axes'): int(a) for p, a in layer_axes.items()}
    for pattern in patterns:
        if not any(pattern.fullmatch(k) for k in flat):
            raise RuleError(
                f'layer_axes pattern {pattern.pattern!r} matches none of the {len(flat)} keys.'
                f'{did_you_mean(pattern.pattern, flat)}'
            )
    args = []
    for key, leaf in flat.items():
        axis = next((a for p, a in patterns.items() if p.fullmatch(key)), None)
        args.append(ocp.SaveArgs() if axis is None else _layer_args(key, leaf, axis))
    return jax.tree_util.tree_unflatten(treedef, args)


def _layer_args(key: KeyPath, leaf: Any, axis: int) -> ocp.SaveArgs:
    shape = tuple(np.shape(leaf))
    if not -len(shape) <= axis < len(shape):
        raise RuleError(f'Layer axis {axis} is out of range for {key!r} of shape {shape}.')
    # Splitting the layer axis first, Orbax stops at one layer per chunk.
    return ocp.SaveArgs(shard_axes=(axis % len(shape),))


@dataclasses.dataclass(frozen=True)
class PlannedSave:
    """A checked save with surgery: what to compute, and how Orbax stores each leaf.

    Attributes:
        source: Where the saved tree's inputs are read: the live item, or a
            checkpoint being converted.
        plan: The checked plan.
        steps: The plan's steps, each target leaf with the sharding it is saved with.
        save_args: One `ocp.SaveArgs` per saved leaf.
        on_bytes: Called with the bytes of each block computed, for progress.
    """

    source: ArraySource
    plan: Plan
    steps: tuple[Step, ...]
    save_args: PyTree
    on_bytes: Callable[[int], None] | None = dataclasses.field(
        default=None, compare=False, repr=False
    )

    @property
    def nbytes(self) -> int:
        """Bytes of the saved leaves' shards on this host: the total `on_bytes` reports."""
        return sum(_host_bytes(step) for step in self.steps)


def plan_save(
    item: PyTree | ArraySource,
    target: PyTree,
    rules: Rules,
    save_args: PyTree | None = None,
    layer_axes: Mapping[str, int] | None = None,
) -> PlannedSave:
    """Plans a save with surgery from metadata alone; raises before anything is written.

    `item` is a live tree, or a source (`OrbaxCheckpoint`,
    `SafetensorsCheckpoint`, ...) to convert without loading it: the saved
    tree is then computed from it a few leaves at a time, as from a tree.
    """
    source = item if is_source(item) else TreeSource(item)
    plan = resolve(source.arrays, target, rules)
    plan.check()
    steps = tuple(_with_sharding(step, source) for step in plan.steps)
    shaped = _tree(plan, [_abstract(step) for step in steps])
    return PlannedSave(source, plan, steps, with_layer_chunks(save_args, shaped, layer_axes))


def is_source(item: Any) -> bool:
    """Whether `item` is an array source (read lazily) rather than a tree of values."""
    kind = type(item)
    return callable(getattr(kind, 'read', None)) and callable(getattr(kind, 'open', None))


def with_layer_chunks(
    save_args: PyTree | None, tree: PyTree, layer_axes: Mapping[str, int] | None
) -> PyTree:
    """One `SaveArgs` per leaf of `tree` (None: Orbax's default), one layer per chunk
    where `layer_axes` says."""
    save_args = _full_save_args(save_args, tree)
    if layer_axes:
        save_args = jax.tree.map(merge_save_args, save_args, layer_save_args(tree, layer_axes))
    return save_args


async def save_with_rules(
    handler: ocp.BasePyTreeCheckpointHandler,
    directory: epath.Path,
    planned: PlannedSave,
    *,
    custom_metadata: dict[str, Any] | None,
    max_inflight_bytes: int,
    recorder: Recorder | None = None,
) -> None:
    """Writes a planned save into `directory` as Orbax's own PyTree handler would.

    With a `recorder`, each group of computed leaves is hashed before it is freed.
    """
    source, plan, steps, save_args = (
        planned.source,
        planned.plan,
        planned.steps,
        planned.save_args,
    )
    args_by_key = dict(zip(plan.target_keys, jax.tree.leaves(save_args), strict=True))
    infos = handler._get_param_infos(  # noqa: SLF001 - the handler's own naming and context.
        _tree(plan, [_stand_in(step) for step in steps]),
        directory,
        use_ocdbt=handler._use_ocdbt,  # noqa: SLF001
        use_zarr3=handler._use_zarr3,  # noqa: SLF001
    )
    infos_by_key = dict(
        zip(plan.target_keys, jax.tree.leaves(infos, is_leaf=_is_info), strict=True)
    )
    for group in _groups(steps, max_inflight_bytes):
        values = await compute_leaves(group, source, max_inflight_bytes, planned.on_bytes)
        keys = [step.key for step in group]
        if recorder is not None:
            for key in keys:
                recorder.add(key, values[key], args_by_key[key])
        requests = base_handler.batched_serialization_requests(
            {k: values[k] for k in keys},
            {k: infos_by_key[k] for k in keys},
            {k: args_by_key[k] for k in keys},
            handler._type_handler_registry,  # noqa: SLF001
        )
        commits = await handler._async_io_engine.execute_save(requests)  # noqa: SLF001
        del values  # Orbax holds its host copies until the writes finish.
        await asyncio.gather(*(asyncio.to_thread(f.result) for f in jax.tree.leaves(commits)))
    await handler._write_metadata_file(  # noqa: SLF001
        directory,
        param_infos=infos,
        save_args=save_args,
        custom_metadata=custom_metadata,
        use_ocdbt=handler._use_ocdbt,  # noqa: SLF001
        use_zarr3=handler._use_zarr3,  # noqa: SLF001
    )


def _full_save_args(save_args: PyTree | None, shaped: PyTree) -> PyTree:
    """One `SaveArgs` per saved leaf; None (or a None leaf) means Orbax's default."""
    if save_args is None:
        return jax.tree.map(lambda _: ocp.SaveArgs(), shaped)
    try:
        return jax.tree.map(lambda _, a: a or ocp.SaveArgs(), shaped, save_args)
    except ValueError as e:
        raise RuleError(
            f'save_args must have the structure of the saved (post-surgery) tree, '
            f'{jax.tree.structure(shaped)}: {e}'
        ) from e


def _tree(plan: Plan, leaves: Sequence[Any]) -> PyTree:
    by_key = dict(zip([s.key for s in plan.steps], leaves, strict=True))
    return jax.tree_util.tree_unflatten(plan.treedef, [by_key[k] for k in plan.target_keys])


def _is_info(x: Any) -> bool:
    return isinstance(x, ocp.type_handlers.ParamInfo)


def merge_save_args(given: ocp.SaveArgs | None, layered: ocp.SaveArgs) -> ocp.SaveArgs:
    given = given or ocp.SaveArgs()
    if not layered.shard_axes:
        return given
    return dataclasses.replace(given, shard_axes=layered.shard_axes)


def _abstract(step: Step) -> jax.ShapeDtypeStruct:
    leaf = step.target
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)


def _stand_in(step: Step) -> Any:
    """A tiny value of the leaf's kind: Orbax names its type in `_METADATA` from it."""
    leaf = step.target
    assert leaf.dtype is not None
    if leaf.kind == 'jax.Array':
        return jax.numpy.zeros((), leaf.dtype)
    if leaf.kind == 'np.ndarray':
        return np.zeros((), leaf.dtype)
    return np.zeros((), leaf.dtype).item()


def _groups(steps: Sequence[Step], budget: int) -> Iterator[list[Step]]:
    """Consecutive steps whose shards on this host fit in `budget` (at least one)."""
    group: list[Step] = []
    size = 0
    for step in steps:
        nbytes = _host_bytes(step)
        if group and size + nbytes > budget:
            yield group
            group, size = [], 0
        group.append(step)
        size += nbytes
    if group:
        yield group


def _host_bytes(step: Step) -> int:
    assert step.target.dtype is not None
    return sum(map(regions.size_of, host_regions(step))) * step.target.dtype.itemsize


def _with_sharding(step: Step, source: ArraySource) -> Step:
    """A target leaf without a sharding gets the one its inputs suggest.

    Converted from a checkpoint, such a leaf is written as a NumPy array: its
    inputs have no devices, and the checkpoint then names none (a restore
    places it wherever its target says).
    """
    leaf = step.target
    if leaf.kind != 'jax.Array' or leaf.sharding is not None:
        return step
    if not isinstance(source, TreeSource):
        return dataclasses.replace(step, target=dataclasses.replace(leaf, kind='np.ndarray'))
    values = source.values
    sharding = natural_sharding(step.expr, values) or _fallback_sharding(values)
    return dataclasses.replace(step, target=dataclasses.replace(leaf, sharding=sharding))


def natural_sharding(node: ex.Expr, values: Mapping[KeyPath, Any]) -> jax.sharding.Sharding | None:
    """The sharding a derived array inherits from its inputs, where one is clear.

    A slice keeps the input's partitioning on the axes it keeps whole, a stack
    adds an unpartitioned layer axis, a transpose permutes the partitioning.
    """
    if isinstance(node, ex.Source):
        return getattr(values.get(node.key), 'sharding', None)
    if isinstance(node, ops.Cast | Elementwise):
        return natural_sharding(node.children[0], values)
    if isinstance(node, ops.Index | ops.Stack | ops.Transpose):
        inner = natural_sharding(node.children[0], values)
        if not isinstance(inner, NamedSharding):
            return None
        spec = list(inner.spec) + [None] * (len(node.children[0].shape) - len(inner.spec))
        if isinstance(node, ops.Index):
            spec = [
                s if i == range(n) else None
                for s, i, n in zip(spec, node.index, node.base.shape, strict=True)
                if not isinstance(i, int)
            ]
        elif isinstance(node, ops.Stack):
            if any(natural_sharding(p, values) != inner for p in node.parts):
                return None
            spec.insert(node.axis, None)
        else:
            spec = [spec[a] for a in node.axes]
        return NamedSharding(inner.mesh, PartitionSpec(*spec))
    return None


def _fallback_sharding(values: Mapping[KeyPath, Any]) -> jax.sharding.Sharding:
    """Replicated over the item's mesh (Orbax writes one replica), else one device."""
    for value in values.values():
        sharding = getattr(value, 'sharding', None)
        if isinstance(sharding, NamedSharding):
            return NamedSharding(sharding.mesh, PartitionSpec())
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
