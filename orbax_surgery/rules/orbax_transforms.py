"""Orbax `Transform` trees as a rule, with `ocp.apply_transformations` semantics.

What differs, on purpose: a target key matched by two transform regexes is an
`AmbiguousRuleError` (Orbax silently takes the last), a missing original key
names close matches, and `multi_value_fn` reads only the leaves it uses (found
by tracing it), not the whole checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from orbax_surgery.arrays import expr as ex
from orbax_surgery.arrays import ops
from orbax_surgery.arrays.value_functions import Apply, Received
from orbax_surgery.errors import (
    AmbiguousRuleError,
    RuleError,
    ShapeMismatchError,
    UnmatchedKeyError,
)
from orbax_surgery.keys import (
    KeyPath,
    KeyPattern,
    PyTree,
    check_template,
    did_you_mean,
    flatten,
    nest,
)
from orbax_surgery.rules.arguments import fn_name, predict_or_explain
from orbax_surgery.rules.rule import Entry, Target, Tree, stored_skeleton
from orbax_surgery.rules.target import TargetLeaf


@dataclasses.dataclass(frozen=True, repr=False)
class OrbaxTransforms:
    r"""An Orbax `Transform` tree, applied as `apply_transformations` does.

    Keys of `transforms` are regexes over target keys (nested dicts join with
    '/'). Target keys no transform matches come from the checkpoint key of the
    same name (`default_to_original=True`) or from the target's own value;
    checkpoint keys no target uses are dropped, as in Orbax, but the plan lists
    them. `SurgeryRestore(rules=transforms_tree)` wraps a bare tree in this rule.

    Example:
        >>> import numpy as np, orbax.checkpoint as ocp
        >>> from orbax_surgery import apply_rules
        >>> rule = OrbaxTransforms({r'(.*)_new': ocp.Transform(original_key=r'\1')})
        >>> rule
        OrbaxTransforms(['(.*)_new'])
        >>> apply_rules({'w': np.ones(2)}, {'w_new': ...}, [rule])['w_new'].tolist()
        [1.0, 1.0]
    """

    transforms: PyTree
    default_to_original: bool = dataclasses.field(default=True, kw_only=True)
    _compiled: tuple[tuple[str, ocp.Transform, KeyPattern], ...] = dataclasses.field(
        init=False, compare=False
    )

    def __post_init__(self):
        flat, _ = flatten(self.transforms)
        compiled = []
        for key, t in flat.items():
            owner = f'Transform at {key!r}'
            if not isinstance(t, ocp.Transform):
                raise RuleError(f'{owner} is a {type(t).__name__}, not an ocp.Transform.')
            pattern = KeyPattern(key, owner)
            if isinstance(t.original_key, str):
                check_template(pattern.compiled, t.original_key, owner)
            compiled.append((key, t, pattern))
        object.__setattr__(self, '_compiled', tuple(compiled))

    def __repr__(self):
        flag = '' if self.default_to_original else ', default_to_original=False'
        return f'OrbaxTransforms({[k for k, _, _ in self._compiled]}{flag})'

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]:
        out = {}
        for key, leaf in target.items():
            hits = [(k, t, m) for k, t, p in self._compiled if (m := p.fullmatch(key))]
            if len(hits) > 1:
                raise AmbiguousRuleError(
                    f'Target key {key!r} matches the transforms {hits[0][0]!r} and {hits[1][0]!r}'
                    '; Orbax would silently use the last one. Make the regexes disjoint.'
                )
            if hits:
                entry = self._transformed(key, leaf, *hits[0], tree)
            elif key in tree:
                entry = tree[key] if self.default_to_original else self._target_value(leaf)
            elif leaf.has_value:
                entry = self._target_value(leaf)
            else:
                continue  # The plan reports the missing target, with close matches.
            out[key] = self._cast(entry, leaf)
        return out

    def _transformed(
        self,
        key: KeyPath,
        leaf: TargetLeaf,
        tkey: str,
        t: ocp.Transform,
        m: Any,
        tree: Tree,
    ) -> Entry:
        if t.use_fallback:
            if self.default_to_original:
                return self._target_value(leaf)
            if key not in tree:
                raise UnmatchedKeyError(
                    f'Transform {tkey!r} asks for use_fallback with default_to_original=False, '
                    f'which takes {key!r} from the checkpoint, but it is not there.'
                    f'{did_you_mean(key, tree)}'
                )
            return tree[key].then(self)
        if t.multi_value_fn is not None:
            return self._multi_value(key, leaf, t, tree)
        original = m.expand(t.original_key) if t.original_key is not None else key
        if original not in tree:
            raise UnmatchedKeyError(
                f'Transform {tkey!r} makes target {key!r} from original key {original!r}, which '
                f'is not among the {len(tree)} checkpoint keys.{did_you_mean(original, tree)}'
            )
        source = tree[original]
        if t.value_fn is None:
            return source.then(self)
        fn = t.value_fn
        out, compute = _output(lambda xs: fn(xs[0]), fn_name(fn), leaf, key, source.expr)
        node = Apply(compute, (source.expr,), out.shape, out.dtype, fn_name(fn))
        return source.then(self, node)

    def _multi_value(self, key: KeyPath, leaf: TargetLeaf, t: ocp.Transform, tree: Tree) -> Entry:
        fn = t.multi_value_fn
        extra = (_restore_args(leaf),) if isinstance(t, ocp.RestoreTransform) else ()
        build = _original_tree(tree)

        def call(names: list[KeyPath]) -> Callable[[list[Any]], Any]:
            return lambda values: fn(key, build(dict(zip(names, values, strict=True))), *extra)

        declared = getattr(t, 'multi_value_fn_input_args', None)
        traced = None
        if declared:
            inputs = _declared_inputs(key, declared, tree)
            names, parts = list(inputs), tuple(inputs.values())
        else:
            traced = _trace(call, tree)
            names = traced[0] if traced else list(tree)
            parts = tuple(tree[n].expr for n in names)
        if traced:
            out, compute = traced[1], call(names)
        else:
            out, compute = _output(call(names), fn_name(fn), leaf, key, *parts)
        node = Apply(compute, parts, out.shape, out.dtype, fn_name(fn))
        return Entry(node, (self,))

    def _target_value(self, leaf: TargetLeaf) -> Entry:
        if not leaf.has_value:
            raise RuleError(
                f'{self!r} takes {leaf.key!r} from the target, which gives only its shape '
                'there. Pass a concrete value for it, or restore it from the checkpoint.'
            )
        return Entry(ex.Constant(leaf.value), (self,))

    def _cast(self, entry: Entry, leaf: TargetLeaf) -> Entry:
        """Orbax restores arrays into the target's dtype; so do we."""
        value = entry.expr
        if leaf.dtype is None or value.dtype == leaf.dtype or isinstance(value, ex.Constant):
            return entry
        return Entry(ops.Cast(value, leaf.dtype), entry.via)


