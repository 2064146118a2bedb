"""The plan: for each target leaf, a lazy expression over checkpoint arrays.

`resolve` is pure: it takes the checkpoint's shapes and dtypes (no data), the
target and the rules, and returns a `Plan` that lists every problem at once.
`Plan.check()` raises the first; restoring calls it before reading anything.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from orbax_surgery import expr as ex
from orbax_surgery import regions
from orbax_surgery.errors import (
    DtypeMismatchError,
    ShapeMismatchError,
    SurgeryError,
    UnmatchedKeyError,
    UnusedKeyError,
)
from orbax_surgery.keys import KeyPath, PyTree, close_matches, common_pattern, nest, summarize
from orbax_surgery.orbax_transforms import OrbaxTransforms
from orbax_surgery.rules import Entry, Fallback, Rule
from orbax_surgery.target import TargetLeaf, read_target

Rules = Sequence[Rule] | Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Step:
    """How one target leaf is made.

    Attributes:
        target: The resolved target leaf (shape, dtype, sharding, kind all known).
        expr: The lazy expression that computes it.
        rules: The rules that shaped it, in order.

    Example:
        >>> import jax, numpy as np
        >>> import orbax_surgery as osurg
        >>> src = {'embed': jax.ShapeDtypeStruct((8, 4), np.float32)}
        >>> plan = resolve(src, {'lm_head': ...}, [osurg.Rename('embed', 'lm_head'),
        ...                                        osurg.Transpose('lm_head', (1, 0))])
        >>> step = plan.steps[0]
        >>> step.key, step.sources, step.lazy, step.expr.describe()
        ('lm_head', ('embed',), True, 'transpose(embed, (1, 0))')
    """

    target: TargetLeaf
    expr: ex.Expr
    rules: tuple[Rule, ...] = ()

    @property
    def key(self) -> KeyPath:
        return self.target.key

    @property
    def lazy(self) -> bool:
        return self.expr.lazy

    @property
    def sources(self) -> tuple[KeyPath, ...]:
        return tuple(dict.fromkeys(s.key for s in self.expr.sources()))


@dataclasses.dataclass(frozen=True)
class Reads:
    """Bytes one process reads: what its shards need, and the whole chunks read.

    `needed` counts each stored element once however many shards or targets use
    it; `chunked` counts each stored chunk once, as the host reads it.
    """

    needed: int = 0
    chunked: int = 0

    @property
    def amplification(self) -> float:
        return self.chunked / self.needed if self.needed else 1.0


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a restore will do, known before any array data is read.

    Attributes:
        steps: One step per target leaf that could be resolved, in target order.
        sources: The checkpoint's arrays (metadata only), by key.
        unused: Checkpoint keys no target reads, with the key rules renamed them to.
        dropped: Checkpoint keys a rule chose not to read, with that rule.
        errors: Every problem found; empty when the restore can run.
        treedef: The target's tree structure.
        target_keys: Target keys in leaf order.
        missing: Target keys nothing fills (Hugging Face's `missing_keys`);
            `unused` are its `unexpected_keys`.

    Example:
        >>> import jax, numpy as np
        >>> import orbax_surgery as osurg
        >>> src = {'dense/w': jax.ShapeDtypeStruct((2, 3), np.float32),
        ...        'opt/mu': jax.ShapeDtypeStruct((2, 3), np.float32)}
        >>> rules = [osurg.Rename('dense/w', 'Dense/w'), osurg.Drop('opt/.*')]
        >>> plan = resolve(src, {'Dense/w': ...}, rules)
        >>> print(plan)
        Plan (ready): 1 target leaves from 2 checkpoint arrays (48 B)
        Reads, process 0 of 1: 24 B (50% of the checkpoint), 1.00x what its shards need
        <BLANKLINE>
        target   shape   dtype    from     lazy  reads here
        Dense/w  (2, 3)  float32  dense/w  yes   24 B
        <BLANKLINE>
        Left unread by rules (1):
          Drop(pattern='opt/.*'): 'opt/mu'
        >>> resolve(src, {'Dense/w': ...}, rules[:1]).errors  # doctest: +ELLIPSIS
        (UnusedKeyError("1 checkpoint keys are read by no target: 'opt/mu'. ..."),)
    """

    steps: tuple[Step, ...]
    sources: Mapping[KeyPath, ex.Source]
    unused: tuple[tuple[KeyPath, KeyPath], ...] = ()
    dropped: tuple[tuple[KeyPath, Rule], ...] = ()
    errors: tuple[SurgeryError, ...] = ()
    treedef: Any = dataclasses.field(default=None, compare=False, repr=False)
    target_keys: tuple[KeyPath, ...] = ()
    missing: tuple[KeyPath, ...] = ()

    def check(self) -> None:
        """Raises the first error (the others are attached as notes)."""
        if not self.errors:
            return
        first = self.errors[0]
        notes = [f'Also: {other}' for other in self.errors[1:6]]
        if len(self.errors) > 6:
            notes.append(f'... and {len(self.errors) - 6} more problems; print the plan.')
        for note in notes:
            if note not in getattr(first, '__notes__', ()):
                first.add_note(note)
        raise first

    @property
    def not_lazy(self) -> tuple[Step, ...]:
        """Steps whose inputs are read whole on each host (Python value functions)."""
        return tuple(s for s in self.steps if not s.lazy)

    @functools.cached_property
    def _estimates(self) -> tuple[dict[int, Reads], dict[KeyPath, Reads]]:
        return _estimate(self.steps)

    @property
    def reads(self) -> dict[int, Reads]:
        """Estimated bytes each process reads, by process index."""
        return self._estimates[0]

    @property
    def step_reads(self) -> dict[KeyPath, Reads]:
        """Estimated bytes this process reads for each step."""
        return self._estimates[1]

    @property
    def source_bytes(self) -> int:
        return sum(s.nbytes for s in self.sources.values())

    def __str__(self) -> str:
        from orbax_surgery.report import format_plan

        return format_plan(self)


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
    errors: list[SurgeryError] = []
    dropped: dict[KeyPath, Rule] = {}
    for rule in normalize_rules(rules):
        before = _refs(e.expr for e in tree.values())
        try:
            tree = rule.apply(tree, leaves)
        except SurgeryError as e:
            errors.append(e)
            continue
        for key in sorted(before - _refs(e.expr for e in tree.values())):
            dropped.setdefault(key, rule)
    if target is None:
        leaves, treedef = read_target(nest(dict.fromkeys(tree, ...)))
    steps = []
    missing = []
    for key, leaf in leaves.items():
        entry = tree.get(key)
        if entry is None:
            errors.append(_missing(key, tree, sources))
            missing.append(key)
            continue
        try:
            steps.append(Step(_resolve_leaf(leaf, entry.expr), entry.expr, entry.via))
        except SurgeryError as e:
            errors.append(e)
    # A leaf that fails on shape or dtype still names its sources: they are not "unused".
    used = _refs(tree[k].expr for k in leaves if k in tree)
    unused = _unused(tree, sources, used, dropped)
    if unused:
        errors.append(_unused_error(unused))
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


