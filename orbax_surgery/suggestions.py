"""What messages suggest: the keys closest to a wrong one, and regexes that cover exactly some keys.

Keys are compared by their path components, not as plain strings: a component
that few candidates share (`k_proj`) counts more than one they all share
(`params`), the leaf name counts as equal across frameworks (`kernel`, `weight`,
`scale`, `embedding`), and spelling only breaks ties. So the closest key to
`layers/k_proj/kernel` is `layers/self_attn/k_proj/weight`, not
`layers/mlp/up_proj/weight`.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Collection, Iterable, Sequence

SEP = '/'
_LEAVES = frozenset({'kernel', 'weight', 'scale', 'embedding'})
_DIGITS = re.compile(r'\d+')


def close_keys(key: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Up to `n` candidates that look like `key`, best first.

    Example:
        >>> close_keys('layers/k_proj/kernel',
        ...            ['layers/mlp/up_proj/weight', 'layers/self_attn/k_proj/weight',
        ...             'layers/self_attn/q_proj/weight', 'norm/weight'], n=2)
        ['layers/self_attn/k_proj/weight', 'layers/self_attn/q_proj/weight']
    """
    pool = list(dict.fromkeys(candidates))
    if not pool or n <= 0:
        return []
    parts = key.split(SEP)
    split = [c.split(SEP) for c in pool]
    weights = [_rarity(p, split) for p in parts]
    scored = []
    for candidate, comps in zip(pool, split, strict=True):
        score = _score(parts, comps, weights)
        spelling = difflib.SequenceMatcher(None, key, candidate).ratio()
        if score > 0 or spelling >= 0.5:
            scored.append((-score, -spelling, candidate))
    scored.sort()
    return [c for *_, c in scored[:n]]


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


def _similar(a: str, b: str) -> float:
    if a == b:
        return 1.0
    if a in _LEAVES and b in _LEAVES:
        return 0.9
    if _DIGITS.sub('#', a) == _DIGITS.sub('#', b):  # layers_3 for layers_0: same place.
        return 0.6
    ratio = difflib.SequenceMatcher(None, a, b).ratio()
    return 0.5 * ratio if ratio >= 0.8 else 0.0


def _rarity(part: str, candidates: Sequence[Sequence[str]]) -> float:
    """How much sharing `part` says: high for a component few candidates have."""
    shared = sum(any(_similar(part, c) >= 0.9 for c in comps) for comps in candidates)
    return math.log((len(candidates) + 1) / (shared + 1)) + 0.1


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
