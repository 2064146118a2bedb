"""Resolving rules against a checkpoint's shapes and dtypes into a `Plan`, reading nothing.

`resolve` is pure: it takes the checkpoint's shapes and dtypes (no data), the
target and the rules, and returns a `Plan` that lists every problem at once.
`Plan.check()` raises the first; restoring calls it before reading anything.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from orbax_surgery.arrays import expr as ex
from orbax_surgery.errors import (
    DtypeMismatchError,
    RuleError,
    ShapeMismatchError,
    SurgeryError,
    UnmatchedKeyError,
    UnusedKeyError,
)
from orbax_surgery.keys import KeyPath, PyTree, close_matches, nest, summarize
from orbax_surgery.plan.plan import Plan, Step
from orbax_surgery.plan.root_causes import Failure, root_causes
from orbax_surgery.plan.shape_hints import shape_hint, sizes_by_role
from orbax_surgery.rules.moves import Fallback
from orbax_surgery.rules.orbax_transforms import OrbaxTransforms
from orbax_surgery.rules.rule import Entry, Rule, stored_skeleton
from orbax_surgery.rules.target import TargetLeaf, read_target
from orbax_surgery.suggestions import covering_pattern

Rules = Sequence[Rule] | Mapping[str, Any] | Rule
"""Rules in order, one rule, or an Orbax `Transform` tree."""


def resolve(
    source: Mapping[KeyPath, jax.ShapeDtypeStruct | ex.Source],
    target: PyTree = None,
    rules: Rules = (),
) -> Plan:
    """Plans how to build `target` from a checkpoint's arrays, reading nothing.

    Args:
        source: The checkpoint's leaves by key: `jax.ShapeDtypeStruct`s, or the
            `Source`s a checkpoint source gives (which also know chunk shapes).
        target: The tree to produce; None takes keys, shapes and dtypes from the
            rules (the result is then nested dicts).
        rules: The package's rules, applied in order, or an Orbax `Transform` tree.

    Returns:
        The plan; `plan.errors` lists every problem, `plan.check()` raises.

    Example:
        >>> import jax, numpy as np
        >>> import orbax_surgery as osurg
        >>> src = {'dense/w': jax.ShapeDtypeStruct((2, 3), np.float32)}
        >>> plan = resolve(src, {'Dense/w': ...}, [osurg.Rename('dense/(.*)', r'Dense/\\1')])
        >>> [(s.key, s.expr.describe()) for s in plan.steps]
        [('Dense/w', 'dense/w')]
    """
    sources = {k: _as_source(k, v) for k, v in source.items()}
    tree: dict[KeyPath, Entry] = {k: Entry(s) for k, s in sources.items()}
    leaves: dict[KeyPath, TargetLeaf] = {}
    treedef = None
    if target is not None:
        leaves, treedef = read_target(target)
    failures: list[Failure] = []
    dropped: dict[KeyPath, Rule] = {}
    checked = checked_rules(rules)
    history: list[tuple[KeyPath, ...]] = []  # The keys before each rule, for order hints.
    for i, rule in enumerate(checked):
        history.append(tuple(tree))
        before = _refs(e.expr for e in tree.values())
        try:
            tree = rule.apply(tree, leaves)
        except UnmatchedKeyError as e:
            failures.append(Failure(i, rule, _with_order_hint(e, i, checked, history)))
            continue
        except SurgeryError as e:
            failures.append(Failure(i, rule, e))
            continue
        for key in sorted(before - _refs(e.expr for e in tree.values())):
            dropped.setdefault(key, rule)
    for i, rule in enumerate(checked):  # A preset fills, once more, what later rules made fillable.
        settle = getattr(rule, 'settle', None)
        if settle is not None and any(k not in tree for k in leaves):
            try:
                tree = settle(tree, leaves)
            except SurgeryError as e:
                failures.append(Failure(i, rule, e))
    if target is None:  # In the stored containers where they are known, else nested dicts.
        skeleton = stored_skeleton(tree)
        inferred = skeleton.build({}, lambda _: ...) if skeleton else nest(dict.fromkeys(tree, ...))
        leaves, treedef = read_target(inferred)
    steps = []
    missing: dict[KeyPath, SurgeryError] = {}
    mismatches: list[tuple[KeyPath, SurgeryError, str]] = []
    context = _Context(leaves, sources)
    closest: dict[KeyPath, list[KeyPath]] = {}  # Each missing target's closest keys.
    for key, leaf in leaves.items():
        entry = tree.get(key)
        if entry is None:
            closest[key] = close_matches(key, tree, 3)
            missing[key] = _missing(key, closest[key] or close_matches(key, sources, 3))
            continue
        try:
            steps.append(Step(_resolve_leaf(leaf, entry.expr, context), entry.expr, entry.via))
        except _Mismatch as e:
            mismatches.append((key, e.error, e.kind))
        except SurgeryError as e:
            mismatches.append((key, e, 'other'))
    # A leaf that fails on shape or dtype still names its sources: they are not "unused".
    used = _refs(tree[k].expr for k in leaves if k in tree)
    unused = _unused(tree, sources, used, dropped)
    unused_error = _unused_error(unused, sources) if unused else None
    errors = root_causes(
        failures, missing, mismatches, unused, unused_error, tuple(tree), leaves, closest
    )
    return Plan(
        steps=tuple(steps),
        sources=sources,
        unused=unused,
        dropped=tuple(dropped.items()),
        errors=tuple(errors),
        treedef=treedef,
        target_keys=tuple(leaves),
        missing=tuple(missing),
    )


def _with_order_hint(
    error: UnmatchedKeyError,
    at: int,
    rules: Sequence[Rule],
    history: Sequence[tuple[KeyPath, ...]],
) -> UnmatchedKeyError:
    """The error, saying which earlier rule renamed the keys `rules[at]` was written for."""
    pattern = getattr(rules[at], '_re', None)
    if pattern is None:
        return error
    for i in range(at - 1, -1, -1):
        try:
            hits = [k for k in history[i] if pattern.fullmatch(k)]
        except SurgeryError:  # A regex that times out: the error as it is.
            return error
        if hits:
            moved = UnmatchedKeyError(
                f'{error} It matches {summarize(hits, 2)} as the keys were before rules[{i}] '
                f'{rules[i]!r} changed them; rules run in order, so put rules[{at}] before '
                f'rules[{i}].'
            )
            moved.suggestions = (f'put rules[{at}] before rules[{i}]',)
            return moved
    return error


def normalize_rules(rules: Rules) -> tuple[Rule, ...]:
    """A tuple of rules: one rule alone, or a bare Orbax `Transform` tree, is a rule list."""
    if isinstance(rules, Mapping):
        return (OrbaxTransforms(rules),)
    if callable(getattr(rules, 'apply', None)):
        return (rules,)  # type: ignore[return-value]
    if isinstance(rules, str | bytes) or not isinstance(rules, Iterable):
        raise RuleError(
            f'rules is a {type(rules).__name__}, not a rule or a list of rules, e.g. '
            "[Rename('old/(.*)', r'new/\\1')], or an Orbax transforms dict."
        )
    return tuple(rules)


def _as_source(key: KeyPath, value: jax.ShapeDtypeStruct | ex.Source) -> ex.Source:
    if isinstance(value, ex.Source):
        return value
    return ex.Source(key, tuple(value.shape), np.dtype(value.dtype))


def _refs(exprs: Iterable[ex.Expr]) -> set[KeyPath]:
    return {s.key for e in exprs for s in e.sources()}


class _Mismatch(Exception):
    """A leaf's shape or dtype differs: the error, and how (errors alike group together)."""

    def __init__(self, error: SurgeryError, kind: str):
        super().__init__(str(error))
        self.error, self.kind = error, kind


