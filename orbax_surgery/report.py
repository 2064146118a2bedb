"""Plans as text and as JSON-ready dicts: what a user reads before any byte moves."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax

from orbax_surgery.keys import summarize

if TYPE_CHECKING:
    from orbax_surgery.plan import Plan

_MAX_ROWS = 500
_MAX_FROM = 64
_MAX_LISTED = 20


def format_bytes(n: int) -> str:
    """Bytes in binary units.

    Example:
        >>> format_bytes(1536), format_bytes(3 * 2**30)
        ('1.5 KiB', '3.0 GiB')
    """
    size = float(n)
    for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
        if size < 1024 or unit == 'TiB':
            return f'{int(size)} B' if unit == 'B' else f'{size:.1f} {unit}'
        size /= 1024
    raise AssertionError('unreachable')


def format_plan(plan: Plan) -> str:
    """The plan as a table, then what is not lazy, unused, dropped and wrong."""
    lines = [_headline(plan), *_reads_line(plan), '']
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
    if plan.errors:
        lines += ['', f'Errors ({len(plan.errors)}):']
        lines += [f'  {i}. {type(e).__name__}: {e}' for i, e in enumerate(plan.errors, 1)]
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
        'checkpoint_bytes': plan.source_bytes,
        'bytes_read_by_process': {str(p): r.chunked for p, r in sorted(plan.reads.items())},
        'bytes_needed_by_process': {str(p): r.needed for p, r in sorted(plan.reads.items())},
    }


def _headline(plan: Plan) -> str:
    status = 'ready' if not plan.errors else f'{len(plan.errors)} error(s)'
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