def _output(
    compute: Callable[[list[Any]], Any],
    name: str,
    leaf: TargetLeaf,
    key: KeyPath,
    *parts: ex.Expr,
) -> tuple[jax.ShapeDtypeStruct, Callable[[list[Any]], Any]]:
    """A value function's output, by tracing, else the target leaf's shape and dtype.

    Where the output comes from the target, the result is cast to the target's
    dtype (Orbax returns it as computed, then restores it as the target asks).
    """
    try:
        fix = 'Give that target leaf a jax.ShapeDtypeStruct.'
        spec = predict_or_explain(lambda *xs: compute(list(xs)), *parts, fix=fix, name=name)
        return spec, compute
    except RuleError as e:
        if leaf.shape is None or leaf.dtype is None:
            raise RuleError(f'For target {key!r}: {e}') from e
        dtype = leaf.dtype
        return jax.ShapeDtypeStruct(leaf.shape, dtype), lambda xs: _astype(compute(xs), dtype)


def _astype(value: Any, dtype: np.dtype) -> Any:
    return value.astype(dtype) if hasattr(value, 'astype') else np.asarray(value, dtype)


def _trace(
    call: Callable[[list[KeyPath]], Callable[[list[Any]], Any]], tree: Tree
) -> tuple[list[KeyPath], jax.ShapeDtypeStruct] | None:
    """Finds which leaves a multi_value_fn uses, and its output, from its jaxpr.

    Strings cannot be traced: they stay placeholders, and are not read.
    """
    names = [n for n in tree if tree[n].expr.dtype != object]
    specs = [jax.ShapeDtypeStruct(tree[n].expr.shape, tree[n].expr.dtype) for n in names]
    wide = any(s.dtype.itemsize == 8 for s in specs)
    try:
        with jax.enable_x64(wide):
            closed = jax.make_jaxpr(lambda *xs: call(names)(list(xs)))(*specs)
    except Exception:
        return None
    jaxpr = closed.jaxpr
    if len(closed.out_avals) != 1:
        return None
    used = {id(v) for eqn in jaxpr.eqns for v in eqn.invars} | {id(v) for v in jaxpr.outvars}
    deps = [n for n, v in zip(names, jaxpr.invars, strict=True) if id(v) in used]
    aval = closed.out_avals[0]
    return deps, jax.ShapeDtypeStruct(tuple(aval.shape), np.dtype(aval.dtype))


