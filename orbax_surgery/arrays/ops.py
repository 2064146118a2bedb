"""Array operations as lazy expressions: index, transpose, reshape, cast, stack, concat.

Each maps a region of its result to the region of each input it needs, so
computing a shard reads only that shard's share of the inputs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from orbax_surgery.arrays import regions
from orbax_surgery.arrays.expr import Expr, list_str, range_str
from orbax_surgery.arrays.regions import Region, Shape
from orbax_surgery.errors import ShapeMismatchError


@dataclasses.dataclass(frozen=True)
class _OneInput(Expr):
    """Base for ops on one array, where a region maps to one region of the input."""

    base: Expr

    @property
    def dtype(self) -> np.dtype:  # type: ignore[override]
        return self.base.dtype

    @property
    def children(self):
        return (self.base,)

    def _input_region(self, region: Region) -> Region:
        return region

    def child_regions(self, region):
        yield self.base, self._input_region(region)


@dataclasses.dataclass(frozen=True)
class Index(_OneInput):
    """Basic indexing: per axis an int (the axis goes) or a range of indices."""

    index: tuple[int | range, ...]

    @staticmethod
    def of(base: Expr, index: Any) -> Index:
        """Builds `base[index]` from a NumPy basic index (ints, slices, `...`)."""
        index = index if isinstance(index, tuple) else (index,)
        if any(i is Ellipsis for i in index):
            at = index.index(Ellipsis)
            fill = (slice(None),) * (len(base.shape) - len(index) + 1)
            index = index[:at] + fill + index[at + 1 :]
        if len(index) > len(base.shape):
            raise ShapeMismatchError(
                f'Index {index!r} has {len(index)} entries but {base.describe()!r} has shape '
                f'{base.shape}.'
            )
        index = index + (slice(None),) * (len(base.shape) - len(index))
        norm: list[int | range] = []
        for axis, (i, n) in enumerate(zip(index, base.shape, strict=True)):
            if isinstance(i, slice):
                try:
                    norm.append(range(n)[i])
                except (TypeError, ValueError) as e:  # A zero step, or a float bound.
                    raise ShapeMismatchError(
                        f'Index entry {i!r} for axis {axis} of {base.describe()!r} is not a '
                        f'valid slice: {e}.'
                    ) from e
            elif not isinstance(i, int | np.integer) or isinstance(i, bool):
                raise ShapeMismatchError(
                    f'Index entry {i!r} is not an int or a slice; only basic indexing is lazy '
                    f'(indexing {base.describe()!r}).'
                )
            elif -n <= i < n:
                norm.append(int(i) % n)
            else:
                raise ShapeMismatchError(
                    f'Index {i!r} is out of range for axis {axis} of size {n} of '
                    f'{base.describe()!r} (shape {base.shape}).'
                )
        return Index(base, tuple(norm))

    @functools.cached_property
    def shape(self) -> Shape:  # type: ignore[override]
        return tuple(len(i) for i in self.index if isinstance(i, range))

    def _input_region(self, region: Region) -> Region:
        out = iter(region)
        return tuple(
            range(i, i + 1) if isinstance(i, int) else regions.compose(i, next(out))
            for i in self.index
        )

    async def evaluate(self, region, ctx):
        block = await self.base.evaluate(self._input_region(region), ctx)
        return block.reshape(regions.shape_of(region))

    def eager(self, values):
        sel = tuple(i if isinstance(i, int) else regions.to_slice(i) for i in self.index)
        return self.base.eager(values)[sel]

    def describe(self):
        parts = [str(i) if isinstance(i, int) else range_str(i) for i in self.index]
        return f'{self.base.describe()}[{", ".join(parts)}]'


@dataclasses.dataclass(frozen=True)
class Transpose(_OneInput):
    """Permutes axes: output axis k is input axis `axes[k]`."""

    axes: tuple[int, ...]

    def __post_init__(self):
        if sorted(self.axes) != list(range(len(self.base.shape))):
            raise ShapeMismatchError(
                f'axes {self.axes} are not a permutation of the axes of {self.base.describe()!r} '
                f'(shape {self.base.shape}).'
            )

    @functools.cached_property
    def shape(self) -> Shape:  # type: ignore[override]
        return tuple(self.base.shape[a] for a in self.axes)

    def _input_region(self, region: Region) -> Region:
        inverse = np.argsort(self.axes)
        return tuple(region[k] for k in inverse)

    async def evaluate(self, region, ctx):
        return (await self.base.evaluate(self._input_region(region), ctx)).transpose(self.axes)

    def eager(self, values):
        return np.transpose(self.base.eager(values), self.axes)

    def describe(self):
        return f'transpose({self.base.describe()}, {self.axes})'


@dataclasses.dataclass(frozen=True)
class Reshape(_OneInput):
    """Reshapes in C order, reading only the elements a region needs."""

    shape: Shape

    def __post_init__(self):
        if math.prod(self.shape) != math.prod(self.base.shape):
            raise ShapeMismatchError(
                f'cannot reshape {self.base.describe()!r} of shape {self.base.shape} into '
                f'{self.shape}: the sizes multiply to different numbers.'
            )

    @functools.cached_property
    def _map(self) -> regions.ReshapeMap:
        return regions.ReshapeMap(self.base.shape, self.shape)

    def _input_region(self, region: Region) -> Region:
        return self._map.input_region(region)[0]

    async def evaluate(self, region, ctx):
        in_region, gathers = self._map.input_region(region)
        block = await self.base.evaluate(in_region, ctx)
        return self._map.finish(block, region, gathers)

    def eager(self, values):
        return np.reshape(self.base.eager(values), self.shape)

    def describe(self):
        return f'reshape({self.base.describe()}, {self.shape})'


@dataclasses.dataclass(frozen=True)
class Cast(_OneInput):
    """Converts to dtype `to` as NumPy's `astype` does (round to nearest even)."""

    to: np.dtype

    @property
    def dtype(self) -> np.dtype:  # type: ignore[override]
        return self.to

    @property
    def shape(self) -> Shape:  # type: ignore[override]
        return self.base.shape

    async def evaluate(self, region, ctx):
        return (await self.base.evaluate(region, ctx)).astype(self.dtype)

    def eager(self, values):
        return self.base.eager(values).astype(self.dtype)

    def describe(self):
        return f'cast({self.base.describe()}, {self.dtype.name})'


