"""The Orbax handler: restore a checkpoint straight into a different target tree.

`SurgeryRestore` works wherever Orbax takes `CheckpointArgs`:
`CheckpointManager.restore(step, args=SurgeryRestore(...))`, inside
`ocp.args.Composite(...)`, and `ocp.Checkpointer(SurgeryCheckpointHandler())`,
on checkpoints written by plain `StandardSave` or `PyTreeSave`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from orbax_surgery.checksums import Recorder, verified
from orbax_surgery.errors import RuleError, SurgeryError
from orbax_surgery.keys import PyTree
from orbax_surgery.materializer import DEFAULT_MAX_INFLIGHT_BYTES, materialize, run_sync
from orbax_surgery.plan import Plan, normalize_rules, resolve
from orbax_surgery.rules import Rule
from orbax_surgery.safetensors import SafetensorsCheckpoint, is_safetensors
from orbax_surgery.saving import PlannedSave, plan_save, save_with_rules, with_layer_chunks
from orbax_surgery.sources import DEFAULT_CACHE_BYTES, ArraySource, OrbaxCheckpoint, open_source


class PyTreeItemHandler(ocp.AsyncCheckpointHandler):
    """Base of this package's handlers: an Orbax PyTree item, written by Orbax's handler.

    Subclasses say how args become what `ocp.PyTreeCheckpointHandler` writes
    (`async_save`) and how a restore reads it; saving synchronously, metadata,
    finalizing and closing are the PyTree handler's.
    """

    def __init__(self, *, use_ocdbt: bool = True):
        self._impl = ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt)

    def save(self, directory: epath.Path, item: Any = None, args: Any = None) -> None:
        async def save_and_commit() -> None:
            for commit in await self.async_save(directory, item, args=args) or []:
                commit.result()

        run_sync(save_and_commit())

    async def save_tree(
        self,
        directory: Any,
        item: PyTree,
        *,
        save_args: PyTree | None,
        custom_metadata: dict[str, Any] | None,
        checksums: bool,
    ) -> Any:
        """Saves `item` as Orbax's PyTree handler does, with its checksums if asked.

        The checksums are computed before this returns (the caller may then
        change the arrays) and written beside Orbax's files before it finalizes.
        """
        commits = []
        if checksums:
            recorder = Recorder()
            recorder.add_tree(item, save_args)
            commits.append(recorder.commit(directory))
        pytree = ocp.args.PyTreeSave(
            item=item, save_args=save_args, custom_metadata=custom_metadata
        )
        return commits + list(await self._impl.async_save(directory, args=pytree) or [])

    def metadata(self, directory: epath.Path) -> Any:
        """The checkpoint's own tree metadata (a plan shows the restored tree's)."""
        return self._impl.metadata(directory)

    def finalize(self, directory: epath.Path) -> None:
        self._impl.finalize(directory)

    def close(self) -> None:
        self._impl.close()


class SurgeryCheckpointHandler(PyTreeItemHandler):
    """Saves like Orbax's PyTree handler; restores through surgery rules, lazily.

    Saving delegates to `ocp.PyTreeCheckpointHandler`, so what it writes is an
    ordinary Orbax checkpoint. Restoring with `SurgeryRestore` plans first
    (from metadata only), raises on any problem, then reads just the chunks
    this host's shards need.

    Example:
        >>> import tempfile, numpy as np
        >>> from orbax_surgery import Rename
        >>> path = tempfile.mkdtemp() + '/ckpt'
        >>> with ocp.StandardCheckpointer() as ckptr:
        ...     ckptr.save(path, {'dense': {'w': np.arange(6.0).reshape(2, 3)}})
        >>> with ocp.Checkpointer(SurgeryCheckpointHandler()) as ckptr:
        ...     out = ckptr.restore(path, args=SurgeryRestore(
        ...         target={'Dense': {'w': ...}}, rules=[Rename('dense/(.*)', r'Dense/\\1')]))
        >>> out['Dense']['w'].tolist()
        [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    """

    def __init__(self, *, use_ocdbt: bool = True, cache_bytes: int = DEFAULT_CACHE_BYTES):
        """Creates the handler.

        Args:
            use_ocdbt: Save in Orbax's OCDBT format (its default); restores read either.
            cache_bytes: TensorStore chunk cache shared by all arrays of one restore.
                Off by default: a restore already reads each stored chunk once per host.
        """
        super().__init__(use_ocdbt=use_ocdbt)
        self._cache_bytes = cache_bytes

    @classmethod
    def typestr(cls) -> str:
        return 'orbax_surgery.SurgeryCheckpointHandler'

    async def async_save(
        self, directory: epath.Path, item: Any = None, args: SurgerySave | None = None
    ) -> Any:
        _reject_positional(item, 'SurgerySave')
        if args is None:
            raise SurgeryError(
                'SurgeryCheckpointHandler saves only with args=SurgerySave(item=...).'
            )
        if args.planned is not None:
            recorder = Recorder() if args.checksums else None
            await save_with_rules(
                self._impl._handler_impl,  # noqa: SLF001 - the PyTree handler's own writer.
                directory,
                args.planned,
                custom_metadata=args.custom_metadata,
                max_inflight_bytes=args.max_inflight_bytes,
                recorder=recorder,
            )
            if recorder is not None:
                await recorder.write(directory)
            return []
        return await self.save_tree(
            directory,
            args.item,
            save_args=args.store_args,
            custom_metadata=args.custom_metadata,
            checksums=args.checksums,
        )

    def restore(
        self, directory: epath.Path, item: Any = None, args: SurgeryRestore | None = None
    ) -> PyTree:
        """Restores `args.target` through `args.rules`; with no args, as saved."""
        _reject_positional(item, 'SurgeryRestore')
        if args is None:
            return self._impl.restore(directory)
        source: ArraySource
        if is_safetensors(directory):
            source = SafetensorsCheckpoint(directory)
        else:
            source = OrbaxCheckpoint(directory, cache_bytes=self._cache_bytes)
        if args.verify:
            source = verified(source)
        plan = resolve(source.arrays, args.target, args.rules)
        return materialize(plan, source, max_inflight_bytes=args.max_inflight_bytes)


@ocp.args.register_with_handler(SurgeryCheckpointHandler, for_save=True)
@dataclasses.dataclass(kw_only=True)
class SurgerySave(ocp.args.CheckpointArgs):
    r"""Saves a tree, optionally in another layout, as an ordinary Orbax checkpoint.

    Without rules or target it saves as `ocp.args.StandardSave` would. With
    them, the saved tree is `item` transformed by `rules` into `target`
    (e.g. an unrolled model saved scanned), computed a few leaves at a time
    so the converted tree never exists whole in memory.

    Attributes:
        item: The tree to save. With `rules` or `target` it may also be a source
            (`OrbaxCheckpoint`, `SafetensorsCheckpoint`), converted without
            loading it whole.
        rules: Rules from `item`'s keys to the saved tree's, as for restoring.
        target: The saved tree's leaves (shapes, dtypes, shardings), or None
            to take them from the rules. Leaves without a sharding inherit
            their input's (a stack adds an unpartitioned layer axis).
        save_args: Optional tree of `ocp.SaveArgs` for the saved tree.
        layer_axes: `{key regex: layer axis}` of saved stacked arrays to store
            one layer per chunk, so later single-layer reads read only it.
        custom_metadata: JSON-serializable metadata stored with the tree.
        progress: With rules, called with the bytes of each block computed
            (`planned.nbytes` in all), e.g. to drive a progress bar.
        max_inflight_bytes: Host bytes of converted leaves computed at once.
        checksums: Also record a digest of every block each process writes,
            in `_CHECKSUMS/`, so that restores with `verify=True` detect any
            change to the stored values (see `orbax_surgery.checksums`).
        planned: The checked plan, made when the args are built, so that bad
            rules raise there, before Orbax starts a checkpoint.
        store_args: Without rules, the `SaveArgs` passed to Orbax (`layer_axes`
            applied), likewise checked when the args are built.

    Example:
        >>> import tempfile, numpy as np
        >>> from orbax_surgery import Stack
        >>> path = tempfile.mkdtemp() + '/scanned'
        >>> unrolled = {'layers_0': {'w': np.zeros(2)}, 'layers_1': {'w': np.ones(2)}}
        >>> stack = Stack(r'layers_{i}/(.*)', r'layers/\1')
        >>> with ocp.Checkpointer(SurgeryCheckpointHandler()) as ckptr:
        ...     ckptr.save(path, args=SurgerySave(item=unrolled, rules=[stack]))
        >>> with ocp.StandardCheckpointer() as ckptr:  # An ordinary Orbax checkpoint.
        ...     ckptr.restore(path)['layers']['w'].shape
        (2, 2)
    """

    item: PyTree
    rules: Sequence[Rule] | Mapping[str, Any] = ()
    target: PyTree = None
    save_args: PyTree | None = None
    layer_axes: Mapping[str, int] = dataclasses.field(default_factory=dict)
    custom_metadata: dict[str, Any] | None = None
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES
    progress: Callable[[int], None] | None = dataclasses.field(default=None, compare=False)
    checksums: bool = False
    planned: PlannedSave | None = dataclasses.field(
        init=False, default=None, repr=False, compare=False
    )
    store_args: PyTree | None = dataclasses.field(
        init=False, default=None, repr=False, compare=False
    )

    def __post_init__(self):
        self.rules = checked_rules(self.rules)
        check_budget(self.max_inflight_bytes)
        # Planned here, so bad rules or save args fail before Orbax starts a checkpoint.
        if self.rules or self.target is not None:
            planned = plan_save(self.item, self.target, self.rules, self.save_args, self.layer_axes)
            self.planned = dataclasses.replace(planned, on_bytes=self.progress)
        elif self.layer_axes:
            self.store_args = with_layer_chunks(self.save_args, self.item, self.layer_axes)
        else:
            self.store_args = self.save_args


@ocp.args.register_with_handler(SurgeryCheckpointHandler, for_restore=True)
@dataclasses.dataclass(kw_only=True)
class SurgeryRestore(ocp.args.CheckpointArgs):
    """Restores a checkpoint into `target` through `rules`.

    Attributes:
        target: The tree to produce. Leaves are `jax.ShapeDtypeStruct`s (with
            shardings), concrete arrays or scalars (shape, dtype and sharding
            taken from them; their values serve `Fallback`), or `...` to take
            shape and dtype from the rules. None restores every key the rules
            leave, as nested dicts.
        rules: The package's rules, applied in order, or an Orbax `Transform`
            tree (`{target_regex: ocp.Transform(...)}`), taken as
            `OrbaxTransforms`.
        max_inflight_bytes: Host memory for data read but not yet placed.
        verify: Check every block read against the checksums recorded by a
            save or safetensors export with `checksums=True`; raises
            `ChecksumMismatchError` on a difference, and `SourceReadError` for
            a checkpoint without them.
            Reads whole stored blocks (see `orbax_surgery.checksums`).

    The directory restored may also hold Hugging Face safetensors (shards with
    their index): `ocp.Checkpointer(SurgeryCheckpointHandler()).restore(
    hf_dir, args=SurgeryRestore(...))` gives sharded jax.Arrays directly.

    Example:
        >>> import tempfile, numpy as np
        >>> from orbax_surgery import Drop, Rename
        >>> root = tempfile.mkdtemp()
        >>> with ocp.CheckpointManager(root) as manager:  # Saved by plain Orbax.
        ...     _ = manager.save(1, args=ocp.args.StandardSave({'dense': np.ones(2), 'step': 1}))
        >>> rules = [Rename('dense', 'Dense'), Drop('step')]
        >>> args = SurgeryRestore(target={'Dense': ...}, rules=rules)
        >>> with ocp.CheckpointManager(root) as manager:
        ...     out = manager.restore(1, args=args)
        >>> list(out), out['Dense'].tolist()
        (['Dense'], [1.0, 1.0])
    """

    target: PyTree = None
    rules: Sequence[Rule] | Mapping[str, Any] = ()
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES
    verify: bool = False

    def __post_init__(self):
        self.rules = checked_rules(self.rules)
        check_budget(self.max_inflight_bytes)


def restore(
    source: epath.PathLike | ArraySource,
    target: PyTree = None,
    rules: Sequence[Rule] | Mapping[str, Any] = (),
    *,
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
    verify: bool = False,
) -> PyTree:
    """Restores `target` from any source, outside a `CheckpointManager`.

    `source` is an Orbax checkpoint item directory, a Hugging Face safetensors
    file or directory (sharded with its index), or a source object. Each host
    reads only what its shards need. With `verify=True`, every block read is
    checked against the checksums a save or export with `checksums=True` recorded.

    Example:
        >>> import tempfile, jax, numpy as np
        >>> from orbax_surgery import Rename, Transpose
        >>> from orbax_surgery.safetensors import write_file
        >>> path = tempfile.mkdtemp() + '/model.safetensors'
        >>> write_file(path, {'proj.weight': np.arange(6, dtype=np.float32).reshape(2, 3)})
        >>> out = restore(path, {'proj': {'kernel': ...}},
        ...               [Rename('proj/weight', 'proj/kernel'), Transpose('proj/kernel', (1, 0))])
        >>> kernel = out['proj']['kernel']
        >>> isinstance(kernel, jax.Array), kernel.dtype.name, kernel.tolist()
        (True, 'float32', [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]])
    """
    opened = open_source(source)
    if verify:
        opened = verified(opened)
    plan = resolve(opened.arrays, target, checked_rules(rules))
    return materialize(plan, opened, max_inflight_bytes=max_inflight_bytes)


def plan_restore(
    directory: epath.PathLike | ArraySource,
    target: PyTree = None,
    rules: Sequence[Rule] | Mapping[str, Any] = (),
) -> Plan:
    """Plans restoring the checkpoint at `directory`, reading no array data.

    `directory` is an Orbax checkpoint item, or Hugging Face safetensors (a
    file, or a directory with `model.safetensors` or its sharded index).

    Print the plan to see where each target leaf comes from, what is unused,
    which leaves are not lazy and how many bytes each process will read.

    Example:
        >>> import tempfile, jax, numpy as np
        >>> from orbax_surgery import Drop
        >>> path = tempfile.mkdtemp() + '/ckpt'
        >>> with ocp.StandardCheckpointer() as ckptr:
        ...     ckptr.save(path, {'w': np.ones((4, 8), np.float32), 'opt': np.zeros(3)})
        >>> target = {'w': jax.ShapeDtypeStruct((4, 8), np.float32)}
        >>> plan = plan_restore(path, target, [Drop('opt')])
        >>> plan.errors, plan.steps[0].sources, plan.reads[0].needed
        ((), ('w',), 128)
    """
    return resolve(open_source(directory).arrays, target, rules)


def checked_rules(rules: Sequence[Rule] | Mapping[str, Any]) -> tuple[Rule, ...]:
    """The rules as a tuple (an Orbax Transform tree wrapped), each checked to be a rule."""
    checked = normalize_rules(rules)
    for i, rule in enumerate(checked):
        if not callable(getattr(rule, 'apply', None)):
            raise RuleError(
                f'rules[{i}] is a {type(rule).__name__}, not a rule. Pass Orbax transforms '
                'as one dict {target_regex: Transform}, or wrap it in OrbaxTransforms.'
            )
    return checked


def check_budget(max_inflight_bytes: int) -> None:
    """Raises unless the in-flight byte budget is positive."""
    if max_inflight_bytes <= 0:
        raise SurgeryError(f'max_inflight_bytes must be positive, not {max_inflight_bytes}.')


def _reject_positional(item: Any, args_name: str) -> None:
    if isinstance(item, ocp.args.CheckpointArgs):
        raise SurgeryError(
            f'{type(item).__name__} was passed positionally; pass it as args={args_name}(...).'
        )
