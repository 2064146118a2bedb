"""Repeated layers folded for `inspect`: `layers_{0..31}/...` once, not 32 times.

A numbered key segment (`layers_0`, or `0` as in `model/layers/0/...` of
safetensors names) whose sub-trees hold the same keys, shapes and dtypes at
several numbers is printed once with those numbers as ranges; a layer that
differs stays apart, so `{0..3,5..31}` shows a gap. Text output only: JSON
keeps every array.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from orbax_surgery.keys import SEP

# A segment that numbers layers: `12`, or a name then `_12`; no leading zeros, which
# would not survive the round trip through an int.
_NUMBERED = re.compile(r'(?P<stem>(?:.*_)?)(?P<index>0|[1-9]\d*)')
_SAME = ('shape', 'dtype', 'chunk_shape', 'count')


def fold_layers(arrays: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """`inspect`'s arrays with alike numbered sub-trees merged into one entry each.

    Each entry keeps one array's shape, dtype and bytes; `count` says how many
    arrays it stands for.

    Example:
        >>> arrays = [
        ...     {'key': f'layers_{i}/w', 'shape': [4, 4 if i != 4 else 8], 'dtype': 'f32'}
        ...     for i in range(8)
        ... ]
        >>> [(a['key'], a['count']) for a in fold_layers(arrays)]
        [('layers_{0..3,5..7}/w', 7), ('layers_4/w', 1)]
    """
    plain: list[dict[str, Any]] = []
    groups: dict[tuple[str, str], dict[int, list[dict[str, Any]]]] = {}
    for a in arrays:
        parts = a['key'].split(SEP)
        at = next((i for i, part in enumerate(parts) if _NUMBERED.fullmatch(part)), None)
        if at is None:
            plain.append({'count': 1, **a})
            continue
        match = _NUMBERED.fullmatch(parts[at])
        assert match is not None, parts[at]
        group = groups.setdefault((SEP.join(parts[:at]), match['stem']), {})
        rest = {'count': 1, **a, 'key': SEP.join(parts[at + 1 :])}
        group.setdefault(int(match['index']), []).append(rest)
    out = plain
    for (head, stem), layers in groups.items():
        alike: dict[tuple[Any, ...], list[int]] = {}
        for index in sorted(layers):
            alike.setdefault(_signature(layers[index]), []).append(index)
        for indices in alike.values():
            label = stem + (str(indices[0]) if len(indices) == 1 else f'{{{_ranges(indices)}}}')
            for inner in fold_layers(layers[indices[0]]):
                key = SEP.join(p for p in (head, label, inner['key']) if p)
                out.append({**inner, 'key': key, 'count': inner['count'] * len(indices)})
    return out


def _signature(arrays: Sequence[Mapping[str, Any]]) -> tuple[Any, ...]:
    """What must match for two layers to fold: each array's key, shape and dtype."""
    rows = [(a['key'], *(repr(a.get(field)) for field in _SAME)) for a in arrays]
    return tuple(sorted(rows))


def _ranges(indices: Sequence[int]) -> str:
    """`0..3,5..31` for sorted numbers.

    Example:
        >>> _ranges([0, 1, 2, 3, 5, 7, 8])
        '0..3,5,7..8'
    """
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ','.join(str(r[0]) if len(r) == 1 else f'{r[0]}..{r[-1]}' for r in runs)
