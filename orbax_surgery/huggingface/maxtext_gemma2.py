"""Gemma 2's layer pairs in MaxText: layer i holds Hugging Face layers 2i (local) and 2i + 1.

MaxText 0.2.5's Gemma 2 decoder layer is a sliding-window (local) layer then a
global one, so it has half as many layers as the Hugging Face model, and every
parameter name carries the half it belongs to: `self_attention_local`,
`mlp_global`, `pre_ffw_norm_local`, ... These rules move between one key per
Hugging Face layer (`decoder/layers_{n}/self_attention/...`, MaxText's names
without the suffix) and the pairs, scanned or not. Stacking and reshaping are
lazy: no layer is read to pair it.
"""

from __future__ import annotations

import re

from orbax_surgery.huggingface.architectures import Shapes
from orbax_surgery.rules.layers import Stack, Unstack
from orbax_surgery.rules.moves import Rename
from orbax_surgery.rules.rule import Rule
from orbax_surgery.rules.values import Reshape

HALVES = (('local', '02468'), ('global', '13579'))
"""Each half of a pair, and the last digits of its Hugging Face layer numbers (even, odd)."""


def paired_names(name: str) -> tuple[str, str]:
    """A per-layer name's two MaxText names, local then global.

    Example:
        >>> paired_names('mlp/wi_0/kernel')
        ('mlp_local/wi_0/kernel', 'mlp_global/wi_0/kernel')
    """
    module, rest = name.split('/', 1)
    return f'{module}_local/{rest}', f'{module}_global/{rest}'


def pair(decoder: str, count: int, *, stacked: bool) -> list[Rule]:
    """`{decoder}/layers_{n}/...` (n a Hugging Face layer) -> MaxText's pairs.

    Hugging Face layers 0, 2, 4, ... stack into the `_local` halves and 1, 3,
    5, ... into the `_global` ones, on axis 1 (MaxText's `param_scan_axis`);
    unscanned, the stacks are sliced again into `layers_{i}`.
    """
    d = re.escape(decoder)
    rules: list[Rule] = []
    for start, (half, digits) in enumerate(HALVES):
        numbers = rf'{d}/layers_(?=\d*[{digits}]/){{i}}/([^/]+)/(.*)'
        into = rf'{decoder}/layers/\1_{half}/\2'
        rules.append(Stack(numbers, into, axis=1, layers=range(start, count, 2)))
    if not stacked:
        rules.append(Unstack(rf'{d}/layers/(.*)', rf'{decoder}/layers_{{i}}/\1', axis=1))
    return rules


def unpair(decoder: str, shapes: Shapes, count: int, *, stacked: bool) -> list[Rule]:
    """MaxText's pairs -> `{decoder}/layers_{n}/...`, one per Hugging Face layer (`count`).

    The halves of each scanned parameter `(a, L/2, ...)` stack on a new axis 2
    into `(a, L/2, 2, ...)`, which reshapes to `(a, L, ...)` with layer
    `n = 2i + half`, then unstacks. `shapes` are the unscanned per-layer shapes
    under the names without a half.
    """
    d = re.escape(decoder)
    rules: list[Rule] = []
    if not stacked:
        rules.append(Stack(rf'{d}/layers_{{i}}/(.*)', rf'{decoder}/layers/\1', axis=1))
    for k, (half, _) in enumerate(HALVES):
        rules.append(Rename(rf'{d}/layers/([^/]+)_{half}/(.*)', rf'{decoder}/halves_{k}/\1/\2'))
    rules.append(Stack(rf'{d}/halves_{{i}}/(.*)', rf'{decoder}/paired/\1', axis=2))
    for name, (first, *rest) in shapes.items():
        rules.append(Reshape(rf'{d}/paired/{re.escape(name)}', (first, count, *rest)))
    rules.append(Unstack(rf'{d}/paired/(.*)', rf'{decoder}/layers_{{i}}/\1', axis=1))
    return rules
