"""PyTorch key naming as rules: module lists (`layers/0` <-> `layers_0`) and base-model prefixes."""

from __future__ import annotations

import collections
import dataclasses
import functools
import re

from orbax_surgery.errors import RuleError, UnmatchedKeyError
from orbax_surgery.keys import SEP, KeyPath, KeyPattern, close_matches, compile_pattern
from orbax_surgery.rules.moves import Rename
from orbax_surgery.rules.rule import Entry, Target, Tree


@dataclasses.dataclass(frozen=True)
class ModuleLists:
    """Rule: `nn.ModuleList` entries (`layers/0/...`) as Flax names (`layers_0/...`), or back.

    Attributes:
        to_flax: The direction: `layers/0` -> `layers_0`, else back.
        names: Regex of the lists' names. Going back it matters: Flax's own
            automatic names (`Dense_0`) are not lists.

    Example:
        >>> import numpy as np
        >>> from orbax_surgery import apply_rules
        >>> torch_tree = {'layers': {'0': {'w': np.ones(1)}, '1': {'w': np.ones(1)}}}
        >>> list(apply_rules(torch_tree, None, [ModuleLists()]))
        ['layers_0', 'layers_1']
        >>> flax_tree = {'layers_0': {'w': np.ones(1)}, 'Dense_0': {'w': np.ones(1)}}
        >>> list(apply_rules(flax_tree, None, [ModuleLists(to_flax=False, names='layers')]))
        ['Dense_0', 'layers']
    """

    to_flax: bool = True
    names: str = r'[^/]+'

    def __post_init__(self):
        compile_pattern(self.names, repr(self))

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]:
        if self.to_flax:
            pattern = re.compile(rf'(?:^|(?<=/))({self.names})/(\d+)(?=/|$)')
            repl = r'\1_\2'
            self._check_target_keeps_no_lists(pattern, tree, target)
        else:
            pattern = re.compile(rf'(?:^|(?<=/))({self.names})_(\d+)(?=/|$)')
            repl = r'\1/\2'
        out: dict[KeyPath, Entry] = {}
        for key, entry in tree.items():
            out[pattern.sub(repl, key)] = entry
        return out

    def _check_target_keeps_no_lists(self, lists: re.Pattern[str], tree: Tree, target: Target):
        """A target with `layers/0/...` keys (Hugging Face's own Flax models) wants lists kept."""
        kept = [k for k in target if lists.search(k)]
        flax_names = re.compile(rf'(?:^|(?<=/))({self.names})_(\d+)(?=/|$)')
        if (
            kept
            and any(lists.search(k) for k in tree)
            and not any(flax_names.search(k) for k in target)
        ):
            raise RuleError(
                f'{self!r} turns module lists such as {next(k for k in tree if lists.search(k))!r} '
                f'into Flax names (layers_0/...), but the target keeps them as lists, e.g. '
                f"{kept[0]!r}, as Hugging Face's own Flax models do. Pass layers=None to "
                'from_pytorch (or leave out ModuleLists).'
            )


@dataclasses.dataclass(frozen=True)
class DropPrefix:
    """Rule: `prefix/...` keys lose `prefix/`; others keep their names (a head's, `lm_head`).

    Made by `from_pytorch(drop_prefix=...)`, and reported as that call (`by`).
    """

    prefix: str
    by: str
    fills_any_target = True

    @functools.cached_property
    def _rename(self) -> Rename:  # Built (its regex compiled) once per rule.
        return Rename(f'{re.escape(self.prefix)}/(.*)', r'\1')

    @property
    def _re(self) -> KeyPattern:
        return self._rename._re

    def __repr__(self) -> str:
        return self.by

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]:
        try:
            return self._rename.apply(tree, target)
        except UnmatchedKeyError:
            heads = collections.Counter(k.split(SEP, 1)[0] for k in tree if SEP in k)
            near = close_matches(self.prefix, heads, 1)
            if not near and heads:  # Another family's prefix: the one that holds most keys.
                ((most, count),) = heads.most_common(1)
                near = [most] if count > len(tree) / 2 else []
            hint = f' Did you mean {near[0]!r}?' if near else f' Top-level names: {sorted(heads)}.'
            error = UnmatchedKeyError(f'{self.by}: no key starts with {self.prefix + SEP!r}.{hint}')
            error.suggestions = tuple(
                self.by.replace(f'drop_prefix={self.prefix!r}', f'drop_prefix={n!r}') for n in near
            )
            raise error from None