def normalize_rules(rules: Rules) -> tuple[Rule, ...]:
    """A tuple of rules; a bare Orbax `Transform` tree becomes `OrbaxTransforms`."""
    if isinstance(rules, Mapping):
        return (OrbaxTransforms(rules),)
    return tuple(rules)


def _as_source(key: KeyPath, value: jax.ShapeDtypeStruct | ex.Source) -> ex.Source:
    if isinstance(value, ex.Source):
        return value
    return ex.Source(key, tuple(value.shape), np.dtype(value.dtype))


def _refs(exprs: Iterable[ex.Expr]) -> set[KeyPath]:
    return {s.key for e in exprs for s in e.sources()}


def _resolve_leaf(leaf: TargetLeaf, value: ex.Expr) -> TargetLeaf:
    if leaf.inferred:
        leaf = dataclasses.replace(leaf, shape=value.shape, dtype=value.dtype, kind=value.kind)
        _check_jax_dtype(leaf, value)
        return leaf
    assert leaf.shape is not None and leaf.dtype is not None, f'unresolved {leaf.key!r}'
    if value.shape != leaf.shape:
        raise ShapeMismatchError(
            f'Target {leaf.key!r} has shape {leaf.shape}, but {value.describe()!r} gives '
            f'{value.shape}.{_shape_hint(leaf.shape, value.shape)}'
        )
    if value.dtype != leaf.dtype:
        raise DtypeMismatchError(
            f'Target {leaf.key!r} has dtype {leaf.dtype}, but {value.describe()!r} gives '
            f'{value.dtype}. Cast it on purpose: Cast({leaf.key!r}, {leaf.dtype.name!r}).'
        )
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


def _shape_hint(want: tuple[int, ...], got: tuple[int, ...]) -> str:
    if sorted(want) == sorted(got) and len(want) > 1:
        return ' The same sizes in another order: a Transpose rule?'
    if np.prod(want) == np.prod(got):
        return ' The same number of elements: a Reshape rule?'
    if len(want) == len(got) and sum(a != b for a, b in zip(want, got, strict=True)) == 1:
        return ' One axis differs: a different layer count or vocabulary size?'
    return ''


