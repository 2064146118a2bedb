"""What a rule is: an edit of a tree of lazy values keyed by path, selected by regex.

Rules apply in order to a tree of lazy expressions keyed by path; each rule sees
the keys as the rules before it left them. Patterns are regexes matched with
`re.fullmatch`; replacements may use `\\1` and `\\g<name>` backreferences. A
rule whose pattern matches nothing is an error, since it is almost always a typo.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from orbax_surgery.arrays import expr as ex
from orbax_surgery.errors import SurgeryError, UnmatchedKeyError
from orbax_surgery.keys import SEP, KeyPath, KeyPattern, Skeleton, close_matches, did_you_mean
from orbax_surgery.rules.target import TargetLeaf


@dataclasses.dataclass(frozen=True)
class Entry:
    """One key of the tree being rewritten: its value and the rules that shaped it."""

    expr: ex.Expr
    via: tuple[Rule, ...] = ()

    def then(self, rule: Rule, expr: ex.Expr | None = None) -> Entry:
        return Entry(self.expr if expr is None else expr, self.via + (rule,))


Tree = Mapping[KeyPath, Entry]
_LITERAL_START = re.compile(r'[^\\.^$*+?{}\[\]|()]*')
Target = Mapping[KeyPath, TargetLeaf]


def stored_skeleton(tree: Tree) -> Skeleton | None:
    """The containers the tree's arrays were stored in, while it has the stored keys.

    Lists stay lists, dataclasses and NamedTuples themselves: where the source
    knows them (an Orbax item, an in-memory tree) and no rule renamed a key.
    """
    found = {
        id(s.skeleton): s.skeleton
        for entry in tree.values()
        for s in entry.expr.sources()
        if s.skeleton is not None
    }
    if len(found) != 1:
        return None
    (skeleton,) = found.values()
    return skeleton if set(skeleton.keys) == set(tree) else None


class Rule(Protocol):
    """Anything with `apply(tree, target) -> tree`; see the classes below."""

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]: ...


@dataclasses.dataclass(frozen=True)
class PatternRule:
    """Base for rules that select keys with a regex."""

    pattern: str
    _re: KeyPattern = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, '_re', KeyPattern(self._regex(), repr(self)))

    def _regex(self) -> str:
        """The regex keys are matched with: `pattern`, unless a rule reads it otherwise."""
        return self.pattern

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]:
        raise NotImplementedError(f'{type(self).__name__} is not a rule by itself.')

    def _matching(self, keys: Sequence[KeyPath], what: str) -> list[tuple[KeyPath, Any]]:
        found = [(k, m) for k in keys if (m := self._re.fullmatch(k))]
        if not found:
            respelled = self._respelled(keys)
            hint = (
                f' Did you mean {respelled!r}?' if respelled else did_you_mean(self.pattern, keys)
            )
            error = UnmatchedKeyError(
                f'{self!r} matches none of the {len(keys)} {what} keys.{hint}'
            )
            error.suggestions = (repr(respelled),) if respelled else ()
            raise error
        return found

    def _respelled(self, keys: Sequence[KeyPath]) -> PatternRule | None:
        """This rule with the literal start of its pattern spelled as the keys spell it, if
        that makes it match: `Drop('opt_sate/.*')` -> `Drop('opt_state/.*')`."""
        literal = _LITERAL_START.match(self.pattern).group(0)  # type: ignore[union-attr]
        parts = literal.split(SEP)[:-1]  # Whole components only.
        if not parts:
            return None
        depth = len(parts)
        prefixes = {SEP.join(k.split(SEP)[:depth]) for k in keys if k.count(SEP) >= depth}
        for near in close_matches(SEP.join(parts), prefixes, 3):
            pattern = re.escape(near) + self.pattern[len(SEP.join(parts)) :]
            try:
                fixed = dataclasses.replace(self, pattern=pattern)
            except SurgeryError:
                continue
            if any(fixed._re.fullmatch(k) for k in keys):
                return fixed
        return None


def origin(key: KeyPath, entry: Entry) -> str:
    """Where a key's value comes from, for messages."""
    if not entry.via:
        return f'checkpoint key {key!r}'
    return f'{entry.expr.describe()!r} (made {key!r} by {entry.via[-1]!r})'
