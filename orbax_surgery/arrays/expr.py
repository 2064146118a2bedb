"""Lazy array expressions over checkpoint arrays: the values a plan computes.

Every node knows its shape and dtype without data, maps a region of itself to
the regions of the stored arrays it needs (`requests`), computes that region
(`evaluate`, async, reading through an `EvalContext`), and has an obviously
correct whole-array NumPy reference (`eager`) that tests compare against.
Building or slicing an expression never reads anything.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, Protocol

import jax
import numpy as np

from orbax_surgery.arrays import regions
from orbax_surgery.arrays.regions import Region, Shape
from orbax_surgery.keys import KeyPath, Skeleton

Kind = Literal['jax.Array', 'np.ndarray', 'scalar']
"""How a value comes back from a plain Orbax restore, named as Orbax names it."""


class EvalContext(Protocol):
    """Where evaluation gets stored data, and memoizes whole-array functions."""

    async def read(self, source: Source, region: Region) -> np.ndarray: ...

    async def whole(self, node: Expr) -> np.ndarray:
        """The whole value of a node that is not lazy (an `Apply`), computed once."""


class Expr(abc.ABC):
    """A lazily computed array."""

    shape: Shape
    dtype: np.dtype

    @property
    def children(self) -> tuple[Expr, ...]:
        return ()

    @property
    def lazy(self) -> bool:
        """True when any region can be computed from just the data it needs."""
        return all(c.lazy for c in self.children)

    @property
    def kind(self) -> Kind:
        kinds = [c.kind for c in self.children]
        kind = 'jax.Array' if 'jax.Array' in kinds or not kinds else kinds[0]
        # Scalars stacked, reshaped or combined into an array come back as a NumPy array.
        return 'np.ndarray' if kind == 'scalar' and self.shape != () else kind

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def sources(self) -> Iterator[Source]:
        """Every stored array this expression reads (with repeats)."""
        for c in self.children:
            yield from c.sources()

    def child_regions(self, region: Region) -> Iterator[tuple[Expr, Region]]:
        """The region of each child that computing `region` evaluates, in order."""
        return iter(())

    def requests(self, region: Region) -> Iterator[tuple[Source, Region]]:
        """The stored regions that computing `region` of this array reads."""
        for child, sub in self.child_regions(region):
            yield from child.requests(sub)

    @abc.abstractmethod
    async def evaluate(self, region: Region, ctx: EvalContext) -> np.ndarray:
        """Computes `region` of this array, reading only what it needs."""

    @abc.abstractmethod
    def eager(self, values: Mapping[KeyPath, Any]) -> np.ndarray:
        """Reference result from whole source arrays, for tests."""

    @abc.abstractmethod
    def describe(self) -> str:
        """A short formula, e.g. `transpose(embed/embedding, (1, 0))`."""


@dataclasses.dataclass(frozen=True)
class Source(Expr):
    """An array stored in the checkpoint under `key`."""

    key: KeyPath
    shape: Shape
    dtype: np.dtype
    chunk_shape: Shape | None = None
    stored_kind: Kind = 'jax.Array'
    byte_ranges: bool = False
    """Stored uncompressed and byte-addressable (safetensors): a region costs its bytes."""
    skeleton: Skeleton | None = dataclasses.field(default=None, compare=False, repr=False)
    """The containers of the tree it was stored in, where the source knows them."""
    key_impl: str | None = None
    """For the key data of typed PRNG keys: their implementation ('threefry2x32')."""

    @property
    def kind(self) -> Kind:
        return self.stored_kind

    def sources(self) -> Iterator[Source]:
        yield self

    def requests(self, region):
        yield self, region

    async def evaluate(self, region, ctx):
        return await ctx.read(self, region)

    def eager(self, values):
        return np.asarray(values[self.key])

    def describe(self):
        return self.key


@dataclasses.dataclass(frozen=True)
class Constant(Expr):
    """A value given in memory (a target's fallback value), not read from disk."""

    value: Any = dataclasses.field(compare=False, repr=False)
    label: str = 'target value'

    @functools.cached_property
    def shape(self) -> Shape:  # type: ignore[override]
        return tuple(np.shape(self.value))

    @functools.cached_property
    def dtype(self) -> np.dtype:  # type: ignore[override]
        return np.dtype(getattr(self.value, 'dtype', None) or np.asarray(self.value).dtype)

    @property
    def kind(self) -> Kind:
        if isinstance(self.value, jax.Array):
            return 'jax.Array'
        return 'np.ndarray' if isinstance(self.value, np.ndarray) else 'scalar'

    async def evaluate(self, region, ctx):
        return np.asarray(regions.take(np.asarray(self.value), region))

    def eager(self, values):
        return np.asarray(self.value)

    def describe(self):
        return self.label


def range_str(r: range) -> str:
    step = f':{r.step}' if r.step != 1 else ''
    return f'{r.start}:{r.stop}{step}' if r else '0:0'


def list_str(parts: Sequence[Expr], limit: int = 3) -> str:
    if len(parts) <= limit:
        return ', '.join(p.describe() for p in parts)
    return f'{parts[0].describe()}, ..., {parts[-1].describe()} ({len(parts)})'
