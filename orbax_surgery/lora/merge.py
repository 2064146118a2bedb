"""Merging adapters lazily: each shard of `W + scale * A @ B` from its own rows.

For a target shard of `W` covering input rows `i` and output columns `j` (and
layers `l` of a stacked weight), `LowRankUpdate` reads only `W[l, i, j]`,
`A[l, i, :]` and `B[l, :, j]`. Every shard is computed where it lives, and the
merged weight never exists whole on a host.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools

import numpy as np

from orbax_surgery.arrays import expr as ex
from orbax_surgery.arrays.regions import Region, Shape
from orbax_surgery.errors import DtypeMismatchError, LoraMismatchError, UnmatchedKeyError
from orbax_surgery.keys import KeyPath, did_you_mean
from orbax_surgery.lora.adapter import Adapter, canonical, low_rank_delta
from orbax_surgery.lora.layout import LoraLayout
from orbax_surgery.rules.rule import Entry, Target, Tree


@dataclasses.dataclass(frozen=True)
class LowRankUpdate(ex.Expr):
    """`base + sign * scale * A @ B`, computed region by region in float32 or wider.

    The plan's expression for a merged weight; `MergeAdapters` makes it.

    Example:
        >>> import numpy as np
        >>> from orbax_surgery import LoraSpec, TreeSource, resolve
        >>> joined = {'w': np.ones((4, 6), np.float32), 'w_lora_a': np.ones((4, 2), np.float32),
        ...           'w_lora_b': np.ones((2, 6), np.float32)}
        >>> lora = LoraSpec(['w'], rank=2, alpha=4).bind(joined)
        >>> update = resolve(TreeSource(joined).arrays, None, [MergeAdapters(lora)]).steps[0].expr
        >>> type(update).__name__, update.describe()
        ('LowRankUpdate', 'w + 2 * w_lora_a @ w_lora_b')
        >>> for child, region in update.child_regions((range(0, 2), range(3, 6))):
        ...     print(child.describe(), region)  # What the shard W[0:2, 3:6] reads.
        w (range(0, 2), range(3, 6))
        w_lora_a (range(0, 2), range(0, 2))
        w_lora_b (range(0, 2), range(3, 6))
    """

    base: ex.Expr
    a: ex.Expr
    b: ex.Expr
    adapter: Adapter
    sign: int = 1

    def __post_init__(self):
        for part in (self.base, self.a, self.b):  # int A or B: no common dtype with bfloat16.
            if not np.issubdtype(part.dtype, np.floating) and part.dtype.name != 'bfloat16':
                raise DtypeMismatchError(
                    f'Cannot merge an adapter into {self.base.describe()!r}: '
                    f'{part.describe()!r} has dtype {part.dtype}, not a float.'
                )

    @property
    def shape(self) -> Shape:  # type: ignore[override]
        return self.base.shape

    @property
    def dtype(self) -> np.dtype:  # type: ignore[override]
        return self.base.dtype

    @property
    def children(self):
        return (self.base, self.a, self.b)

    @functools.cached_property
    def _split(self) -> tuple[int, int]:
        return self.adapter.batch_axes, self.adapter.batch_axes + self.adapter.in_axes

    def child_regions(self, region: Region):
        nb, ni = self._split
        rank = range(self.adapter.rank)
        yield self.base, region
        yield self.a, region[:ni] + (rank,)
        yield self.b, region[:nb] + (rank,) + region[ni:]

    async def evaluate(self, region, ctx):
        blocks = await asyncio.gather(*(c.evaluate(r, ctx) for c, r in self.child_regions(region)))
        return self._combine(*blocks)

    def eager(self, values):
        return self._combine(self.base.eager(values), self.a.eager(values), self.b.eager(values))

    def _combine(self, w: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        acc = np.result_type(w.dtype, a.dtype, b.dtype, np.float32)
        if acc.name == 'bfloat16':
            acc = np.dtype(np.float32)
        scaled_b = b.astype(acc) * (self.sign * self.adapter.scale)  # B is the small one.
        adapter = self.adapter
        out = low_rank_delta(
            a.astype(acc, copy=False), scaled_b, adapter.batch_axes, adapter.in_axes
        )
        out += w  # In place, in the wider dtype: one pass over the block.
        return out.astype(self.dtype, copy=False)

    def describe(self):
        op = '+' if self.sign > 0 else '-'
        return (
            f'{self.base.describe()} {op} {self.adapter.scale:g} * '
            f'{self.a.describe()} @ {self.b.describe()}'
        )


@dataclasses.dataclass(frozen=True)
class MergeAdapters:
    """Rule: each adapted weight becomes `W ± scale * A @ B`; A and B are consumed.

    Keys are matched as the layout names them, with or without the '/value'
    that `nnx.State` leaves carry. `sign=-1` unmerges (subtracts). Use it in
    `SurgeryRestore(rules=...)` for a checkpoint holding base and adapters.

    Example:
        >>> import numpy as np
        >>> from orbax_surgery import LoraSpec, apply_rules
        >>> joined = {'w': np.ones((2, 3), np.float32), 'w_lora_a': np.ones((2, 1), np.float32),
        ...           'w_lora_b': np.ones((1, 3), np.float32)}
        >>> lora = LoraSpec(['w'], rank=1, alpha=4).bind(joined)
        >>> w = apply_rules(joined, None, [MergeAdapters(lora)])['w']  # 1 + 4 * 1 * 1
        >>> w.dtype.name, w.tolist()
        ('float32', [[5.0, 5.0, 5.0], [5.0, 5.0, 5.0]])
    """

    layout: LoraLayout
    sign: int = 1

    def __repr__(self):
        verb = 'MergeAdapters' if self.sign > 0 else 'UnmergeAdapters'
        return f'{verb}({len(self.layout.adapters)} adapters)'

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]:
        actual = {canonical(k): k for k in tree}
        out = dict(tree)
        for adapter in self.layout.adapters:
            w, a, b = (
                self._find(actual, k, self.layout.trainable_keys)
                for k in (adapter.key, adapter.a_key, adapter.b_key)
            )
            found = [(tree[k].expr.shape, tree[k].expr.dtype) for k in (a, b)]
            adapter.checked_against(found, 'the adapter checkpoint')
            base = tree[w].expr
            if base.shape != adapter.shape:
                raise LoraMismatchError(
                    f'Base weight {w!r} has shape {base.shape}, but its adapters were trained '
                    f'on shape {adapter.shape}. Is this the base they were made for?'
                )
            update = LowRankUpdate(base, tree[a].expr, tree[b].expr, adapter, self.sign)
            out[w] = tree[w].then(self, update)
            del out[a], out[b]
        return out

    @staticmethod
    def _find(
        actual: dict[KeyPath, KeyPath], key: KeyPath, adapters: frozenset[KeyPath]
    ) -> KeyPath:
        if key not in actual:
            weights = [k for k in actual if k not in adapters]
            raise UnmatchedKeyError(
                f'Merging LoRA adapters needs {key!r}, which is not among the {len(actual)} keys '
                f'of the base and adapter checkpoints.{did_you_mean(key, weights)}'
            )
        return actual[key]