def _original_tree(tree: Tree) -> Callable[[Mapping[KeyPath, Any]], Any]:
    """Builds "the original tree" a multi_value_fn gets, from the leaves it reads.

    The tree has every key of `tree`, in the containers it was stored in where
    the source knows them (lists stay lists, dataclasses and NamedTuples stay
    themselves), else nested dicts with '0', '1', ... keys as lists. A leaf the
    function does not read is a `jax.ShapeDtypeStruct` of it (Orbax passes its
    metadata there).
    """

    def unread(key: KeyPath) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(tree[key].expr.shape, tree[key].expr.dtype)

    skeleton = stored_skeleton(tree)
    if skeleton is not None:
        return lambda values: skeleton.build(values, unread)
    keys = list(tree)
    return lambda values: _as_tree({k: values[k] if k in values else unread(k) for k in keys})


def _declared_inputs(
    key: KeyPath, declared: Mapping[str, Any], tree: Tree
) -> dict[KeyPath, ex.Expr]:
    """The inputs `multi_value_fn_input_args` names, each as its RestoreArgs restore it.

    As Orbax reads them: `global_shape` truncates or zero-pads (with
    `strict=False`), `dtype` casts, `restore_type` and `sharding` say what the
    function receives. Truncation reads only what is kept.
    """
    patterns = [
        (KeyPattern(p, f'Transform at {key!r}: input'), args) for p, args in declared.items()
    ]
    inputs = {}
    for name, entry in tree.items():
        args = next((a for p, a in patterns if p.fullmatch(name)), None)
        if args is not None:
            inputs[name] = _as_restored(key, name, entry.expr, args)
    if not inputs:
        raise UnmatchedKeyError(
            f'Transform at {key!r}: multi_value_fn_input_args {list(declared)} match none of '
            f'the {len(tree)} checkpoint keys.{did_you_mean(next(iter(declared), ""), tree)}'
        )
    return inputs


def _as_restored(key: KeyPath, name: KeyPath, value: ex.Expr, args: Any) -> ex.Expr:
    shape = getattr(args, 'global_shape', None) or getattr(args, 'shape', None)
    if shape is not None and tuple(shape) != value.shape:
        if getattr(args, 'strict', True) or len(shape) != len(value.shape):
            how = (
                'Pass strict=False to truncate or zero-pad it, as Orbax does.'
                if len(shape) == len(value.shape)
                else 'Orbax truncates or pads, but never reshapes.'
            )
            raise ShapeMismatchError(
                f'Transform at {key!r}: input {name!r} is stored as {value.shape}, but its '
                f'RestoreArgs ask for global_shape {tuple(shape)}. {how}'
            )
        value = _truncated_or_padded(value, tuple(shape))
    dtype = getattr(args, 'dtype', None)
    if dtype is not None and np.dtype(dtype) != value.dtype:
        value = ops.Cast(value, np.dtype(dtype))
    sharding = getattr(args, 'sharding', None)
    mesh, axes = getattr(args, 'mesh', None), getattr(args, 'mesh_axes', None)
    if sharding is None and mesh is not None and axes is not None:
        sharding = jax.sharding.NamedSharding(mesh, axes)
    restore_type = getattr(args, 'restore_type', None)
    if restore_type is np.ndarray:
        return Received(value, 'np.ndarray')
    if restore_type is jax.Array or sharding is not None:
        return Received(value, 'jax.Array', sharding)
    return value


def _truncated_or_padded(value: ex.Expr, shape: tuple[int, ...]) -> ex.Expr:
    """The first `shape` elements along each axis, zeros where the stored array ends."""
    kept = tuple(slice(0, min(n, m)) for n, m in zip(shape, value.shape, strict=True))
    value = ops.Index.of(value, kept)
    for axis, n in enumerate(shape):
        if n > value.shape[axis]:
            pad = value.shape[:axis] + (n - value.shape[axis],) + value.shape[axis + 1 :]
            zeros = ex.Constant(np.broadcast_to(np.zeros((), value.dtype), pad), label='zeros')
            value = ops.Concat((value, zeros), axis)
    return value


def _as_tree(flat: Mapping[KeyPath, Any]) -> Any:
    """Nested dicts, with `{'0': a, '1': b}` turned back into lists as Orbax saves them."""

    def lists(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        node = {k: lists(v) for k, v in node.items()}
        if node and sorted(node) == sorted(str(i) for i in range(len(node))):
            return [node[str(i)] for i in range(len(node))]
        return node

    return lists(nest(flat))


def _restore_args(leaf: TargetLeaf) -> ocp.RestoreArgs:
    """The RestoreArgs Orbax hands a RestoreTransform's multi_value_fn."""
    if leaf.kind == 'jax.Array':
        return ocp.ArrayRestoreArgs(
            restore_type=jax.Array,
            sharding=leaf.sharding,
            global_shape=leaf.shape,
            dtype=leaf.dtype,
        )
    return ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf.dtype)
