"""Rules that move keys: rename, copy (tied weights), drop, and fall back to the target."""

from __future__ import annotations

import dataclasses

from orbax_surgery.arrays import expr as ex
from orbax_surgery.errors import AmbiguousRuleError, RuleError
from orbax_surgery.keys import KeyPath, check_template
from orbax_surgery.rules.rule import Entry, PatternRule, Target, Tree, origin


@dataclasses.dataclass(frozen=True)
class _Move(PatternRule):
    """Base for Rename and Copy: new keys from a template."""

    replacement: str

    def __post_init__(self):
        super().__post_init__()
        check_template(self._re.compiled, self.replacement, repr(self))

    def _moved(self, tree: Tree, keep: bool) -> dict[KeyPath, Entry]:
        found = self._matching(list(tree), 'checkpoint')
        out = dict(tree) if keep else {k: e for k, e in tree.items() if not self._re.fullmatch(k)}
        for key, m in found:
            new = m.expand(self.replacement)
            if new in out:
                raise AmbiguousRuleError(
                    f'{self!r} maps {key!r} to {new!r}, which {origin(new, out[new])} already '
                    'has. Drop one of them first, or make the pattern narrower.'
                )
            out[new] = tree[key].then(self)
        return out


@dataclasses.dataclass(frozen=True)
class Rename(_Move):
    r"""Renames checkpoint keys fully matching `pattern` to `replacement`.

    Example:
        >>> import numpy as np
        >>> from orbax_surgery import apply_rules
        >>> rule = Rename(r'dense_(\d+)/(.*)', r'Dense_\1/\2')
        >>> out = apply_rules({'dense_0': {'w': np.ones(2)}}, None, [rule])
        >>> list(out), out['Dense_0']['w'].tolist()
        (['Dense_0'], [1.0, 1.0])
    """

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]:
        return self._moved(tree, keep=False)


@dataclasses.dataclass(frozen=True)
class Copy(_Move):
    r"""Adds a copy of each matching key under `replacement`: tied weights.

    A host reads each stored chunk once however many targets use it (see
    `orbax_surgery.read.session`).

    Example:
        >>> import numpy as np
        >>> from orbax_surgery import apply_rules
        >>> out = apply_rules({'embed': np.arange(3)}, None, [Copy('embed', 'lm_head')])
        >>> out['embed'].tolist(), out['lm_head'].tolist()
        ([0, 1, 2], [0, 1, 2])
    """

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]:
        return self._moved(tree, keep=True)


@dataclasses.dataclass(frozen=True)
class Drop(PatternRule):
    """Leaves checkpoint keys fully matching `pattern` unread, on purpose.

    Example:
        >>> import numpy as np
        >>> from orbax_surgery import apply_rules
        >>> tree = {'w': np.ones(2), 'opt_state': {'mu': np.zeros(2)}}
        >>> out = apply_rules(tree, {'w': ...}, [Drop(r'opt_state/.*')])
        >>> list(out), out['w'].tolist()
        (['w'], [1.0, 1.0])
    """

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]:
        self._matching(list(tree), 'checkpoint')
        return {k: e for k, e in tree.items() if not self._re.fullmatch(k)}


@dataclasses.dataclass(frozen=True)
class Fallback(PatternRule):
    """Target keys matching `pattern` keep the value the target tree gives.

    Use it for new layers initialised by the model; any checkpoint array of the
    same name is left unread. The target leaf must be a concrete array.

    Example:
        >>> import numpy as np
        >>> from orbax_surgery import apply_rules
        >>> target = {'w': ..., 'head': np.zeros(3)}  # The new head from model.init.
        >>> out = apply_rules({'w': np.ones(2)}, target, [Fallback('head')])
        >>> out['head'].tolist(), out['w'].tolist()
        ([0.0, 0.0, 0.0], [1.0, 1.0])
    """

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]:
        out = dict(tree)
        for key, _ in self._matching(list(target), 'target'):
            leaf = target[key]
            if not leaf.has_value:
                raise RuleError(
                    f'{self!r} takes {key!r} from the target, but the target gives only its '
                    'shape there. Pass a concrete array for it (e.g. from model.init).'
                )
            out[key] = Entry(ex.Constant(leaf.value), (self,))
        return out
