"""What messages suggest: the keys closest to a wrong one, and regexes that cover exactly some keys.

Keys are compared by their path components, not as plain strings: a component
that few candidates share (`k_proj`) counts more than one they all share
(`params`), the leaf name counts as equal across frameworks (`kernel`, `weight`,
`scale`, `embedding`), and spelling only breaks ties. So the closest key to
`layers/k_proj/kernel` is `layers/self_attn/k_proj/weight`, not
`layers/mlp/up_proj/weight`.
"""

from __future__ import annotations

import collections
import difflib
import functools
import heapq
import math
import re
from collections.abc import Collection, Iterable, Sequence

SEP = '/'
_LEAVES = frozenset({'kernel', 'weight', 'scale', 'embedding'})
_DIGITS = re.compile(r'\d+')


def close_keys(key: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Up to `n` candidates that look like `key`, best first.

    Fast on large trees: an index of the candidates' components (kept for the
    last few candidate sets) finds those sharing a component with `key`, and
    only the best of them are scored in full.

    Example:
        >>> close_keys('layers/k_proj/kernel',
        ...            ['layers/mlp/up_proj/weight', 'layers/self_attn/k_proj/weight',
        ...             'layers/self_attn/q_proj/weight', 'norm/weight'], n=2)
        ['layers/self_attn/k_proj/weight', 'layers/self_attn/q_proj/weight']
    """
    pool = tuple(dict.fromkeys(candidates))
    if not pool or n <= 0:
        return []
    index = _index(pool)
    parts = key.split(SEP)
    weights = [index.rarity(p) for p in parts]
    bound: dict[int, float] = collections.defaultdict(float)
    for part, weight in zip(parts, weights, strict=True):
        if weight < 0.2:  # Shared by nearly every candidate: it ranks none above another.
            continue
        for comp, similarity in index.related(part):
            for i in index.postings[comp]:
                bound[i] += similarity * weight
    best = heapq.nlargest(max(4 * n, 20), bound, key=bound.__getitem__)
    scored = []
    for i in best:
        score = _score(parts, index.split[i], weights)
        if score > 0:  # Ties go to the closer spelling (by letters shared: a cheap bound).
            spelling = difflib.SequenceMatcher(None, key, pool[i]).quick_ratio()
            scored.append((round(-score, 9), -spelling, pool[i]))
    found = [c for *_, c in sorted(scored)[:n]]
    if len(found) < n:  # Nothing shared: spelling alone (`unstak` for `unstack`).
        rest = [c for c in pool if c not in found] if found else list(pool)
        found += difflib.get_close_matches(key, rest, n - len(found), 0.5)
    return found


class _Index:
    """A candidate set's components: which candidates hold each, and how rare each is."""

    def __init__(self, pool: tuple[str, ...]):
        self.split = [c.split(SEP) for c in pool]
        self.postings: dict[str, list[int]] = collections.defaultdict(list)
        for i, comps in enumerate(self.split):
            for comp in dict.fromkeys(comps):
                self.postings[comp].append(i)
        self._related: dict[str, list[tuple[str, float]]] = {}
        self._rarity: dict[str, float] = {}

    def related(self, part: str) -> list[tuple[str, float]]:
        """The candidates' components like `part`, with how alike."""
        if part not in self._related:
            found = [(c, s) for c in self.postings if (s := _similar(part, c)) > 0]
            self._related[part] = found
        return self._related[part]

    def rarity(self, part: str) -> float:
        """How much sharing `part` says: high for a component few candidates have."""
        if part not in self._rarity:
            holders: set[int] = set()
            for comp, similarity in self.related(part):
                if similarity >= 0.9:
                    holders.update(self.postings[comp])
            self._rarity[part] = math.log((len(self.split) + 1) / (len(holders) + 1)) + 0.1
        return self._rarity[part]


@functools.lru_cache(maxsize=8)
def _index(pool: tuple[str, ...]) -> _Index:
    return _Index(pool)


