"""Key paths: '/'-joined leaf names, as Orbax writes them, and close matches."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import jax

from orbax_surgery.errors import AmbiguousRuleError, RuleError

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
    """
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
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


def compile_pattern(pattern: str, owner: str) -> re.Pattern[str]:
    """Compiles a key regex, naming `owner` (a rule's repr) when it is invalid."""
    try:
        return re.compile(pattern)
    except re.error as e:
        raise RuleError(f'{owner}: {pattern!r} is not a valid regex: {e}.') from e


def check_template(pattern: re.Pattern[str], template: str, owner: str) -> None:
    r"""Checks that `template`'s backreferences (\1, \g<name>) exist in `pattern`."""
    try:
        pattern.sub(template, '')
    except (re.error, IndexError) as e:
        groups = sorted(pattern.groupindex) or f'{pattern.groups} numbered groups'
        raise RuleError(
            f'{owner}: template {template!r} refers to a group that {pattern.pattern!r} '
            f'does not have ({e}); it has {groups}.'
        ) from e


def close_matches(key: str, candidates: Collection[str], n: int = 5) -> list[str]:
    """Returns up to `n` of `candidates` that look like `key`, best first."""
    return difflib.get_close_matches(key, list(candidates), n=n, cutoff=0.5)


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


def common_pattern(keys: Collection[str]) -> str:
    """A regex covering `keys` by their top-level names, for suggested fixes.

    Example:
        >>> common_pattern(['opt_state/mu/w', 'opt_state/nu/w', 'step'])
        'opt_state/.*|step'
    """
    heads = sorted({k.split(SEP, 1)[0] for k in keys})
    parts = [re.escape(h) if h in keys else f'{re.escape(h)}{SEP}.*' for h in heads]
    return '|'.join(parts)


def _quoted(keys: Iterable[str]) -> str:
    return ', '.join(repr(k) for k in keys)