@dataclasses.dataclass(frozen=True)
class Stack(Expr):
    """Stacks equally shaped arrays along a new axis."""

    parts: tuple[Expr, ...]
    axis: int

    def __post_init__(self):
        _check_parts(self.parts, 'stack', lambda s: s)
        if not 0 <= self.axis <= len(self.parts[0].shape):
            raise ShapeMismatchError(
                f'stack axis {self.axis} is out of range for {_sigs(self.parts[:1])}.'
            )

    @functools.cached_property
    def shape(self) -> Shape:  # type: ignore[override]
        inner = self.parts[0].shape
        return inner[: self.axis] + (len(self.parts),) + inner[self.axis :]

    @property
    def dtype(self) -> np.dtype:  # type: ignore[override]
        return self.parts[0].dtype

    @property
    def children(self):
        return self.parts

    def _split(self, region: Region) -> tuple[range, Region]:
        return region[self.axis], region[: self.axis] + region[self.axis + 1 :]

    def child_regions(self, region):
        which, rest = self._split(region)
        for k in which:
            yield self.parts[k], rest

    async def evaluate(self, region, ctx):
        which, rest = self._split(region)
        if not which:
            return np.empty(regions.shape_of(region), self.dtype)
        blocks = await asyncio.gather(*(self.parts[k].evaluate(rest, ctx) for k in which))
        return np.stack(blocks, axis=self.axis)

    def eager(self, values):
        return np.stack([p.eager(values) for p in self.parts], axis=self.axis)

    def describe(self):
        return f'stack({list_str(self.parts)}, axis={self.axis})'


@dataclasses.dataclass(frozen=True)
class Concat(Expr):
    """Concatenates arrays along an existing axis."""

    parts: tuple[Expr, ...]
    axis: int

    def __post_init__(self):
        if self.parts and not 0 <= self.axis < len(self.parts[0].shape):
            raise ShapeMismatchError(
                f'concat axis {self.axis} is out of range for {_sigs(self.parts[:1])}.'
            )
        _check_parts(self.parts, 'concatenate', lambda s: s[: self.axis] + s[self.axis + 1 :])

    @functools.cached_property
    def shape(self) -> Shape:  # type: ignore[override]
        inner = self.parts[0].shape
        total = sum(p.shape[self.axis] for p in self.parts)
        return inner[: self.axis] + (total,) + inner[self.axis + 1 :]

    @property
    def dtype(self) -> np.dtype:  # type: ignore[override]
        return self.parts[0].dtype

    @property
    def children(self):
        return self.parts

    def _pieces(self, region: Region) -> Iterator[tuple[Expr, Region]]:
        sizes = [p.shape[self.axis] for p in self.parts]
        for piece, _, sub in regions.pieces(region[self.axis], sizes):
            yield self.parts[piece], region[: self.axis] + (sub,) + region[self.axis + 1 :]

    def child_regions(self, region):
        return self._pieces(region)

    async def evaluate(self, region, ctx):
        jobs = [part.evaluate(sub, ctx) for part, sub in self._pieces(region)]
        if not jobs:
            return np.empty(regions.shape_of(region), self.dtype)
        return np.concatenate(await asyncio.gather(*jobs), axis=self.axis)

    def eager(self, values):
        return np.concatenate([p.eager(values) for p in self.parts], axis=self.axis)

    def describe(self):
        return f'concat({list_str(self.parts)}, axis={self.axis})'


def _check_parts(parts: Sequence[Expr], verb: str, key: Callable[[Shape], Shape]) -> None:
    """Parts to stack or concatenate must agree in dtype and (most of) shape."""
    if not parts:
        raise ShapeMismatchError(f'nothing to {verb}.')
    first = parts[0]
    for p in parts[1:]:
        if key(p.shape) != key(first.shape) or p.dtype != first.dtype:
            raise ShapeMismatchError(
                f'cannot {verb} {first.describe()!r} ({first.shape} {first.dtype}) with '
                f'{p.describe()!r} ({p.shape} {p.dtype}).'
            )


def _sigs(parts: Sequence[Expr]) -> str:
    return ', '.join(f'{p.describe()!r} {p.shape}' for p in parts)
