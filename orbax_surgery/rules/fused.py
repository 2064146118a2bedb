r"""Rules for fused weights: one key split into several along an axis, and the reverse.

Phi-3's `qkv_proj`, GPT-2's `c_attn` and Falcon's `query_key_value` hold the
query, key and value projections in one array; Flax models keep them apart.
`Split` cuts each matching array into named parts and `Concatenate` joins
parts into one, both lazily: each part is a slice of the stored array, so a
host reads only the stored chunks its shards of each part need.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from orbax_surgery.arrays import expr as ex
from orbax_surgery.arrays import ops
from orbax_surgery.errors import (
    AmbiguousRuleError,
    RuleError,
    ShapeMismatchError,
    SurgeryError,
    UnmatchedKeyError,
)
from orbax_surgery.keys import KeyPath, KeyPattern, check_template, did_you_mean
from orbax_surgery.rules.arguments import parse_int, parse_ints, signature
from orbax_surgery.rules.rule import Entry, PatternRule, Target, Tree, origin


@dataclasses.dataclass(frozen=True)
class Split(PatternRule):
    r"""Splits each checkpoint key matching `pattern` into `replacements` along `axis`.

    The parts are equal unless `sizes` gives each part's length (one may be -1:
    the rest), as for grouped-query attention, where keys and values are
    narrower than queries. Lazy: each part reads only its own rows.

    Example:
        >>> import numpy as np
        >>> from orbax_surgery import apply_rules
        >>> rule = Split(r'(.*)/qkv', (r'\1/q', r'\1/k', r'\1/v'), sizes=(2, 1, 1))
        >>> out = apply_rules({'attn': {'qkv': np.arange(4)}}, None, [rule])
        >>> {k: v.tolist() for k, v in out['attn'].items()}
        {'k': [2], 'q': [0, 1], 'v': [3]}
    """

    replacements: tuple[str, ...]
    axis: int = 0
    sizes: tuple[int, ...] | None = None

    def __post_init__(self):
        super().__post_init__()
        owner = repr(self)
        if isinstance(self.replacements, str) or not isinstance(self.replacements, Sequence):
            raise RuleError(f'{owner}: replacements is a sequence of key templates, one per part.')
        object.__setattr__(self, 'replacements', tuple(self.replacements))
        if len(self.replacements) < 2:
            raise RuleError(f'{owner}: give two or more replacements (one part is a Rename).')
        for template in self.replacements:
            check_template(self._re.compiled, template, owner)
        object.__setattr__(self, 'axis', parse_int(self.axis, 'axis', owner))
        if self.sizes is not None:
            sizes = parse_ints(self.sizes, 'sizes', owner)
            if len(sizes) != len(self.replacements):
                raise RuleError(
                    f'{owner}: {len(sizes)} sizes for {len(self.replacements)} replacements; '
                    'give one size per part.'
                )
            if any(n < -1 for n in sizes) or sizes.count(-1) > 1:
                raise RuleError(
                    f'{owner}: sizes are lengths >= 0, with at most one -1 (the rest): {sizes}.'
                )
            object.__setattr__(self, 'sizes', sizes)

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]:
        found = self._matching(list(tree), 'checkpoint')
        out = {k: e for k, e in tree.items() if not self._re.fullmatch(k)}
        for key, m in found:
            value = tree[key].expr
            try:
                parts = self._parts(value)
            except SurgeryError as e:
                raise type(e)(f'{self!r} on {key!r} {signature(value)}: {e}') from e
            for template, part in zip(self.replacements, parts, strict=True):
                new = m.expand(template)
                if new in out:
                    raise AmbiguousRuleError(
                        f'{self!r} splits {key!r} into {new!r}, which {origin(new, out[new])} '
                        'already has. Drop one of them first, or change the replacements.'
                    )
                out[new] = tree[key].then(self, part)
        return out

    def _parts(self, value: ex.Expr) -> list[ex.Expr]:
        ndim = len(value.shape)
        if not -ndim <= self.axis < ndim:
            raise ShapeMismatchError(f'axis {self.axis} is out of range for {ndim} axes.')
        axis = self.axis % ndim
        lengths = _lengths(value.shape[axis], len(self.replacements), self.sizes, axis)
        parts: list[ex.Expr] = []
        start = 0
        for n in lengths:
            index = (slice(None),) * axis + (slice(start, start + n),)
            parts.append(ops.Index.of(value, index))
            start += n
        return parts


def _lengths(total: int, count: int, sizes: tuple[int, ...] | None, axis: int) -> list[int]:
    """Each part's length along the axis, or a ShapeMismatchError saying what would fit."""
    if sizes is None:
        if total % count:
            raise ShapeMismatchError(
                f'axis {axis} has {total} entries, which do not split into {count} equal parts; '
                f'pass sizes=(...) with {count} lengths that add up to {total}.'
            )
        return [total // count] * count
    known = sum(n for n in sizes if n != -1)
    if -1 in sizes and known <= total:
        return [total - known if n == -1 else n for n in sizes]
    if known != total:
        raise ShapeMismatchError(
            f'sizes {sizes} add up to {known}, but axis {axis} has {total} entries.'
        )
    return list(sizes)


@dataclasses.dataclass(frozen=True, repr=False)
class Concatenate:
    r"""Joins `parts` into one key along `axis`: the inverse of `Split`.

    `parts[0]` is a regex over checkpoint keys; the other parts are templates
    expanded with its match, so one rule serves every layer. The parts leave the
    tree; the joined array is named by `replacement`. Lazy: a region of the
    result reads only the parts it overlaps.

    Example:
        >>> import numpy as np
        >>> from orbax_surgery import apply_rules
        >>> rule = Concatenate((r'(.*)/q', r'\1/k', r'\1/v'), r'\1/qkv')
        >>> tree = {'attn': {'q': np.zeros(2), 'k': np.ones(1), 'v': np.full(1, 2.0)}}
        >>> apply_rules(tree, None, [rule])['attn']['qkv'].tolist()
        [0.0, 0.0, 1.0, 2.0]
    """

    parts: tuple[str, ...]
    replacement: str
    axis: int = 0
    _re: KeyPattern = dataclasses.field(init=False, compare=False)

    def __post_init__(self):
        owner = repr(self)
        if isinstance(self.parts, str) or not isinstance(self.parts, Sequence):
            raise RuleError(
                f'{owner}: parts is a sequence: a regex over checkpoint keys, then templates '
                r"expanded with its match, e.g. (r'(.*)/q', r'\1/k', r'\1/v')."
            )
        object.__setattr__(self, 'parts', tuple(self.parts))
        if len(self.parts) < 2:
            raise RuleError(f'{owner}: give two or more parts (one part is a Rename).')
        object.__setattr__(self, '_re', KeyPattern(self.parts[0], owner))
        for template in (*self.parts[1:], self.replacement):
            check_template(self._re.compiled, template, owner)
        object.__setattr__(self, 'axis', parse_int(self.axis, 'axis', owner))

    def __repr__(self):
        axis = f', axis={self.axis}' if self.axis else ''
        return f'Concatenate({self.parts!r}, {self.replacement!r}{axis})'

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]:
        found = [(k, m) for k in tree if (m := self._re.fullmatch(k))]
        if not found:
            raise UnmatchedKeyError(
                f'{self!r} matches none of the {len(tree)} checkpoint keys.'
                f'{did_you_mean(self.parts[0], list(tree))}'
            )
        joined: dict[KeyPath, tuple[list[KeyPath], Entry]] = {}
        for key, m in found:
            names = [key, *(m.expand(t) for t in self.parts[1:])]
            for name in names:
                if name not in tree:
                    raise UnmatchedKeyError(
                        f'{self!r} needs {name!r} to join with {key!r}, which is not among the '
                        f'{len(tree)} checkpoint keys.{did_you_mean(name, tree)}'
                    )
            values = [tree[n].expr for n in names]
            try:
                ndim = len(values[0].shape)
                if not -ndim <= self.axis < ndim:
                    raise ShapeMismatchError(
                        f'axis {self.axis} is out of range for {ndim} axes ({values[0].shape}).'
                    )
                expr = ops.Concat(tuple(values), self.axis % ndim)
            except SurgeryError as e:
                shapes = ', '.join(
                    f'{n!r} {signature(v)}' for n, v in zip(names, values, strict=True)
                )
                raise type(e)(f'{self!r} joining {shapes}: {e}') from e
            new = m.expand(self.replacement)
            if new in joined:
                raise AmbiguousRuleError(
                    f'{self!r} joins both {joined[new][0]} and {names} into {new!r}; make '
                    'the replacement use the groups that tell them apart.'
                )
            by_id = {id(r): r for n in names for r in tree[n].via}
            joined[new] = (names, Entry(expr, (*by_id.values(), self)))
        used = {n for names, _ in joined.values() for n in names}
        out = {k: e for k, e in tree.items() if k not in used}
        for new, (names, entry) in joined.items():
            if new in out:
                raise AmbiguousRuleError(
                    f'{self!r} joins {names} into {new!r}, which {origin(new, out[new])} '
                    'already has. Drop one of them first, or change the replacement.'
                )
            out[new] = entry
        return out