@dataclasses.dataclass
class _Context:
    """The shapes on both sides, to say what a differing size is (read only when one differs)."""

    leaves: Mapping[KeyPath, TargetLeaf]
    sources: Mapping[KeyPath, ex.Source]

    @functools.cached_property
    def target_roles(self) -> dict[int, list[str]]:
        return sizes_by_role({k: v.shape for k, v in self.leaves.items() if v.shape is not None})

    @functools.cached_property
    def source_roles(self) -> dict[int, list[str]]:
        return sizes_by_role({k: v.shape for k, v in self.sources.items()})


def _resolve_leaf(leaf: TargetLeaf, value: ex.Expr, context: _Context | None = None) -> TargetLeaf:
    if leaf.inferred:
        key_impl = value.key_impl if isinstance(value, ex.Source) else None
        leaf = dataclasses.replace(
            leaf, shape=value.shape, dtype=value.dtype, kind=value.kind, key_impl=key_impl
        )
        _check_jax_dtype(leaf, value)
        return leaf
    assert leaf.shape is not None and leaf.dtype is not None, f'unresolved {leaf.key!r}'
    if value.shape != leaf.shape:
        hint, kind = '', 'other'
        fixes: tuple[str, ...] = ()
        if context is not None:
            hint, fixes, kind = shape_hint(
                leaf.key, leaf.shape, value.shape, context.target_roles, context.source_roles
            )
        shape_error = ShapeMismatchError(
            f'Target {leaf.key!r} has shape {leaf.shape}, but {value.describe()!r} gives '
            f'{value.shape}.{hint}'
        )
        shape_error.suggestions = fixes
        raise _Mismatch(shape_error, f'shape {kind}')
    if value.dtype != leaf.dtype:
        cast = f'Cast({re.escape(leaf.key)!r}, {leaf.dtype.name!r})'
        error = DtypeMismatchError(
            f'Target {leaf.key!r} has dtype {leaf.dtype}, but {value.describe()!r} gives '
            f'{value.dtype}. Cast it on purpose: {cast}.'
        )
        error.suggestions = (cast,)
        raise _Mismatch(error, f'dtype {value.dtype}->{leaf.dtype}')
    leaf = dataclasses.replace(leaf, kind=leaf.kind or value.kind)
    _check_jax_dtype(leaf, value)
    return leaf


