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

from orbax_surgery.errors import SurgeryError
from orbax_surgery.keys import PyTree
from orbax_surgery.orbax import manager_items
from orbax_surgery.orbax.item_handler import PyTreeItemHandler, args_repr, reject_positional
from orbax_surgery.plan.plan import Plan
from orbax_surgery.plan.resolve import checked_rules, resolve
from orbax_surgery.read.materialize import DEFAULT_MAX_INFLIGHT_BYTES, check_budget, materialize
from orbax_surgery.read.verify import verified
from orbax_surgery.rules.rule import Rule
from orbax_surgery.sources.orbax_checkpoint import DEFAULT_CACHE_BYTES, OrbaxCheckpoint
from orbax_surgery.sources.pytorch_checkpoint import PyTorchCheckpoint
from orbax_surgery.sources.pytorch_files import is_pytorch
from orbax_surgery.sources.safetensors import SafetensorsCheckpoint, is_safetensors
from orbax_surgery.sources.source import ArraySource
from orbax_surgery.write.checksums import Recorder
from orbax_surgery.write.surgery_save import (
    PlannedSave,
    plan_save,
    save_with_rules,
    with_layer_chunks,
)


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

    def __init__(
        self,
        *,
        use_ocdbt: bool = True,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        read_gap_bytes: int = 0,
    ):
        """Creates the handler.

        Args:
            use_ocdbt: Save in Orbax's OCDBT format (its default); restores read either.
            cache_bytes: TensorStore chunk cache shared by all arrays of one restore.
                Off by default: a restore already reads each stored chunk once per host.
            read_gap_bytes: In object storage, unneeded bytes between two needed chunks
                that one ranged request may fetch to save a round trip. 0 (the default)
                reads exactly the needed chunks; Orbax itself allows 1 MB.
        """
        super().__init__(use_ocdbt=use_ocdbt)
        self._cache_bytes = cache_bytes
        self._read_gap_bytes = read_gap_bytes

    @classmethod
    def typestr(cls) -> str:
        return 'orbax_surgery.SurgeryCheckpointHandler'

    async def async_save(
        self, directory: epath.Path, item: Any = None, args: SurgerySave | None = None
    ) -> Any:
        reject_positional(item, 'SurgerySave')
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
        reject_positional(item, 'SurgeryRestore')
        if args is None:
            return self._impl.restore(directory)
        plan, source = self.plan_restore(directory, args)
        return materialize(plan, source, max_inflight_bytes=args.max_inflight_bytes)

    def plan_restore(self, directory: epath.Path, args: SurgeryRestore) -> tuple[Plan, ArraySource]:
        """The checked plan of a restore and the source it reads; reads no array data.

        Raises:
            SurgeryError: The plan's first error (the others attached as notes).
        """
        source: ArraySource
        if is_safetensors(directory):
            source = SafetensorsCheckpoint(directory)
        elif is_pytorch(directory):
            source = PyTorchCheckpoint(directory)
        else:
            source = OrbaxCheckpoint(
                directory, cache_bytes=self._cache_bytes, read_gap_bytes=self._read_gap_bytes
            )
        if args.verify:
            source = verified(source)
        plan = resolve(source.arrays, args.target, args.rules)
        plan.check()
        return plan, source


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
            (`OrbaxCheckpoint`, `SafetensorsCheckpoint`, `PyTorchCheckpoint`), converted without
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
            change to the stored values (see `orbax_surgery.read.verify`).
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

    def __repr__(self):
        return args_repr(self)

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
            Reads whole stored blocks (see `orbax_surgery.read.verify`).

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

    def __repr__(self):
        return args_repr(self)

    def __post_init__(self):
        self.rules = checked_rules(self.rules)
        check_budget(self.max_inflight_bytes)


# Part of registering with Orbax: an item a manager saved with Orbax's args also takes ours.
manager_items.allow()
