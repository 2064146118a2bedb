"""Root causes first: a plan's problems grouped by cause, the consequences folded under it.

One wrong rule leaves every target it would have filled empty and every key it
would have read unread; one wrong layer count fails every stacked leaf the same
way. Reported one by one, the cause drowns. Here each problem is attributed:
- a missing target or wrong leaf to the first failed rule that could have made it
  (its output template matches the key);
- missing targets to one group when they are the same mistake: layers the
  checkpoint does not have, or one path component named differently everywhere
  (then one regex `Rename` fixes them all);
- wrong leaves to one group when they differ the same way;
- unread checkpoint keys to the failed rule, or to the missing targets they were
  meant for.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Mapping, Sequence

from orbax_surgery.errors import SurgeryError, UnmatchedKeyError
from orbax_surgery.keys import KeyPath, summarize
from orbax_surgery.suggestions import close_keys, covering_pattern

_DIGITS = re.compile(r'\d+')
_BACKREF = '\\1'
_LAYER = re.compile(r'((?:^|/)(?:layers?|blocks?|h)[_/.])(\d+)(?=/|$)')


@dataclasses.dataclass
class _Root:
    error: SurgeryError
    targets: list[KeyPath] = dataclasses.field(default_factory=list)
    unread: list[KeyPath] = dataclasses.field(default_factory=list)
    followers: list[SurgeryError] = dataclasses.field(default_factory=list)
    more: str = ''
    suggestions: tuple[str, ...] | None = None
    missing: list[KeyPath] = dataclasses.field(default_factory=list)  # Targets it is about.
    alike: bool = False  # Its targets are the same mistake again, not consequences.

    def built(self) -> SurgeryError:
        text = self.more
        if self.targets:
            n = len(self.targets)
            how = (
                'alike'
                if self.alike
                else 'that follow from it'
                if n > 1
                else 'that follows from it'
            )
            text += f' And {n} target{"s" if n > 1 else ""} {how}: {summarize(self.targets, 3)}.'
        if self.suggestions and self.suggestions[0] not in f'{self.error}{text}':
            text += f' Fix {"them all" if self.targets else "it"}: {self.suggestions[0]}.'
        if self.unread:
            n = len(self.unread)
            text += f' It leaves {n} checkpoint key{"s" if n > 1 else ""} unread: '
            text += f'{summarize(self.unread, 3)}.'
        return self.error.with_details(
            text, suggestions=self.suggestions, consequences=tuple(self.followers)
        )


@dataclasses.dataclass(frozen=True)
class Failure:
    """A rule that raised while the rules ran: its position, the rule, the error."""

    index: int
    rule: object
    error: SurgeryError


def root_causes(
    failures: Sequence[Failure],
    missing: Mapping[KeyPath, SurgeryError],
    mismatches: Sequence[tuple[KeyPath, SurgeryError, str]],
    unused: tuple[tuple[KeyPath, KeyPath], ...],
    unused_error: SurgeryError | None,
    present: Collection[KeyPath],
    targets: Collection[KeyPath] = (),
    closest: Mapping[KeyPath, Sequence[KeyPath]] | None = None,
) -> tuple[SurgeryError, ...]:
    """The plan's errors, each a root cause with what follows from it folded under it.

    Args:
        failures: Rules that raised, in rule order.
        missing: Target keys nothing fills, with their errors, in target order.
        mismatches: (target key, error, kind) for wrong shapes and dtypes; errors
            of one kind differ the same way.
        unused: (checkpoint key, its name after the rules) that no target reads.
        unused_error: The error listing them.
        present: The keys after the rules.
        targets: Every target key (a fix for a group covers only the group's keys).
        closest: Each missing target's closest keys in `present`, best first, where
            the caller has them already (else they are looked up here).
    """
    if closest is None:
        closest = {key: close_keys(key, present, 1) for key in missing}
    roots = [_Root(f.error) for f in failures]
    outputs = [_output_pattern(f.rule) for f in failures]

    def blamed(key: KeyPath) -> _Root | None:
        for root, pattern in zip(roots[: len(outputs)], outputs, strict=True):
            if pattern is not None and pattern.fullmatch(key):
                return root
        return None

    unclaimed: dict[KeyPath, SurgeryError] = {}
    for key, error in missing.items():
        if (root := blamed(key)) is not None:
            root.targets.append(key)
            root.followers.append(error)
        else:
            unclaimed[key] = error
    roots += _missing_roots(unclaimed, present, closest)
    groups: dict[str, _Root] = {}
    keyed = {id(error): key for key, error, _ in mismatches}
    for key, error, kind in mismatches:
        if (root := blamed(key)) is not None:
            root.targets.append(key)
            root.followers.append(error)
        elif kind in groups and kind != 'other':
            groups[kind].targets.append(key)
            groups[kind].followers.append(error)
        else:
            groups[kind if kind != 'other' else key] = _Root(error, alike=True)
    for root in groups.values():  # One fix for the group: its pattern covers the group.
        if root.targets and root.error.suggestions:
            keys = [keyed[id(root.error)], *root.targets]
            cover = covering_pattern(keys, set(targets) - set(keys))
            single = repr(re.escape(keys[0]))
            root.suggestions = tuple(f.replace(single, repr(cover)) for f in root.error.suggestions)
    roots += groups.values()
    if unused_error is not None:
        owner = _owner_of_unused(roots, len(failures), failures, unused, closest)
        if owner is None:
            roots.append(_Root(unused_error))
        else:
            owner.unread += [k for k, _ in unused]
            owner.followers.append(unused_error)
    return tuple(r.built() for r in roots)


def _owner_of_unused(
    roots: Sequence[_Root],
    failed: int,
    failures: Sequence[Failure],
    unused: tuple[tuple[KeyPath, KeyPath], ...],
    closest: Mapping[KeyPath, Sequence[KeyPath]],
) -> _Root | None:
    """The root that unread keys follow from: a failed rule that left targets empty (or
    matched nothing), else the missing targets whose closest keys they are."""
    owner = next((r for r in roots[:failed] if r.targets), None)
    if owner is None and failures and isinstance(failures[0].error, UnmatchedKeyError):
        return roots[0]
    if owner is not None:
        return owner
    renamed = {new for _, new in unused}
    for root in roots[failed:]:
        if root.missing and any(closest[k] and closest[k][0] in renamed for k in root.missing):
            return root
    return None


def _output_pattern(rule: object) -> re.Pattern[str] | None:
    """A regex of the keys `rule` writes, or None when it cannot tell."""
    if getattr(rule, 'fills_any_target', False):
        return re.compile('.*', re.DOTALL)
    templates = []
    for name in ('replacement', 'replacements'):
        value = getattr(rule, name, None)
        if isinstance(value, str):
            templates.append(value)
        elif isinstance(value, tuple):
            templates += [v for v in value if isinstance(v, str)]
    if not templates:
        pattern = getattr(rule, 'pattern', None)
        return re.compile(pattern) if isinstance(pattern, str) else None
    parts = [_template_regex(t) for t in templates]
    return re.compile('|'.join(f'(?:{p})' for p in parts), re.DOTALL)


def _template_regex(template: str) -> str:
    """A regex of what a replacement template can produce: backrefs and `{i}` match anything."""
    out, i = [], 0
    pieces = re.split(r'(\\g<\w+>|\\\d+|\{i\}|\{[^{}]*\})', template)
    for piece in pieces:
        if i % 2:
            out.append('.*')
        else:
            out.append(re.escape(piece.replace('\\\\', '\\')))
        i += 1
    return ''.join(out)


def _missing_roots(
    missing: Mapping[KeyPath, SurgeryError],
    present: Collection[KeyPath],
    closest: Mapping[KeyPath, Sequence[KeyPath]],
) -> list[_Root]:
    """Missing targets as few roots as the mistakes behind them: extra layers, one renamed part."""
    roots: list[_Root] = []
    shapes = {_LAYER.sub(r'\1#', k) for k in present}
    counts = sorted({int(m.group(2)) for k in present for m in _LAYER.finditer(k)})
    extra: list[KeyPath] = []
    rest: dict[KeyPath, SurgeryError] = {}
    for key, error in missing.items():
        numbers = [int(m.group(2)) for m in _LAYER.finditer(key)]
        if numbers and counts and numbers[-1] > counts[-1] and _LAYER.sub(r'\1#', key) in shapes:
            extra.append(key)
        else:
            rest[key] = error
    if extra:
        layers = sorted({int(_LAYER.findall(k)[-1][1]) for k in extra})
        have = len(counts)
        error = UnmatchedKeyError(
            f'Nothing fills the {len(extra)} targets of layer{"s" if len(layers) > 1 else ""} '
            f'{_ranges(layers)} ({summarize(extra, 2)}): the checkpoint has {have} layers '
            f'({_ranges(counts)}), the target {layers[-1] + 1}.'
        )
        fixes = (
            f"a target with {have} layers (the checkpoint's count)",
            f'Fallback({_layers_pattern(extra)!r}) to keep the target values of the extra layers',
        )
        followers = [missing[k] for k in extra]
        roots.append(_Root(error, suggestions=fixes, followers=followers, missing=extra))
    for rule, keys in _layer_moves(rest, present).items():
        error = rest[keys[0]]
        root = _Root(error, suggestions=(rule, *error.suggestions), missing=keys, alike=True)
        root.more = f' The checkpoint has them {"un" if rule[0] == "S" else ""}stacked: {rule}?'
        root.targets, root.followers = keys[1:], [rest.pop(k) for k in keys][1:]
        roots.append(root)
    by_change: dict[tuple[str, ...], list[tuple[KeyPath, str]]] = {}
    for key in rest:
        near = closest[key]
        change = _change(key, near[0]) if near else None
        by_change.setdefault(change or ('key', key), []).append((key, near[0] if near else ''))
    singles = [pair for change, pairs in by_change.items() if change[0] == 'key' for pair in pairs]
    if len(singles) > 1:  # No one mistake explains them: still one error, not one each.
        by_change = {c: p for c, p in by_change.items() if c[0] != 'key'}
        by_change[('key', singles[0][0])] = singles
    order = {key: i for i, key in enumerate(rest)}
    for change, pairs in sorted(by_change.items(), key=lambda item: order[item[1][0][0]]):
        first_key = pairs[0][0]
        root = _Root(rest[first_key], missing=[k for k, _ in pairs], alike=True)
        rename = _rename_for(change, pairs) if change[0] != 'key' else _from_pytorch(pairs)
        if rename is not None:
            root.suggestions = (rename, *rest[first_key].suggestions[1:])
        for key, _ in pairs[1:]:
            root.targets.append(key)
            root.followers.append(rest[key])
        roots.append(root)
    return _one_from_pytorch(roots, rest)


def _one_from_pytorch(roots: list[_Root], errors: Mapping[KeyPath, SurgeryError]) -> list[_Root]:
    """Where `from_pytorch(...)` fixes several groups (a head named `weight` for `kernel`,
    the rest under a prefix), one error for all: the first suggests it with its prefix."""
    torch = [r for r in roots if r.suggestions and r.suggestions[0].startswith('from_pytorch(')]
    if len(torch) < 2:
        return roots
    keep = next((r for r in torch if 'drop_prefix' in (r.suggestions or ('',))[0]), torch[0])
    merged = {id(r) for r in torch if r is not keep}
    for other in torch:
        if id(other) in merged:
            keep.targets += other.missing
            keep.followers += [errors[key] for key in other.missing]
            keep.missing += other.missing
    return [r for r in roots if id(r) not in merged]


def _change(key: KeyPath, near: KeyPath) -> tuple[str, ...] | None:
    """How `near` differs from `key` when it is by one path component (numbers aside) or a
    prefix, else None."""
    a, b = key.split('/'), near.split('/')
    if len(a) == len(b):
        differ = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
        if len(differ) == 1:
            i = differ[0]
            old, new = _DIGITS.sub('#', b[i]), _DIGITS.sub('#', a[i])
            if old == new or old.count('#') != new.count('#'):
                return None  # Another layer, or numbers that do not carry over.
            where = 'first' if i == 0 else 'last' if i == len(a) - 1 else 'middle'
            return ('part', where, old, new)
    if len(b) > len(a) and b[len(b) - len(a) :] == a:
        return ('drop', '/'.join(b[: len(b) - len(a)]))
    if len(a) > len(b) and a[len(a) - len(b) :] == b:
        return ('add', '/'.join(a[: len(a) - len(b)]))
    return None


def _rename_for(change: tuple[str, ...], pairs: Sequence[tuple[KeyPath, KeyPath]]) -> str | None:
    """One regex `Rename` that gives every target of `pairs` from its close key, else None."""
    if change[0] == 'part':
        _, where, old, new = change
        if where == 'last' and {old, new} <= _HF_LEAVES:
            return 'from_pytorch(...): PyTorch names and layouts (a weight is transposed too)'
        numbers = old.count('#')
        before = 1 if where != 'first' else 0  # A leading (.*) group.
        o = r'(\d+)'.join(re.escape(p) for p in old.split('#'))
        pieces = new.split('#')
        n = ''.join(
            p + (f'\\{before + j + 1}' if j < numbers else '') for j, p in enumerate(pieces)
        )
        last = f'\\{before + numbers + 1}'
        pattern, replacement = {
            'first': (f'{o}/(.*)', f'{n}/{last}'),
            'last': (f'(.*)/{o}', f'\\1/{n}'),
            'middle': (f'(.*)/{o}/(.*)', f'\\1/{n}/{last}'),
        }[where]
    elif change[0] == 'drop':
        pattern, replacement = f'{re.escape(change[1])}/(.*)', '\\1'
    else:
        pattern, replacement = '(.*)', f'{change[1]}/\\1'
    compiled = re.compile(pattern)
    for key, near in pairs:
        match = compiled.fullmatch(near)
        if match is None or match.expand(replacement) != key:
            return None
    return f'Rename({pattern!r}, {replacement!r})'


def _layer_moves(
    missing: Mapping[KeyPath, SurgeryError], present: Collection[KeyPath]
) -> dict[str, list[KeyPath]]:
    """Missing targets a forgotten `Unstack` or `Stack` would fill, by that rule."""
    have = set(present)
    moves: dict[str, list[KeyPath]] = {}
    for key in missing:
        parts = key.split('/')
        for j, part in enumerate(parts):
            head = ''.join(re.escape(p) + '/' for p in parts[:j])
            unrolled = re.fullmatch(r'(.+)_\d+', part)
            if unrolled and '/'.join([*parts[:j], unrolled[1], *parts[j + 1 :]]) in have:
                name = head + re.escape(unrolled[1])
                rule = f'Unstack({name + "/(.*)"!r}, {name + "_{i}/" + _BACKREF!r})'
            elif '/'.join([*parts[:j], part + '_0', *parts[j + 1 :]]) in have:
                name = head + re.escape(part)
                rule = f'Stack({name + "_{i}/(.*)"!r}, {name + "/" + _BACKREF!r})'
            else:
                continue
            moves.setdefault(rule, []).append(key)
            break
    return moves


def _from_pytorch(pairs: Sequence[tuple[KeyPath, KeyPath]]) -> str | None:
    """`from_pytorch(...)` when Flax targets are closest to PyTorch names (`.../weight`)."""
    flax = [near for key, near in pairs if key.rsplit('/', 1)[-1] in _HF_LEAVES - {'weight'}]
    torch = [near for near in flax if near.endswith('/weight')]
    if len(pairs) < 2 or len(torch) * 2 < len(pairs):
        return None
    heads = {near.split('/', 1)[0] for near in torch}
    keys = {key.split('/', 1)[0] for key, _ in pairs}
    if len(heads) == 1 and not heads & keys:
        return f'from_pytorch(drop_prefix={heads.pop()!r})'
    return 'from_pytorch()'


_HF_LEAVES = frozenset({'weight', 'kernel', 'scale', 'embedding'})


def _ranges(numbers: Sequence[int]) -> str:
    """'0..3, 5' for [0, 1, 2, 3, 5]."""
    out, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(f'{start}..{n}' if n > start else f'{start}')
            start = None
    return ', '.join(out)


def _layers_pattern(keys: Sequence[KeyPath]) -> str:
    numbers = sorted({m.group(2) for k in keys for m in [list(_LAYER.finditer(k))[-1]]})
    first = list(_LAYER.finditer(keys[0]))[-1]
    head = keys[0][: first.start(2)]
    alternatives = numbers[0] if len(numbers) == 1 else f'({"|".join(numbers)})'
    return f'{re.escape(head)}{alternatives}/.*'
