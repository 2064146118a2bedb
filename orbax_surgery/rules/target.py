"""The target tree: what each restored leaf must look like, and where it lives."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from orbax_surgery.arrays.expr import Kind
from orbax_surgery.arrays.prng_keys import is_key_array, key_impl_name
from orbax_surgery.arrays.regions import Shape
from orbax_surgery.errors import ShapeMismatchError, SurgeryError
from orbax_surgery.keys import KeyPath, PyTree, flatten

_NO_VALUE = object()


@dataclasses.dataclass(frozen=True)
class TargetLeaf:
    """One target leaf: its shape, dtype, sharding and kind, any of them inferred.

    Attributes:
        key: The leaf's key path.
        shape: Required shape, or None to take the rule's.
        dtype: Required dtype, or None to take the rule's.
        sharding: Where a `jax.Array` goes; None means the first local device.
        kind: What to return ('jax.Array', 'np.ndarray', 'scalar'), None to infer.
        value: The concrete value given in the target, used only by fallbacks.
        key_impl: For typed PRNG keys, the key implementation ('threefry2x32'): the
            leaf is then its key data (`shape` and `dtype` those of
            `jax.random.key_data`, as Orbax stores keys), wrapped back when restored.
    """

    key: KeyPath
    shape: Shape | None = None
    dtype: np.dtype | None = None
    sharding: jax.sharding.Sharding | None = None
    kind: Kind | None = None
    value: Any = dataclasses.field(default=_NO_VALUE, compare=False, repr=False)
    key_impl: str | None = None

    @property
    def has_value(self) -> bool:
        return self.value is not _NO_VALUE

    @property
    def inferred(self) -> bool:
        return self.shape is None


def read_target(tree: PyTree) -> tuple[dict[KeyPath, TargetLeaf], Any]:
    """Flattens a target tree into `TargetLeaf`s and its treedef.

    Leaves may be `jax.ShapeDtypeStruct`s (with or without sharding), `jax.Array`s,
    NumPy arrays, Python or NumPy scalars and strings (their values serve as
    fallbacks), the leaves of Orbax's `item_metadata`, or `...` (Orbax's
    `PLACEHOLDER`) or `object()` to take shape and dtype from the rules, as
    `apply_transformations` does.

    Example:
        >>> import jax, numpy as np
        >>> leaves, _ = read_target({'w': jax.ShapeDtypeStruct((2, 3), np.float32), 'n': ...})
        >>> leaves['w'].shape, leaves['n'].inferred
        ((2, 3), True)
    """
    flat, treedef = flatten(tree)
    leaves = {key: _leaf(key, value) for key, value in flat.items()}
    for leaf in leaves.values():
        _check_sharding(leaf)
    return leaves, treedef


def _check_sharding(leaf: TargetLeaf) -> None:
    if leaf.sharding is None or leaf.shape is None:
        return
    try:
        leaf.sharding.shard_shape(leaf.shape)
    except ValueError as e:  # jax's IndivisibleError
        reason = str(e).split(' (full shape')[0].split('implies that ')[-1]
        raise ShapeMismatchError(
            f'Target {leaf.key!r} of shape {leaf.shape} cannot take its sharding '
            f'{getattr(leaf.sharding, "spec", leaf.sharding)}: {reason}.'
        ) from e


def _leaf(key: KeyPath, x: Any) -> TargetLeaf:
    if x is Ellipsis or type(x) is object:  # `...` (Orbax's PLACEHOLDER) or object(): any.
        return TargetLeaf(key)
    if isinstance(x, str):
        return TargetLeaf(key, (), np.dtype(object), None, 'scalar', x)
    if isinstance(x, ocp.metadata.StringMetadata):
        return TargetLeaf(key, (), np.dtype(object), None, 'scalar')
    if isinstance(x, ocp.metadata.ScalarMetadata):
        return TargetLeaf(key, (), np.dtype(x.dtype), None, 'scalar')
    if isinstance(x, ocp.metadata.ArrayMetadata):  # A leaf of `item_metadata(step)`.
        kind: Kind = 'np.ndarray' if x.sharding is None else 'jax.Array'
        return TargetLeaf(key, tuple(x.shape), np.dtype(x.dtype), None, kind)
    if is_key_array(x):
        return _key_leaf(key, x)
    if isinstance(x, jax.ShapeDtypeStruct):
        return TargetLeaf(key, tuple(x.shape), np.dtype(x.dtype), x.sharding, 'jax.Array')
    if isinstance(x, jax.Array):
        return TargetLeaf(key, tuple(x.shape), np.dtype(x.dtype), x.sharding, 'jax.Array', x)
    if isinstance(x, np.ndarray):
        return TargetLeaf(key, tuple(x.shape), x.dtype, None, 'np.ndarray', x)
    if isinstance(x, np.generic):
        return TargetLeaf(key, (), x.dtype, None, 'scalar', x)
    if isinstance(x, bool | int | float | complex):
        return TargetLeaf(key, (), np.asarray(x).dtype, None, 'scalar', x)
    raise SurgeryError(
        f'Target leaf {key!r} is a {type(x).__name__}; use a jax.ShapeDtypeStruct, an array, '
        'a scalar, a string, or ... to take its shape and dtype from the rules.'
    )


def _key_leaf(key: KeyPath, x: Any) -> TargetLeaf:
    """A typed key array restores from its key data, as Orbax stores it (uint32)."""
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    value = jax.random.key_data(x) if isinstance(x, jax.Array) else _NO_VALUE
    sharding = getattr(x, 'sharding', None)
    impl = key_impl_name(x.dtype)
    shape, dtype = tuple(data.shape), np.dtype(data.dtype)
    return TargetLeaf(key, shape, dtype, sharding, 'jax.Array', value, key_impl=impl)
