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
from orbax_surgery.arrays.value_functions import Apply
from orbax_surgery.errors import AmbiguousRuleError, RuleError, UnmatchedKeyError
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
from orbax_surgery.rules.rule import Entry, Target, Tree
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
        out = _output(fn, leaf, key, source.expr)
        node = Apply(lambda xs: fn(xs[0]), (source.expr,), out.shape, out.dtype, fn_name(fn))
        return source.then(self, node)

    def _multi_value(self, key: KeyPath, leaf: TargetLeaf, t: ocp.Transform, tree: Tree) -> Entry:
        fn = t.multi_value_fn
        extra = (_restore_args(leaf),) if isinstance(t, ocp.RestoreTransform) else ()

        def call(names: list[KeyPath]) -> Callable[[list[Any]], Any]:
            return lambda values: fn(key, _as_tree(dict(zip(names, values, strict=True))), *extra)

        declared = getattr(t, 'multi_value_fn_input_args', None)
        if declared:
            inputs = [KeyPattern(p, f'Transform at {key!r}: input') for p in declared]
            names = [k for k in tree if any(p.fullmatch(k) for p in inputs)]
            traced = None
        else:
            traced = _trace(call, tree)
            names = traced[0] if traced else list(tree)
        parts = tuple(tree[n].expr for n in names)
        if traced:
            out = traced[1]
        else:
            out = _output(lambda *xs: call(names)(list(xs)), leaf, key, *parts)
        node = Apply(call(names), parts, out.shape, out.dtype, fn_name(fn))
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
    fn: Callable[..., Any], leaf: TargetLeaf, key: KeyPath, *parts: ex.Expr
) -> jax.ShapeDtypeStruct:
    """A value function's output, by tracing, else the target leaf's shape."""
    try:
        return predict_or_explain(fn, *parts, fix='Give that target leaf a jax.ShapeDtypeStruct.')
    except RuleError as e:
        if leaf.shape is not None and leaf.dtype is not None:
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
        raise RuleError(f'For target {key!r}: {e}') from e


def _trace(
    call: Callable[[list[KeyPath]], Callable[[list[Any]], Any]], tree: Tree
) -> tuple[list[KeyPath], jax.ShapeDtypeStruct] | None:
    """Finds which leaves a multi_value_fn uses, and its output, from its jaxpr."""
    names = list(tree)
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
