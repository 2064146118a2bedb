"""Key paths: '/'-joined leaf names, as Orbax writes them, and close matches."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import jax
import regex

from orbax_surgery.errors import AmbiguousRuleError, RuleError, SurgeryError
from orbax_surgery.suggestions import close_keys

KeyPath = str
PyTree = Any

SEP = '/'


def key_name(entry: Any) -> str:
    """Returns the name Orbax gives one entry of a JAX key path."""
    if isinstance(entry, jax.tree_util.SequenceKey):
        return str(entry.idx)
    if isinstance(entry, jax.tree_util.DictKey):
        return str(entry.key)
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return entry.name
    if isinstance(entry, jax.tree_util.FlattenedIndexKey):
        return str(entry.key)
    raise TypeError(f'Unsupported pytree key entry {entry!r} of type {type(entry).__name__}.')


def flatten(
    tree: PyTree, *, is_leaf: Callable[[Any], bool] | None = None
) -> tuple[dict[KeyPath, Any], Any]:
    """Flattens `tree` into `{'a/b/c': leaf}` and its treedef.

    Example:
        >>> flat, _ = flatten({'dense': {'kernel': 1, 'bias': 2}, 'layers': [3]})
        >>> flat
        {'dense/bias': 2, 'dense/kernel': 1, 'layers/0': 3}

    Raises:
        AmbiguousRuleError: two paths join to the same string (a key holding '/').
        SurgeryError: JAX cannot flatten it, e.g. a dict with keys 1 and 'a'.
    """
    try:
        with_path, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    except (TypeError, ValueError) as e:  # Dict keys JAX cannot sort, e.g. 1 and 'a'.
        raise SurgeryError(
            f'Cannot flatten the tree: {e} Use str keys in every dict (Orbax names leaves by '
            f"their '{SEP}'-joined keys)."
        ) from e
    flat: dict[KeyPath, Any] = {}
    for path, leaf in with_path:
        key = SEP.join(key_name(entry) for entry in path)
        if key in flat:
            raise AmbiguousRuleError(
                f'Two leaves of the tree have the key path {key!r}: a dict key probably '
                f"contains '{SEP}'. Rename it; keys are joined with '{SEP}'."
            )
        flat[key] = leaf
    return flat, treedef


@dataclasses.dataclass(frozen=True, eq=False)
class Skeleton:
    """A tree's containers without its leaves, to rebuild it from some of its leaves.

    Lists stay lists, tuples tuples, and dataclasses, NamedTuples and other
    registered nodes themselves: what a value function gets as "the original
    tree", whichever of its leaves were read.

    Example:
        >>> skeleton = Skeleton.of({'x': 1, 'y': (2, 3)})
        >>> skeleton.build({'y/1': 30}, missing=lambda key: None)
        {'x': None, 'y': (None, 30)}
    """

    treedef: Any
    keys: tuple[KeyPath, ...]

    @classmethod
    def of(cls, tree: PyTree) -> Skeleton:
        flat, treedef = flatten(tree)
        return cls(treedef, tuple(flat))

    def build(self, values: Mapping[KeyPath, Any], missing: Callable[[KeyPath], Any]) -> PyTree:
        """The tree with `values` at their keys and `missing(key)` at the others."""
        leaves = [values[k] if k in values else missing(k) for k in self.keys]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def unflatten(treedef: Any, flat: Mapping[KeyPath, Any], keys: Iterable[KeyPath]) -> PyTree:
    """Rebuilds a tree from `flat`, taking leaves in the order of `keys`."""
    return jax.tree_util.tree_unflatten(treedef, [flat[k] for k in keys])


def nest(flat: Mapping[KeyPath, Any]) -> dict[str, Any]:
    """Turns `{'a/b': x}` into nested dicts `{'a': {'b': x}}`.

    Example:
        >>> nest({'a/b': 1, 'a/c': 2, 'd': 3})
        {'a': {'b': 1, 'c': 2}, 'd': 3}

    Raises:
        AmbiguousRuleError: a key is both a leaf and a prefix of another key.
    """
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, last = key.split(SEP)
        node = out
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise AmbiguousRuleError(
                    f'Key {key!r} nests under {part!r}, which is itself a leaf.'
                )
            node = child
        if last in node:
            raise AmbiguousRuleError(f'Key {key!r} is both a leaf and a subtree.')
        node[last] = value
    return out


MATCH_TIMEOUT = 1.0
"""Seconds one key may take to match one pattern; a key matches in microseconds."""


def compile_pattern(pattern: str, owner: str) -> re.Pattern[str]:
    """Compiles a key regex, naming `owner` (a rule's repr) when it is invalid."""
    if not isinstance(pattern, str):
        raise RuleError(f'{owner}: a key pattern is a str regex, not {type(pattern).__name__}.')
    try:
        return re.compile(pattern)
    except (re.error, OverflowError, RecursionError) as e:  # a{99999999999}: OverflowError.
        raise RuleError(f'{owner}: {pattern!r} is not a valid regex: {e}.') from e


class KeyPattern:
    r"""A key regex: `re` syntax and `re.fullmatch` semantics, matched with a time limit.

    Python's `re` cannot be interrupted, so a regex that backtracks
    catastrophically (`(a|aa)+$` on a long key) would hang a restore for ever.
    Keys are matched with the `regex` package instead, which is compatible with
    `re` (its default VERSION0) and takes a timeout; the pattern is still
    compiled by `re` first, so what `re` (and Orbax) rejects is rejected here.

    Example:
        >>> KeyPattern(r'layers_(\d+)/w', 'rule').fullmatch('layers_3/w')[1]
        '3'
        >>> KeyPattern(r'(a|aa)+$', 'Drop(...)').fullmatch('a' * 64 + 'b')
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        orbax_surgery.errors.RuleError: Drop(...): matching '(a|aa)+$' against 'aaaa...b' took ...
    """

    def __init__(self, pattern: str, owner: str):
        self.owner = owner
        self.compiled = compile_pattern(pattern, owner)
        try:
            self._timed = regex.compile(pattern)
        except (regex.error, OverflowError, RecursionError) as e:
            raise RuleError(f'{owner}: {pattern!r} is not a valid regex: {e}.') from e

    @property
    def pattern(self) -> str:
        return self.compiled.pattern

    @property
    def groupindex(self) -> Mapping[str, int]:
        return self.compiled.groupindex

    def fullmatch(self, key: str) -> Any:
        """The match of the whole key (a `regex.Match`, like `re.Match`), or None."""
        try:
            return self._timed.fullmatch(key, timeout=MATCH_TIMEOUT)
        except TimeoutError as e:
            shown = key if len(key) <= 40 else f'{key[:4]}...{key[-1:]}'
            raise RuleError(
                f'{self.owner}: matching {self.pattern!r} against {shown!r} took over '
                f'{MATCH_TIMEOUT} s (timed out): the regex backtracks catastrophically. Avoid '
                'nested or overlapping repeats such as (a+)+ or (a|aa)+.'
            ) from e


def check_template(pattern: re.Pattern[str], template: str, owner: str) -> None:
    r"""Checks that `template`'s backreferences (\1, \g<name>) exist in `pattern`."""
    if not isinstance(template, str):
        raise RuleError(f'{owner}: a key template is a str, not {type(template).__name__}.')
    try:
        pattern.sub(template, '')
    except (re.error, IndexError) as e:
        groups = sorted(pattern.groupindex) or f'{pattern.groups} numbered groups'
        raise RuleError(
            f'{owner}: template {template!r} refers to a group that {pattern.pattern!r} '
            f'does not have ({e}); it has {groups}.'
        ) from e


def close_matches(key: str, candidates: Collection[str], n: int = 5) -> list[str]:
    """Returns up to `n` of `candidates` that look like `key`, best first (see `suggestions`)."""
    return close_keys(key, candidates, n)


def did_you_mean(key: str, candidates: Collection[str]) -> str:
    """A ' Did you mean ...?' sentence, or '' when nothing is close."""
    near = close_matches(key, candidates)
    return f' Did you mean {_quoted(near)}?' if near else ''


def summarize(keys: Collection[str], limit: int = 5) -> str:
    """Names up to `limit` keys and counts the rest, never dumping them all.

    Example:
        >>> summarize(['a', 'b', 'c'], limit=2)
        "'a', 'b' and 1 more"
    """
    shown = sorted(keys)[:limit]
    rest = len(keys) - len(shown)
    return _quoted(shown) + (f' and {rest} more' if rest else '')


def _quoted(keys: Iterable[str]) -> str:
    return ', '.join(repr(k) for k in keys)