def _score(parts: Sequence[str], comps: Sequence[str], weights: Sequence[float]) -> float:
    """The rarity-weighted components of `parts` that `comps` has; unmatched ones cost a little."""
    score, used = 0.0, set()
    for part, weight in zip(parts, weights, strict=True):
        best, at = 0.0, None
        for i, comp in enumerate(comps):
            if i not in used and (s := _similar(part, comp)) > best:
                best, at = s, i
        if at is not None:
            used.add(at)
            score += best * weight
    extra = len(comps) - len(used)
    return score - 0.05 * extra if score > 0 else 0.0


@functools.lru_cache(maxsize=1 << 16)
def _similar(a: str, b: str) -> float:
    if a == b:
        return 1.0
    if a in _LEAVES and b in _LEAVES:
        return 0.9
    if _DIGITS.sub('#', a) == _DIGITS.sub('#', b):  # layers_3 for layers_0: same place.
        return 0.6
    matcher = difflib.SequenceMatcher(None, a, b)
    if matcher.real_quick_ratio() < 0.8 or matcher.quick_ratio() < 0.8:
        return 0.0
    ratio = matcher.ratio()
    return 0.5 * ratio if ratio >= 0.8 else 0.0


def generalized(key: str) -> str:
    """`key` as a regex whose digit runs match any number: `layers_3/w` -> `layers_\\d+/w`."""
    pieces = _DIGITS.split(key)
    return r'\d+'.join(re.escape(p) for p in pieces)


def covering_pattern(keys: Collection[str], others: Collection[str]) -> str:
    """A short regex that matches every key of `keys` and none of `others`.

    For suggested `Drop`s and per-group rules: it never covers a key it should not.

    Example:
        >>> keys = [f'model/layers/{i}/rotary_emb/inv_freq' for i in range(4)]
        >>> covering_pattern(keys, ['model/layers/0/q_proj/weight'])
        '.*/inv_freq'
        >>> covering_pattern(['opt/mu', 'opt/nu'], ['opt/count', 'w'])
        'opt/(mu|nu)'
    """
    keys = sorted(set(keys))
    if not keys:
        raise ValueError('covering_pattern needs at least one key')
    if not others:
        return '.*'

    for pattern in _candidates(keys):
        compiled = re.compile(pattern)
        if all(compiled.fullmatch(k) for k in keys) and not any(
            compiled.fullmatch(o) for o in others
        ):
            return pattern
    return '|'.join(re.escape(k) for k in keys)


def _candidates(keys: Sequence[str]) -> Iterable[str]:
    """Regexes for `keys`, most general first: whole top-level subtrees, a common ending,
    one top-level name with alternatives, the keys with any layer numbers."""
    heads = sorted({k.split(SEP, 1)[0] for k in keys})
    yield '|'.join(re.escape(h) if h in keys else f'{re.escape(h)}{SEP}.*' for h in heads)
    general = sorted({generalized(k) for k in keys})
    split = [g.split(SEP) for g in general]  # re.escape leaves '/' alone.
    depth = min(len(s) for s in split)
    for tail in range(1, depth + 1):  # The shortest common ending: '.*/inv_freq'.
        endings = {SEP.join(s[-tail:]) for s in split}
        if len(endings) == 1:
            (ending,) = endings
            yield ending if all(len(s) == tail for s in split) else f'.*{SEP}{ending}'
    firsts = {s[0] for s in split}
    if len(firsts) == 1 and len(split) <= 8:  # One top-level name: 'opt/(mu|nu)'.
        (head,) = firsts
        rests = sorted({SEP.join(s[1:]) for s in split})
        if all(rests):
            yield f'{head}{SEP}({"|".join(rests)})' if len(rests) > 1 else f'{head}{SEP}{rests[0]}'
    if len(general) <= 8:
        yield '|'.join(general)
