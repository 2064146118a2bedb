"""LoRA checkpoints in Orbax: save only what trains, restore onto a frozen base."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from orbax_surgery.errors import LoraMismatchError, SurgeryError, UnmatchedKeyError
from orbax_surgery.keys import KeyPath, PyTree, did_you_mean, flatten, nest
from orbax_surgery.lora.adapter import canonical, canonical_shapes
from orbax_surgery.lora.layout import LoraLayout
from orbax_surgery.lora.restore_plan import MODES, Mode, Prepared, plan_adapters, restore_planned
from orbax_surgery.lora.spec import LoraSpec
from orbax_surgery.orbax.item_handler import PyTreeItemHandler, args_repr
from orbax_surgery.plan.plan import Plan
from orbax_surgery.plan.resolve import Rules, checked_rules
from orbax_surgery.read.materialize import DEFAULT_MAX_INFLIGHT_BYTES, check_budget
from orbax_surgery.read.verify import verified
from orbax_surgery.sources.open import open_source
from orbax_surgery.sources.orbax_checkpoint import OrbaxCheckpoint
from orbax_surgery.sources.source import ArraySource

METADATA_KEY = 'orbax_surgery.lora'


class LoraCheckpointHandler(PyTreeItemHandler):
    """Saves adapters with their layout; restores them alone or onto a base.

    What it writes is an ordinary Orbax PyTree item (plus metadata), so plain
    `StandardRestore` can read the adapters too.

    Example:
        >>> import tempfile, jax, numpy as np
        >>> from orbax_surgery import LoraSpec
        >>> root = tempfile.mkdtemp()
        >>> params = {'dense': {'kernel': np.ones((4, 6), np.float32)}}
        >>> with ocp.StandardCheckpointer() as ckptr:
        ...     ckptr.save(f'{root}/base', params)
        >>> lora = LoraSpec(['dense/kernel'], rank=2, alpha=4).bind(params)
        >>> trainable = {'dense': {'kernel_lora_a': np.ones((4, 2), np.float32),
        ...                        'kernel_lora_b': np.full((2, 6), 0.25, np.float32)}}
        >>> with ocp.Checkpointer(LoraCheckpointHandler()) as ckptr:
        ...     ckptr.save(f'{root}/adapters', args=LoraSave(item=trainable, lora=lora))
        ...     merged = ckptr.restore(f'{root}/adapters', args=LoraRestore(base=f'{root}/base'))
        >>> merged['dense']['kernel'][0].tolist()  # 1 + (4 / 2) * (1 * 0.25 + 1 * 0.25)
        [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    """

    @classmethod
    def typestr(cls) -> str:
        return 'orbax_surgery.LoraCheckpointHandler'

    async def async_save(
        self, directory: epath.Path, item: Any = None, args: LoraSave | None = None
    ) -> Any:
        if args is None or item is not None:
            raise SurgeryError('LoraCheckpointHandler saves only with args=LoraSave(item, lora).')
        record = {'layout': args.layout.to_json(), 'spec': args.spec_json}
        metadata = {**(args.custom_metadata or {}), METADATA_KEY: record}
        return await self.save_tree(
            directory,
            args.trainable,
            save_args=args.save_args,
            custom_metadata=metadata,
            checksums=args.checksums,
        )

    def restore(
        self, directory: epath.Path, item: Any = None, args: LoraRestore | None = None
    ) -> PyTree:
        if args is None:
            return self._impl.restore(directory)
        if item is not None:
            raise SurgeryError('Pass LoraRestore as args=LoraRestore(...), not positionally.')
        return restore_planned(prepare_restore(directory, args), args.max_inflight_bytes)


@ocp.args.register_with_handler(LoraCheckpointHandler, for_save=True)
@dataclasses.dataclass(kw_only=True)
class LoraSave(ocp.args.CheckpointArgs):
    """Saves only the trainable params (adapters and fully trained ones) and the layout.

    Attributes:
        item: A tree holding the trainable params: the trainable tree itself,
            a joined tree, or `nnx.state(model)` (frozen leaves are skipped).
        lora: The `LoraLayout` (`spec.bind(params)`), or a `LoraSpec` when
            `item` also holds the base weights to bind it to.
        save_args: Optional `ocp.SaveArgs` tree for the trainable tree.
        custom_metadata: More JSON metadata to store beside the layout.
        checksums: Also record a digest of every saved block, for restores
            with `verify=True` (see `orbax_surgery.read.verify`).
        layout: The resolved layout (set when the args are built).
        trainable: The tree written, checked when the args are built.

    Example:
        >>> import tempfile, jax, numpy as np
        >>> from orbax_surgery import LoraSpec
        >>> params = {'dense': {'kernel': np.ones((4, 6), np.float32)},
        ...           'head': {'kernel': np.ones((6, 2), np.float32)}}
        >>> lora = LoraSpec(['dense/kernel'], rank=2, train=['head/kernel']).bind(params)
        >>> trainable = lora.init(params, jax.random.key(0))  # Then train it.
        >>> root = tempfile.mkdtemp()
        >>> with ocp.CheckpointManager(root) as manager:
        ...     _ = manager.save(1, args=ocp.args.Composite(
        ...         adapters=LoraSave(item=trainable, lora=lora)))  # No base weights.
        >>> print(read_lora_layout(f'{root}/1/adapters'))
        LoRA layout: 1 adapters, 1 trained in full
          dense/kernel (4, 6): rank 2, scale 1, A (4, 2), B (2, 6)
          head/kernel (6, 2): trained in full
    """

    item: PyTree
    lora: LoraLayout | LoraSpec
    save_args: PyTree | None = None
    custom_metadata: dict[str, Any] | None = None
    checksums: bool = False
    layout: LoraLayout = dataclasses.field(init=False, repr=False, compare=False)
    trainable: dict[str, Any] = dataclasses.field(init=False, repr=False, compare=False)
    spec_json: dict[str, Any] | None = dataclasses.field(init=False, repr=False, compare=False)

    def __repr__(self):
        return args_repr(self)

    def __post_init__(self):
        self.spec_json = self.lora.to_json() if isinstance(self.lora, LoraSpec) else None
        if isinstance(self.lora, LoraSpec):
            try:
                self.layout = self.lora.bind(self.item)
            except UnmatchedKeyError as e:
                raise UnmatchedKeyError(
                    f'{e} LoraSave binds a LoraSpec to the saved item, which then needs the '
                    'base weights; to save a trainable-only tree pass lora=spec.bind(params).'
                ) from e
        elif isinstance(self.lora, LoraLayout):
            self.layout = self.lora
        else:
            raise SurgeryError(f'lora must be a LoraLayout or LoraSpec, not {type(self.lora)}.')
        self.trainable = trainable_of(self.item, self.layout)


@ocp.args.register_with_handler(LoraCheckpointHandler, for_restore=True)
@dataclasses.dataclass(kw_only=True)
class LoraRestore(ocp.args.CheckpointArgs):
    """Restores saved adapters, alone or onto a base checkpoint.

    Modes (with `base`):
        'merge': the target tree with each adapted weight `W + scale * A @ B`,
            computed per target shard from just its rows of `A` and columns
            of `B`; fully trained params come from the adapter checkpoint.
        'attach': the base with the adapters beside their weights (what an
            NNX model built with `nnx.LoRALinear` holds). Adapter keys the
            target lacks are added, sharded like their weight's axes.
        'split': `(frozen, trainable)`, two trees, as `LoraLayout.split` gives.
        'unmerge': `base` holds merged weights; returns `W' - scale * A @ B`.
    Without `base`, the trainable tree alone, as saved.

    Attributes:
        base: The base checkpoint: an Orbax PyTree item directory, or Hugging
            Face safetensors (with `base_rules=from_pytorch(...)`).
        target: The tree to build (abstract or concrete leaves, with shardings),
            without adapters for 'merge'. None takes keys from the checkpoints.
        mode: One of 'merge', 'attach', 'split', 'unmerge'.
        lora: A `LoraSpec` or `LoraLayout` to check against the saved layout;
            None trusts the saved one (nothing to re-type).
        base_rules: Rules from the base checkpoint's keys to the target's
            (renames, `Unstack`, `Drop('opt_state/.*')`, ...).
        max_inflight_bytes: Host bytes read but not yet placed on devices.
        verify: Check every block read, of the adapters and of the base,
            against the checksums their saves recorded (`checksums=True`);
            both must have them (see `orbax_surgery.read.verify`).

    Example:
        >>> import tempfile, numpy as np
        >>> from orbax_surgery import LoraSpec
        >>> root = tempfile.mkdtemp()
        >>> params = {'dense': {'kernel': np.ones((4, 6), np.float32)}}
        >>> with ocp.StandardCheckpointer() as ckptr:
        ...     ckptr.save(f'{root}/base', params)
        >>> lora = LoraSpec(['dense/kernel'], rank=2).bind(params)
        >>> trainable = {'dense': {'kernel_lora_a': np.ones((4, 2), np.float32),
        ...                        'kernel_lora_b': np.ones((2, 6), np.float32)}}
        >>> with ocp.CheckpointManager(f'{root}/run') as manager:
        ...     _ = manager.save(1, args=ocp.args.Composite(
        ...         adapters=LoraSave(item=trainable, lora=lora)))
        >>> split = LoraRestore(base=f'{root}/base', mode='split')  # To go on training.
        >>> with ocp.CheckpointManager(f'{root}/run') as manager:
        ...     frozen, trainable = manager.restore(
        ...         1, args=ocp.args.Composite(adapters=split)).adapters
        >>> frozen['dense']['kernel'].shape, sorted(trainable['dense'])
        ((4, 6), ['kernel_lora_a', 'kernel_lora_b'])
    """

    base: epath.PathLike | None = None
    target: PyTree = None
    mode: Mode = 'merge'
    lora: LoraLayout | LoraSpec | None = None
    base_rules: Rules = ()
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES
    verify: bool = False

    def __repr__(self):
        return args_repr(self)

    def __post_init__(self):
        if self.mode not in MODES:
            raise SurgeryError(f'LoraRestore mode {self.mode!r} is not one of {MODES}.')
        if self.base is None and self.mode != 'merge':
            raise SurgeryError(f'LoraRestore(mode={self.mode!r}) needs base=<base checkpoint dir>.')
        self.base_rules = checked_rules(self.base_rules)
        check_budget(self.max_inflight_bytes)


def read_lora_layout(directory: epath.PathLike) -> LoraLayout:
    """The layout a `LoraSave` checkpoint item recorded, reading no array data.

    Raises:
        LoraMismatchError: `LoraSave` did not write the item (no layout in its metadata).

    Example:
        >>> import tempfile, numpy as np
        >>> from orbax_surgery import LoraSpec
        >>> path = tempfile.mkdtemp() + '/adapters'
        >>> lora = LoraSpec(['w'], rank=2, alpha=4).bind({'w': np.zeros((8, 8), np.float32)})
        >>> trainable = {'w_lora_a': np.zeros((8, 2), np.float32),
        ...              'w_lora_b': np.zeros((2, 8), np.float32)}
        >>> with ocp.Checkpointer(LoraCheckpointHandler()) as ckptr:
        ...     ckptr.save(path, args=LoraSave(item=trainable, lora=lora))
        >>> print(read_lora_layout(path))
        LoRA layout: 1 adapters, 0 trained in full
          w (8, 8): rank 2, scale 2, A (8, 2), B (2, 8)
    """
    return _layout_of(OrbaxCheckpoint(directory))


def _layout_of(checkpoint: OrbaxCheckpoint) -> LoraLayout:
    if METADATA_KEY not in checkpoint.custom_metadata:
        raise LoraMismatchError(
            f'{checkpoint.directory} holds no LoRA layout in its metadata: it was not saved with '
            'LoraSave. Restore it with SurgeryRestore, or pass the adapters as a LoraSave '
            'checkpoint.'
        )
    return LoraLayout.from_json(checkpoint.custom_metadata[METADATA_KEY]['layout'])


def plan_lora_restore(directory: epath.PathLike, args: LoraRestore) -> Plan:
    """Plans a `LoraRestore` of the adapter item at `directory`, reading no array data.

    Print the plan to see each merge (`W + scale * A @ B`), what is unused and
    the bytes each process will read.

    Example:
        >>> import tempfile, numpy as np
        >>> from orbax_surgery import LoraSpec
        >>> root = tempfile.mkdtemp()
        >>> params = {'w': np.zeros((8, 8), np.float32)}
        >>> with ocp.StandardCheckpointer() as ckptr:
        ...     ckptr.save(f'{root}/base', params)
        >>> lora = LoraSpec(['w'], rank=2, alpha=4).bind(params)
        >>> trainable = {'w_lora_a': np.zeros((8, 2), np.float32),
        ...              'w_lora_b': np.zeros((2, 8), np.float32)}
        >>> with ocp.Checkpointer(LoraCheckpointHandler()) as ckptr:
        ...     ckptr.save(f'{root}/adapters', args=LoraSave(item=trainable, lora=lora))
        >>> plan = plan_lora_restore(f'{root}/adapters', LoraRestore(base=f'{root}/base'))
        >>> plan.steps[0].expr.describe()
        'base/w + 2 * adapters/w_lora_a @ adapters/w_lora_b'
    """
    return prepare_restore(directory, args)[0]


def prepare_restore(directory: epath.PathLike, args: LoraRestore) -> Prepared:
    """The plan of a `LoraRestore`, its source, and how to shape the result."""
    adapters = OrbaxCheckpoint(directory)  # Its metadata is read once, here.
    saved = _layout_of(adapters)
    where = f'the adapter checkpoint {directory}'
    if args.lora is not None:
        given_layout(args.lora, args.target, saved).check_same(saved, where)
    base = None if args.base is None else open_source(args.base)
    source: ArraySource = adapters
    if args.verify:
        source = verified(adapters)
        base = None if base is None else verified(base)
    return plan_adapters(
        source, saved, base=base, target=args.target, mode=args.mode, base_rules=args.base_rules
    )


def given_layout(lora: LoraLayout | LoraSpec, target: PyTree, saved: LoraLayout) -> LoraLayout:
    if isinstance(lora, LoraLayout):
        return lora
    if target is not None:
        return lora.bind(target)
    shapes: dict[KeyPath, tuple[Any, Any]] = {a.key: (a.shape, 'float32') for a in saved.adapters}
    shapes.update(saved.trained)
    return lora.bind(nest(struct_tree(shapes)))


def struct_tree(shapes: Mapping[KeyPath, Any]) -> dict[KeyPath, Any]:
    import jax

    return {k: jax.ShapeDtypeStruct(tuple(s), d) for k, (s, d) in shapes.items()}


def trainable_of(item: PyTree, layout: LoraLayout) -> dict[str, Any]:
    flat = {canonical(k): v for k, v in flatten(item)[0].items()}
    shapes = canonical_shapes(item)
    for a in layout.adapters:
        a.checked_against([shapes.get(a.a_key), shapes.get(a.b_key)], 'the saved item')
    out = {}
    for key in sorted(layout.trainable_keys):
        if key not in flat:
            raise UnmatchedKeyError(
                f'LoraSave: {key!r} is trained in full but not in the item.'
                f'{did_you_mean(key, flat)}'
            )
        out[key] = flat[key]
    for key, (shape, _) in layout.trained.items():
        if tuple(shapes[key][0]) != tuple(shape):
            raise LoraMismatchError(
                f'LoraSave: {key!r} has shape {shapes[key][0]} in the item but {shape} in '
                'the layout.'
            )
    return nest(out)
