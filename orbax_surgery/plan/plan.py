"""The plan: for each target leaf, a lazy expression over checkpoint arrays.

A `Plan` is a value: its steps, unused and dropped keys, errors and estimated
reads, known before any array data is read, and printable.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax

from orbax_surgery.arrays import expr as ex
from orbax_surgery.errors import SurgeryError
from orbax_surgery.keys import KeyPath, PyTree, summarize, unflatten
from orbax_surgery.plan.reads import Reads, estimate
from orbax_surgery.rules.rule import Rule
from orbax_surgery.rules.target import TargetLeaf
from orbax_surgery.units import format_bytes


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
        >>> plan = osurg.resolve(src, {'lm_head': ...}, [osurg.Rename('embed', 'lm_head'),
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
class Plan:
    """Everything a restore will do, known before any array data is read.

    Attributes:
        steps: One step per target leaf that could be resolved, in target order.
        sources: The checkpoint's arrays (metadata only), by key.
        unused: Checkpoint keys no target reads, with the key rules renamed them to.
        dropped: Checkpoint keys a rule chose not to read, with that rule.
        errors: Every problem found, root causes first, each with the errors
            that follow from it folded under it (`error.consequences`) and its
            fixes (`error.suggestions`); empty when the restore can run.
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
        >>> plan = osurg.resolve(src, {'Dense/w': ...}, rules)
        >>> print(plan)
        Plan (ready): 1 target leaves from 2 checkpoint arrays (48 B)
        Reads, process 0 of 1: 24 B (50% of the checkpoint), 1.00x what its shards need
        <BLANKLINE>
        target   shape   dtype    from     lazy  reads here
        Dense/w  (2, 3)  float32  dense/w  yes   24 B
        <BLANKLINE>
        Left unread by rules (1):
          Drop(pattern='opt/.*'): 'opt/mu'
        >>> osurg.resolve(src, {'Dense/w': ...}, rules[:1]).errors  # doctest: +ELLIPSIS
        (UnusedKeyError("1 checkpoint key is read by no target: 'opt/mu'. ..."),)
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
        return estimate([(step.target, step.expr) for step in self.steps])

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

    def metadata(self) -> PyTree:
        """The restored tree before any data is read: `jax.ShapeDtypeStruct` leaves, shardings set.

        Orbax's `item_metadata`/`metadata()` take no args, so through Orbax a
        handler can only show the stored tree; this is the tree after surgery.

        Raises:
            SurgeryError: the first error of the plan, if it has any.

        Example:
            >>> import jax, numpy as np
            >>> import orbax_surgery as osurg
            >>> src = {'embed': jax.ShapeDtypeStruct((8, 4), np.float32)}
            >>> plan = osurg.resolve(src, None, [osurg.Copy('embed', 'lm_head'),
            ...                                  osurg.Transpose('lm_head', (1, 0))])
            >>> {k: v.shape for k, v in plan.metadata().items()}
            {'embed': (8, 4), 'lm_head': (4, 8)}
        """
        self.check()
        leaves = {s.key: _abstract(s.target) for s in self.steps}
        return unflatten(self.treedef, leaves, self.target_keys)

    def __str__(self) -> str:
        return format_plan(self)


_MAX_ROWS = 500
_MAX_FROM = 64
_MAX_LISTED = 20


