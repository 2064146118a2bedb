"""Scanned <-> unrolled layers: `Unstack` and `Stack` rules.

`nn.scan`, `nnx.scan` and MaxText's `scan_layers=True` store all L layers of a
block stacked in one array per parameter, `(L, ...)` (the layer axis may be
elsewhere); unrolled models store `layers_0 ... layers_{L-1}`. `Unstack` turns
each stacked array into one lazy slice per layer, `Stack` builds one lazy stack
from per-layer arrays. Both match whole sub-trees with one regex, take any
subset of layers in any order, and nest (a stack of stacks is two rules).
Nothing is read: a target shard of layer i reads only its part of the stack.
"""

from __future__ import annotations

import collections
import dataclasses
import re
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
from orbax_surgery.keys import KeyPath, KeyPattern, check_template
from orbax_surgery.rules.arguments import parse_int, parse_ints
from orbax_surgery.rules.rule import Entry, PatternRule, Target, Tree, origin

LAYER = '{i}'
"""Where `Unstack` writes the layer number in its replacement (or `{i+1}`, `{i:02d}`, ...)."""
_LAYER = re.compile(r'\{i(?P<offset>[+-]\d+)?(?::(?P<spec>0?\d*d))?\}')
"""`{i}`, with an offset (`{i+1}`, numbering from 1) and a format (`{i:02d}`, `{i+1:03d}`)."""
MAX_LAYERS = 2**16
"""Most keys one `Unstack` makes from one array: each layer is a key, held in memory."""


@dataclasses.dataclass(frozen=True)
class _Layers(PatternRule):
    replacement: str
    axis: int = dataclasses.field(default=0, kw_only=True)
    layers: Sequence[int] | None = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, 'axis', parse_int(self.axis, 'axis', repr(self)))
        if self.layers is not None:
            object.__setattr__(self, 'layers', parse_ints(self.layers, 'layers', repr(self)))
            if not self.layers:
                raise RuleError(f'{self!r}: layers is empty; pass None to take them all.')
            if len(set(self.layers)) != len(self.layers):
                raise RuleError(f'{self!r}: layers {self.layers} name a layer twice.')

    def _put(self, out: dict[KeyPath, Entry], key: KeyPath, entry: Entry, source: str) -> None:
        if key in out:
            raise AmbiguousRuleError(
                f'{self!r} maps {source!r} to {key!r}, which {origin(key, out[key])} already '
                'has. Drop one of them first, or make the pattern narrower.'
            )
        out[key] = entry


@dataclasses.dataclass(frozen=True)
class Unstack(_Layers):
    r"""Splits stacked (scanned) arrays into one array per layer.

    Each checkpoint key fully matching `pattern` is an array with layers along
    `axis`; layer `layers[i]` of it becomes key `replacement` with `{i}` set to
    i (backreferences work as in `Rename`). `layers` picks and orders the
    layers taken (default: all, in order), e.g. `range(0, 32, 2)` for a
    16-layer student of a 32-layer teacher, or `range(31, -1, -1)` to reverse.

    Example:
        >>> import numpy as np
        >>> from orbax_surgery import apply_rules
        >>> scanned = {'layers': {'w': np.arange(6).reshape(3, 2)}}  # 3 layers on axis 0
        >>> rule = Unstack(r'layers/(.*)', r'layers_{i}/\1', layers=[0, 2])
        >>> out = apply_rules(scanned, None, [rule])
        >>> out['layers_0']['w'].tolist(), out['layers_1']['w'].tolist()
        ([0, 1], [4, 5])
    """

    def __post_init__(self):
        super().__post_init__()
        if not _LAYER.search(self.replacement):
            raise RuleError(
                f'{self!r}: the replacement needs {LAYER} where the layer number goes, '
                f'e.g. {self.replacement.rstrip("/") + "_" + LAYER!r} (or {{i+1}}, {{i:02d}}).'
            )
        check_template(self._re.compiled, _LAYER.sub('0', self.replacement), repr(self))

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]:
        found = self._matching(list(tree), 'checkpoint')
        out = {k: e for k, e in tree.items() if not self._re.fullmatch(k)}
        for key, m in found:
            value = tree[key].expr
            try:
                axis, chosen = self._chosen(value)
            except SurgeryError as e:
                raise type(e)(f'{self!r} on {key!r} {value.shape} {value.dtype}: {e}') from e
            family = m.expand(self.replacement)  # Leaves {i...} as it is.
            self._check_target(family, key, value, len(chosen), target)
            for i, layer in enumerate(chosen):
                index = (slice(None),) * axis + (layer,)
                entry = tree[key].then(self, ops.Index.of(value, index))
                self._put(out, _number(family, i), entry, key)
        return out

    def _chosen(self, value: ex.Expr) -> tuple[int, tuple[int, ...]]:
        ndim = len(value.shape)
        if not -ndim <= self.axis < ndim:
            raise ShapeMismatchError(
                f'layer axis {self.axis} is out of range for {ndim} axes.'
                + (' A scalar has no layers.' if not ndim else '')
            )
        axis = self.axis % ndim
        count = value.shape[axis]
        if self.layers is None and count > MAX_LAYERS:
            raise ShapeMismatchError(
                f'axis {axis} has {count} entries, more than the {MAX_LAYERS} layers Unstack '
                'makes keys for. Is axis= the layer axis? Pass layers=[...] to take a few.'
            )
        chosen = tuple(range(count)) if self.layers is None else self.layers
        bad = [i for i in chosen if not -count <= i < count]
        if bad:
            raise ShapeMismatchError(
                f'layers {bad} do not exist: the stack has {count} layers along axis {axis}.'
            )
        return axis, tuple(i % count for i in chosen)

    def _check_target(
        self, family: str, key: KeyPath, value: ex.Expr, made: int, target: Target
    ) -> None:
        """A target with a different layer count is an error naming both counts."""
        slot = _numbered_regex(family)
        wanted = sorted({_layer_of(family, m) for k in target if (m := slot.fullmatch(k))})
        if wanted and wanted != list(range(made)):
            how = (
                'Pass layers=[...] to choose which stacked layers to take.'
                if self.layers is None
                else 'Give as many layers as the target has.'
            )
            raise ShapeMismatchError(
                f'{self!r} makes {made} layers {family!r} (i = 0..{made - 1}) from {key!r} '
                f'{value.shape}, but the target has {len(wanted)} ({_numbers(wanted)}). {how}'
            )