def _check_jax_dtype(leaf: TargetLeaf, value: ex.Expr) -> None:
    """A jax.Array target must have a dtype JAX holds as is (float64 needs x64)."""
    assert leaf.dtype is not None, f'unresolved {leaf.key!r}'
    if leaf.kind != 'jax.Array' or _jax_holds(leaf.dtype):
        return
    raise DtypeMismatchError(
        f'Target {leaf.key!r} is a jax.Array of dtype {leaf.dtype} (from {value.describe()!r}), '
        f'which JAX cannot hold{_x64_hint(leaf.dtype)}. Cast it, e.g. '
        f"Cast({leaf.key!r}, 'float32'), or make that target leaf a NumPy array."
    )


@functools.cache
def _jax_holds(dtype: np.dtype) -> bool:
    try:
        canonical = jax.dtypes.canonicalize_dtype(dtype)
        jax.eval_shape(lambda: jax.numpy.zeros((), canonical))
    except TypeError:
        return False
    return canonical == dtype


def _x64_hint(dtype: np.dtype) -> str:
    canonical = jax.dtypes.canonicalize_dtype(dtype)
    if canonical == dtype:
        return ''
    return f' (it would silently become {canonical}: jax_enable_x64 is off)'


def _missing(key: KeyPath, near: Sequence[KeyPath]) -> UnmatchedKeyError:
    """The error for a target nothing fills; `near` are the closest keys, best first."""
    keep = f'{Fallback(key)!r}'
    if near:
        rename = f'Rename({re.escape(near[0])!r}, {key!r})'
        others = f' (then {", ".join(map(repr, near[1:]))})' if near[1:] else ''
        hint = f' Closest: {near[0]!r}{others}. Add {rename}, or {keep} to keep the target value.'
    else:
        hint = f' Add a Rename, or {keep} to keep the target value.'
    error = UnmatchedKeyError(
        f'Nothing fills target {key!r}: no checkpoint key has that name after the rules.{hint}'
    )
    error.suggestions = (rename, keep) if near else (keep,)
    return error


def _unused(
    tree: Mapping[KeyPath, Entry],
    sources: Mapping[KeyPath, ex.Source],
    used: set[KeyPath],
    dropped: Mapping[KeyPath, Rule],
) -> tuple[tuple[KeyPath, KeyPath], ...]:
    renamed: dict[KeyPath, KeyPath] = {}
    for key, entry in tree.items():
        if isinstance(entry.expr, ex.Source):
            renamed.setdefault(entry.expr.key, key)
    left = sorted(set(sources) - used - set(dropped))
    return tuple((k, renamed.get(k, k)) for k in left)


def _unused_error(
    unused: Sequence[tuple[KeyPath, KeyPath]], sources: Mapping[KeyPath, ex.Source]
) -> UnusedKeyError:
    keys = [k for k, _ in unused]
    renamed = [f'{k!r} (renamed {v!r})' for k, v in unused if k != v][:3]
    also = f' Renamed by the rules: {", ".join(renamed)}.' if renamed else ''
    drop = f'Drop({covering_pattern(keys, set(sources) - set(keys))!r})'
    error = UnusedKeyError(
        f'{len(keys)} checkpoint {"keys are" if len(keys) > 1 else "key is"} read by no target: '
        f'{summarize(keys)}.{also} '
        f'If that is meant, add {drop} as the first rule; otherwise fix the rules.'
    )
    error.suggestions = (drop,)
    return error


def checked_rules(rules: Rules) -> tuple[Rule, ...]:
    """The rules as a tuple (one rule or an Orbax Transform tree wrapped), each checked."""
    checked = normalize_rules(rules)
    for i, rule in enumerate(checked):
        if not callable(getattr(rule, 'apply', None)):
            raise RuleError(
                f'rules[{i}] is a {type(rule).__name__}, not a rule. Pass Orbax transforms '
                'as one dict {target_regex: Transform}, or wrap it in OrbaxTransforms.'
            )
    return checked