def format_plan(plan: Plan) -> str:
    """The plan: its errors (causes first), a table of steps, what is not lazy, unused, dropped."""
    lines = [_headline(plan), *_reads_line(plan), '']
    if plan.errors:  # The causes lead; the table and lists below show what follows.
        lines.append(f'Errors ({len(plan.errors)}), causes first:')
        for i, e in enumerate(plan.errors, 1):
            lines.append(f'  {i}. {type(e).__name__}: {e}')
            if e.suggestions:
                lines.append(f'     Fix: {e.suggestions[0]}')
        lines.append('')
    rows = [('target', 'shape', 'dtype', 'from', 'lazy', 'reads here')]
    for step in plan.steps[:_MAX_ROWS]:
        origin = step.expr.describe()
        if len(origin) > _MAX_FROM:
            origin = origin[: _MAX_FROM - 3] + '...'
        here = plan.step_reads.get(step.key)
        rows.append(
            (
                step.key,
                str(step.target.shape),
                str(step.target.dtype),
                origin,
                'yes' if step.lazy else 'NO',
                format_bytes(here.chunked) if here else '-',
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ['  '.join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if len(plan.steps) > _MAX_ROWS:
        lines.append(f'... {len(plan.steps) - _MAX_ROWS} more steps (see plan.steps)')
    if plan.not_lazy:
        lines += ['', f'Not lazy ({len(plan.not_lazy)}): inputs read whole on every host']
        for step in plan.not_lazy:
            need = sum(plan.sources[k].nbytes for k in step.sources if k in plan.sources)
            lines.append(f'  {step.key}: {step.expr.describe()} reads {format_bytes(need)}')
    if plan.missing:
        lines += ['', f'Missing: target keys nothing fills ({len(plan.missing)}):']
        lines += [f'  {k}' for k in plan.missing[:_MAX_LISTED]]
        if len(plan.missing) > _MAX_LISTED:
            lines.append(f'  ... and {len(plan.missing) - _MAX_LISTED} more (see plan.missing)')
    if plan.unused:
        lines += ['', f'Unused checkpoint keys ({len(plan.unused)}):']
        shown = [f'  {k}' + (f' (renamed {v})' if v != k else '') for k, v in plan.unused]
        lines += shown[:_MAX_LISTED]
        if len(shown) > _MAX_LISTED:
            lines.append(f'  ... and {len(shown) - _MAX_LISTED} more (see plan.unused)')
    if plan.dropped:
        by_rule: dict[str, list[str]] = {}
        for key, rule in plan.dropped:
            by_rule.setdefault(repr(rule), []).append(key)
        lines += ['', f'Left unread by rules ({len(plan.dropped)}):']
        lines += [f'  {rule}: {summarize(keys)}' for rule, keys in by_rule.items()]
    return '\n'.join(lines)


def plan_summary(plan: Plan) -> dict[str, Any]:
    """The plan as a JSON-ready dict, for scripts and the command line."""
    return {
        'targets': [
            {
                'key': s.key,
                'shape': list(s.target.shape or ()),
                'dtype': str(s.target.dtype),
                'from': s.expr.describe(),
                'sources': list(s.sources),
                'lazy': s.lazy,
                'rules': [repr(r) for r in s.rules],
            }
            for s in plan.steps
        ],
        'missing': list(plan.missing),
        'unused': [k for k, _ in plan.unused],
        'dropped': {k: repr(r) for k, r in plan.dropped},
        'errors': [f'{type(e).__name__}: {e}' for e in plan.errors],
        'error_details': [_error_details(e) for e in plan.errors],
        'checkpoint_bytes': plan.source_bytes,
        'bytes_read_by_process': {str(p): r.chunked for p, r in sorted(plan.reads.items())},
        'bytes_needed_by_process': {str(p): r.needed for p, r in sorted(plan.reads.items())},
    }


def _error_details(error: SurgeryError) -> dict[str, Any]:
    return {
        'type': type(error).__name__,
        'message': str(error),
        'suggestions': list(error.suggestions),
        'consequences': [f'{type(c).__name__}: {c}' for c in error.consequences],
    }


def _headline(plan: Plan) -> str:
    status = 'ready'
    if plan.errors:
        follow = sum(len(e.consequences) for e in plan.errors)
        status = f'{len(plan.errors)} error(s)'
        status += f' and {follow} that follow from them' if follow else ''
    return (
        f'Plan ({status}): {len(plan.steps)} target leaves from {len(plan.sources)} checkpoint '
        f'arrays ({format_bytes(plan.source_bytes)})'
    )


def _reads_line(plan: Plan) -> list[str]:
    if not plan.reads:
        return []
    here = jax.process_index()
    mine = plan.reads.get(here)
    total = plan.source_bytes or 1
    line = f'Reads, process {here} of {jax.process_count()}: '
    if mine is None:
        line += 'nothing'
    else:
        line += (
            f'{format_bytes(mine.chunked)} ({mine.chunked / total:.0%} of the checkpoint), '
            f'{mine.amplification:.2f}x what its shards need'
        )
    if len(plan.reads) > 1:
        most = max(r.chunked for r in plan.reads.values())
        line += f'; the most any process reads: {format_bytes(most)}'
    return [line]


def _abstract(leaf: TargetLeaf) -> jax.ShapeDtypeStruct:
    assert leaf.shape is not None and leaf.dtype is not None, f'unresolved {leaf.key!r}'
    spec = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    if leaf.key_impl is None:
        return spec
    impl = leaf.key_impl
    keys = jax.eval_shape(lambda data: jax.random.wrap_key_data(data, impl=impl), spec)
    return jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=leaf.sharding)
