"""What a wrong shape likely means, from the sizes around it, and the rule that fixes it.

A size that differs on one axis is named by its role in its own tree: the
layer count (the layer numbers in the keys), the vocabulary (the largest axis
of the embedding and head), the hidden size (the norms' size), the MLP width
or the attention width. So a `(512,)` norm scale against `(64,)` reads as two
hidden sizes, not as a layer count.
"""

from __future__ import annotations

import collections
import itertools
import math
import re
from collections.abc import Mapping, Sequence

Shapes = Mapping[str, tuple[int, ...]]

_LAYER = re.compile(r'(?:^|/)(?:layers?|blocks?|h|layer)[_/.](\d+)(?=/|$)')
_STACKED = re.compile(r'(?:^|/)(?:layers?|blocks?|scan)(?=/)')
_VOCAB = re.compile(r'embed|wte|lm_head|vocab|token|logits|embed_out')
_NORM = re.compile(r'norm|ln_|(?:^|/)ln|layernorm')
_MLP = re.compile(r'mlp|ffn|feed_forward|fc|up_proj|gate_proj|down_proj|wi|wo|intermediate')
_ATTENTION = re.compile(r'q_proj|k_proj|v_proj|o_proj|query|key|value|attn|attention')


def sizes_by_role(shapes: Shapes) -> dict[int, list[str]]:
    """The roles each size plays in a tree of shapes, likeliest first: {64: ['hidden size',
    'attention width'], ...}."""
    roles: dict[int, list[str]] = collections.defaultdict(list)
    numbers = {int(m.group(1)) for k in shapes for m in _LAYER.finditer(k)}
    if numbers:
        roles[max(numbers) + 1].append('layer count')
    else:
        leading = collections.Counter(s[0] for k, s in shapes.items() if _STACKED.search(k) and s)
        if leading:
            roles[leading.most_common(1)[0][0]].append('layer count')
    vocab = [max(s) for k, s in shapes.items() if _VOCAB.search(k) and len(s) >= 2]
    if vocab:
        roles[collections.Counter(vocab).most_common(1)[0][0]].append('vocabulary size')
    norms = collections.Counter(s[-1] for k, s in shapes.items() if _NORM.search(k) and s)
    every = collections.Counter(d for s in shapes.values() for d in s)
    common = (norms or every).most_common(1)
    hidden = common[0][0] if common and (norms or common[0][1] >= 3) else None
    if hidden is not None:
        roles[hidden].append('hidden size')
    for pattern, role in ((_MLP, 'MLP width'), (_ATTENTION, 'attention width')):
        for size in sorted({d for k, s in shapes.items() if pattern.search(k) for d in s}):
            if size != hidden or role == 'attention width':
                roles[size].append(role)
    return dict(roles)


def shape_hint(
    key: str,
    want: tuple[int, ...],
    got: tuple[int, ...],
    target_roles: Mapping[int, list[str]],
    source_roles: Mapping[int, list[str]],
) -> tuple[str, tuple[str, ...], str]:
    """A sentence on what differs, the fixes (best first), and a kind to group errors by.

    `target_roles` and `source_roles` are `sizes_by_role` of either tree.
    """
    pattern = re.escape(key)
    if len(want) > 1 and sorted(want) == sorted(got):
        perm = _permutation(got, want)
        return (
            ' The same sizes in another order: a forgotten transpose?',
            (f'Transpose({pattern!r}, {perm})',),
            f'transpose {perm}',
        )
    if math.prod(want) == math.prod(got):
        return (
            ' The same number of elements: a reshape (split or merged heads)?',
            (f'Reshape({pattern!r}, {want})',),
            f'reshape {len(got)}->{len(want)}',
        )
    differ = (
        [i for i, (a, b) in enumerate(zip(want, got, strict=True)) if a != b]
        if len(want) == len(got)
        else []
    )
    if not differ or len({(want[i], got[i]) for i in differ}) != 1:
        return '', (), 'other'
    axis = differ[0]  # One size differs, on one axis or several (a square kernel).
    w, g = want[axis], got[axis]
    mine, theirs = list(target_roles.get(w, [])), list(source_roles.get(g, []))
    role = next((r for r in mine if r in theirs), None)
    if role is None and not (mine and theirs) and (mine or theirs):
        role = (mine or theirs)[0]
    if role is None:
        named = [f"{w} is the target's {mine[0]}"] if mine else []
        named += [f"{g} the checkpoint's {theirs[0]}"] if theirs else []
        text = f' Axis {axis}: {", ".join(named)}.' if named else ''
        return text, (), f'axis {axis} {w}!={g}'
    where = f'Axis {axis} is' if len(differ) == 1 else f'Axes {", ".join(map(str, differ))} are'
    text = f' {where} the {role}: {w} in the target, {g} in the checkpoint'
    kind = f'{role} {w}!={g}'
    if role == 'layer count':
        text += '.'
        fixes = [f"a target with {g} layers (the checkpoint's count)"]
        if g > w:
            fixes.append(f'layers=range({w}) on the Stack/Unstack, to take {w} of the {g} layers')
        return text, tuple(fixes), kind
    if role == 'vocabulary size' and g > w:
        rows = ', '.join([':'] * axis + [f':{w}'])
        return (
            text + f': a padded vocabulary? Slice off the {g - w} extra rows.',
            (f'Slice({pattern!r}, np.s_[{rows}])',),
            kind,
        )
    return (
        text + ": a model of another size? Build the target from the checkpoint's config.",
        (f"a target with the checkpoint's {role} ({g}, not {w})",),
        kind,
    )


def _permutation(got: Sequence[int], want: Sequence[int]) -> tuple[int, ...]:
    """The axes order taking `got` to `want`, moving as few axes as it can."""
    best = None
    for perm in itertools.permutations(range(len(got))):
        if all(got[p] == w for p, w in zip(perm, want, strict=True)):
            moved = sum(p != i for i, p in enumerate(perm))
            if best is None or moved < best[0]:
                best = (moved, perm)
    assert best is not None
    return best[1]
