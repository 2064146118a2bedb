"""Rules a preset made, reported as the preset call that made them.

`from_pytorch(drop_prefix='modle')` makes a `Rename('modle/(.*)', ...)` the user
never wrote; its errors name `from_pytorch(drop_prefix='modle')` instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from orbax_surgery.errors import SurgeryError
from orbax_surgery.keys import KeyPath
from orbax_surgery.rules.rule import Entry, Rule, Target, Tree


@dataclasses.dataclass(frozen=True)
class Generated:
    """`rule`, made by the call `by` (e.g. "from_pytorch(layers='stacked')").

    Its errors start with `by`; every other attribute is the rule's own.
    """

    rule: Rule
    by: str

    fills_any_target = True  # A preset's rules may write any target key.

    def __repr__(self) -> str:
        return f'{self.by} (its {self.rule!r})'

    def __getattr__(self, name: str) -> Any:
        if name in ('rule', 'by') or name.startswith('__'):
            raise AttributeError(name)
        return getattr(self.rule, name)

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]:
        try:
            return self.rule.apply(tree, target)
        except SurgeryError as e:
            raise e.with_details(before=f'{self.by}: ') from None