def _missing(
    key: KeyPath, tree: Mapping[KeyPath, Entry], sources: Mapping[KeyPath, ex.Source]
) -> UnmatchedKeyError:
    near = close_matches(key, tree) or close_matches(key, sources)
    hint = f' Close keys: {", ".join(map(repr, near))}.' if near else ''
    return UnmatchedKeyError(
        f'Nothing fills target {key!r}: no checkpoint key has that name after the rules.{hint} '
        f'Add a Rename, or {Fallback(key)!r} to keep the target value.'
    )


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


def _unused_error(unused: Sequence[tuple[KeyPath, KeyPath]]) -> UnusedKeyError:
    keys = [k for k, _ in unused]
    renamed = [f'{k!r} (renamed {v!r})' for k, v in unused if k != v][:3]
    also = f' Renamed by the rules: {", ".join(renamed)}.' if renamed else ''
    return UnusedKeyError(
        f'{len(keys)} checkpoint keys are read by no target: {summarize(keys)}.{also} '
        f'If that is meant, add Drop({common_pattern(keys)!r}); otherwise fix the rules.'
    )


def _process_regions(leaf: TargetLeaf) -> dict[int, list[regions.Region]]:
    """The distinct regions of a leaf each process materializes."""
    assert leaf.shape is not None, f'unresolved target {leaf.key!r}'
    if leaf.kind != 'jax.Array':
        return {p: [regions.full(leaf.shape)] for p in range(jax.process_count())}
    if leaf.sharding is None:
        return {jax.process_index(): [regions.full(leaf.shape)]}
    out: dict[int, list[regions.Region]] = collections.defaultdict(list)
    for device, index in leaf.sharding.devices_indices_map(leaf.shape).items():
        region = regions.from_index(index, leaf.shape)
        process = device.process_index  # type: ignore[attr-defined]
        if region not in out[process]:
            out[process].append(region)
    return out


def _estimate(steps: Sequence[Step]) -> tuple[dict[int, Reads], dict[KeyPath, Reads]]:
    """Chunk-aligned bytes read per process, each chunk counted once per process.

    A byte-addressable source (safetensors) reads exactly the elements needed.
    """
    needed: dict[int, set[tuple[KeyPath, regions.Region]]] = collections.defaultdict(set)
    chunks: dict[int, set[tuple[KeyPath, tuple[int, ...]]]] = collections.defaultdict(set)
    by_step: dict[KeyPath, Reads] = {}
    sources: dict[KeyPath, ex.Source] = {}
    here = jax.process_index()
    for step in steps:
        if isinstance(step.expr, ex.Constant):
            continue
        step_needed: set[tuple[KeyPath, regions.Region]] = set()
        step_chunks: set[tuple[KeyPath, tuple[int, ...]]] = set()
        for pid, regs in _process_regions(step.target).items():
            for region in regs:
                for src, sub in step.expr.requests(region):
                    sources[src.key] = src
                    needed[pid].add((src.key, sub))
                    ids = set()
                    if not src.byte_ranges:
                        grid = src.chunk_shape or src.shape
                        ids = {(src.key, c) for c in regions.chunk_cover(sub, grid)}
                    chunks[pid] |= ids
                    if pid == here:
                        step_needed.add((src.key, sub))
                        step_chunks |= ids
        by_step[step.key] = _reads(step_needed, step_chunks, sources)
    totals = {pid: _reads(needed[pid], chunks[pid], sources) for pid in needed}
    return totals, by_step


def _reads(
    needed: set[tuple[KeyPath, regions.Region]],
    chunks: set[tuple[KeyPath, tuple[int, ...]]],
    sources: Mapping[KeyPath, ex.Source],
) -> Reads:
    by_source: dict[KeyPath, list[regions.Region]] = collections.defaultdict(list)
    for key, region in needed:
        by_source[key].append(region)
    by_key = {
        k: regions.union_size(rs) * sources[k].dtype.itemsize for k, rs in sorted(by_source.items())
    }
    need = sum(by_key.values())
    chunked = sum(n for k, n in by_key.items() if sources[k].byte_ranges)
    for key, ids in chunks:
        src = sources[key]
        chunked += regions.chunk_nbytes(
            ids, src.shape, src.chunk_shape or src.shape, src.dtype.itemsize
        )
    return Reads(need, chunked)
