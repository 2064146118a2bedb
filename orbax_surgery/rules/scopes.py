"""Rules written for plain keys, applied to keys with a trailing suffix (`nnx.State`'s '/value')."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from orbax_surgery.errors import AmbiguousRuleError, RuleError
from orbax_surgery.keys import KeyPath
from orbax_surgery.rules.rule import Entry, Rule, Target, Tree


@dataclasses.dataclass(frozen=True)
class Unsuffixed:
    r"""Applies `rules` to the keys as if they had no trailing `suffix`.

    A checkpoint of `nnx.state(model)` has '/value' at the end of every key
    (`layers/0/kernel/value`), and so does an `nnx.State` target. Rules inside
    see and write keys without it (`layers/0/kernel`); afterwards each key gets
    the suffix back where the target has it (or, with no target leaf there,
    where the checkpoint's keys had it).

    Example:
        >>> import numpy as np
        >>> from orbax_surgery import Rename, apply_rules
        >>> state = {'dense': {'kernel': {'value': np.ones(2)}}}  # nnx.state(model), as dicts
        >>> rule = Unsuffixed([Rename(r'dense/(.*)', r'Dense_0/\1')])
        >>> list(apply_rules(state, None, [rule])['Dense_0']['kernel'])
        ['value']
    """

    rules: Sequence[Rule]
    suffix: str = '/value'

    def __post_init__(self):
        if isinstance(self.rules, str) or not isinstance(self.rules, Sequence):
            raise RuleError(f'{self!r}: rules is a list of rules, not {self.rules!r}.')
        object.__setattr__(self, 'rules', tuple(self.rules))
        if not isinstance(self.suffix, str) or not self.suffix:
            raise RuleError(f'Unsuffixed: suffix is a non-empty str, not {self.suffix!r}.')

    def __repr__(self):
        suffix = '' if self.suffix == '/value' else f', suffix={self.suffix!r}'
        return f'Unsuffixed([{", ".join(map(repr, self.rules))}]{suffix})'

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]:
        inside = self._strip(tree, 'checkpoint')
        for rule in self.rules:
            inside = rule.apply(inside, self._strip(target, 'target'))
        had_suffix = any(k.endswith(self.suffix) for k in tree)
        out: dict[KeyPath, Entry] = {}
        for key, entry in inside.items():
            if key + self.suffix in target:
                out[key + self.suffix] = entry
            elif key in target or not had_suffix:
                out[key] = entry
            else:
                out[key + self.suffix] = entry
        return out

    def _strip(self, keyed: Tree | Target, what: str) -> dict:
        out: dict = {}
        for key, value in keyed.items():
            plain = key[: -len(self.suffix)] if key.endswith(self.suffix) else key
            if plain in out:
                raise AmbiguousRuleError(
                    f'{self!r}: the {what} has both {plain!r} and {plain + self.suffix!r}; '
                    'without the suffix they are one key. Drop one of them first.'
                )
            out[plain] = value
        return out