@dataclasses.dataclass(frozen=True)
class Stack(_Layers):
    r"""Stacks per-layer arrays into one scanned array per parameter.

    `{i}` in `pattern` stands for the layer number (or write the named group
    `(?P<i>\d+)` yourself). Keys that differ only in it are stacked along
    `axis`, in the order of `layers` (default: all, 0, 1, ...), under
    `replacement`, whose backreferences count only the pattern's own groups.

    Example:
        >>> import numpy as np
        >>> from orbax_surgery import apply_rules
        >>> unrolled = {'layers_0': {'w': np.zeros(2)}, 'layers_1': {'w': np.ones(2)}}
        >>> out = apply_rules(unrolled, None, [Stack(r'layers_{i}/(.*)', r'layers/\1')])
        >>> out['layers']['w'].tolist()
        [[0.0, 0.0], [1.0, 1.0]]
    """

    _names: KeyPattern = dataclasses.field(init=False, repr=False, compare=False)
    _offset: int = dataclasses.field(init=False, default=0, repr=False, compare=False)

    def _regex(self) -> str:
        """The pattern with its first layer template as the group `i`, later ones equal to it."""
        if not isinstance(self.pattern, str):
            return self.pattern
        found = list(_LAYER.finditer(self.pattern))
        if not found:
            return self.pattern
        start = found[0].start()
        return _LAYER.sub(
            lambda m: r'(?P<i>\d+)' if m.start() == start else r'(?P=i)', self.pattern
        )

    def __post_init__(self):
        super().__post_init__()
        names = self._re
        found = list(_LAYER.finditer(self.pattern))
        if found:
            if len({f[0] for f in found}) > 1:
                raise RuleError(
                    f'{self!r}: the pattern numbers layers in two ways: '
                    f'{", ".join(sorted({f[0] for f in found}))}.'
                )
            object.__setattr__(self, '_offset', int(found[0]['offset'] or 0))
            names = KeyPattern(_LAYER.sub(lambda _: r'\d+', self.pattern), repr(self))
        elif 'i' not in self._re.groupindex:
            raise RuleError(
                f'{self!r}: the pattern needs {LAYER} (or a named group (?P<i>\\d+)) where '
                r"the layer number is, e.g. 'layers_{i}/(.*)' or 'layers.{i+1:02d}/(.*)'."
            )
        object.__setattr__(self, '_names', names)
        check_template(names.compiled, self.replacement, repr(self))

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]:
        families: dict[str, dict[int, KeyPath]] = collections.defaultdict(dict)
        for key, m in self._matching(list(tree), 'checkpoint'):
            if not m['i'].isdigit():
                raise RuleError(f'{self!r}: the layer number of {key!r} is {m["i"]!r}, not digits.')
            named = self._names.fullmatch(key)
            assert named is not None, (self._names.pattern, key)
            layer = families[named.expand(self.replacement)]
            number = int(m['i']) - self._offset
            if number < 0:
                raise RuleError(
                    f'{self!r}: {key!r} is numbered {m["i"]}, which the pattern makes layer '
                    f'{number}; is the offset right?'
                )
            if number in layer:
                raise AmbiguousRuleError(
                    f'{self!r} finds layer {number} of the same stack twice: '
                    f'{layer[number]!r} and {key!r}.'
                )
            layer[number] = key
        counts = {family: self._order(family, layers) for family, layers in families.items()}
        _check_same_counts(self, counts)
        out = {k: e for k, e in tree.items() if not self._re.fullmatch(k)}
        for family, order in counts.items():
            keys = [families[family][i] for i in order]
            parts = tuple(tree[k].expr for k in keys)
            try:
                ndim = len(parts[0].shape) + 1
                if not -ndim <= self.axis < ndim:
                    raise ShapeMismatchError(
                        f'layer axis {self.axis} is out of range for layers of shape '
                        f'{parts[0].shape} (their stack has {ndim} axes).'
                    )
                axis = self.axis % ndim
                stacked = ops.Stack(parts, axis)
            except SurgeryError as e:
                raise type(e)(f'{self!r} making {family!r}: {e}') from e
            self._check_target(family, stacked, axis, target)
            # By identity: a rule holding a slice (`Slice`) is unhashable before Python 3.12.
            by_id = {id(r): r for k in keys for r in tree[k].via}
            via = (*by_id.values(), self)
            self._put(out, family, Entry(stacked, via), keys[0])
        return out

    def _order(self, family: str, found: dict[int, KeyPath]) -> tuple[int, ...]:
        if self.layers is None:
            missing = sorted(set(range(max(found) + 1)) - set(found))
            if missing:
                raise UnmatchedKeyError(
                    f'{self!r} cannot make {family!r}: layers {_numbers(missing)} are missing '
                    f'(found {_numbers(sorted(found))}). Pass layers=[...] to stack a subset.'
                )
            return tuple(sorted(found))
        missing = [i for i in self.layers if i not in found]
        if missing:
            raise UnmatchedKeyError(
                f'{self!r} cannot make {family!r}: layers {_numbers(missing)} are not in the '
                f'checkpoint (found {_numbers(sorted(found))}).'
            )
        return tuple(self.layers)

    def _check_target(self, family: str, stacked: ops.Stack, axis: int, target: Target) -> None:
        leaf = target.get(family)
        if leaf is None or leaf.shape is None or len(leaf.shape) != len(stacked.shape):
            return  # The plan reports missing keys and other shapes.
        if leaf.shape[axis] != stacked.shape[axis]:
            count = stacked.shape[axis]
            layer = stacked.shape[:axis] + stacked.shape[axis + 1 :]
            axes = [
                a
                for a in range(len(leaf.shape))
                if leaf.shape[a] == count and leaf.shape[:a] + leaf.shape[a + 1 :] == layer
            ]
            fix = f'Pass layers=[...] to choose which {leaf.shape[axis]} layers to stack.'
            if axes:
                fix = f'The target stacks them on axis {axes[0]}: axis={axes[0]}.'
            error = ShapeMismatchError(
                f'{self!r} stacks {count} layers into {family!r} {stacked.shape}, '
                f'but the target has {leaf.shape[axis]} along axis {axis} ({leaf.shape}). {fix}'
            )
            if axes:
                error.suggestions = (repr(dataclasses.replace(self, axis=axes[0])),)
            raise error


def _check_same_counts(rule: Stack, counts: dict[str, tuple[int, ...]]) -> None:
    """Every parameter of a layer stacks to the same number of layers."""
    by_count = collections.defaultdict(list)
    for family, order in counts.items():
        by_count[len(order)].append(family)
    if len(by_count) > 1:
        parts = [
            f'{n} for {", ".join(map(repr, fams[:2]))}' for n, fams in sorted(by_count.items())
        ]
        raise UnmatchedKeyError(
            f'{rule!r} finds different layer counts: {"; ".join(parts)}. A layer is missing '
            'a parameter; Drop the extra keys or restrict the pattern.'
        )


def _numbers(ns: Sequence[int]) -> str:
    """`0..15` for a run, else the list (shortened)."""
    if len(ns) > 2 and list(ns) == list(range(ns[0], ns[0] + len(ns))):
        return f'{ns[0]}..{ns[-1]}'
    shown = ', '.join(map(str, ns[:8]))
    return shown + (f', ... ({len(ns)})' if len(ns) > 8 else '')


def _number(family: str, i: int) -> str:
    """The key of layer `i` of `family`: each template written with its offset and format."""

    def write(m: re.Match[str]) -> str:
        return format(i + int(m['offset'] or 0), m['spec'] or 'd')

    return _LAYER.sub(write, family)


def _numbered_regex(family: str) -> re.Pattern[str]:
    """Matches the keys `_number(family, i)` writes, capturing the number written."""
    texts = [re.escape(text) for text in _LAYER.split(family)[::3]]  # Between the templates.
    return re.compile(texts[0] + ''.join(r'(\d+)' + text for text in texts[1:]))


def _layer_of(family: str, m: re.Match[str]) -> int:
    """The layer `i` whose number `_numbered_regex(family)` matched."""
    found = _LAYER.search(family)
    assert found is not None, family
    return int(m[1]) - int(found['offset'] or 0)
