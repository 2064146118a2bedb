"""User value functions in a plan: what they receive, and their output known ahead.

`Elementwise` runs a function shard by shard (lazy); `Apply` runs it once on
whole inputs read on this host (not lazy, and the plan says so).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from orbax_surgery.arrays import regions
from orbax_surgery.arrays.expr import EvalContext, Expr, Kind, list_str
from orbax_surgery.arrays.regions import Shape
from orbax_surgery.errors import DtypeMismatchError, RuleError, ShapeMismatchError, SurgeryError


@dataclasses.dataclass(frozen=True)
class Elementwise(Expr):
    """`fn` applied block by block: a user's promise that it is elementwise."""

    fn: Callable[..., Any]
    parts: tuple[Expr, ...]
    dtype: np.dtype
    label: str

    @property
    def shape(self) -> Shape:  # type: ignore[override]
        return self.parts[0].shape

    @property
    def children(self):
        return self.parts

    def child_regions(self, region):
        for p in self.parts:
            yield p, region

    async def evaluate(self, region, ctx):
        blocks = await asyncio.gather(*(p.evaluate(region, ctx) for p in self.parts))
        return call(self, self.fn, blocks, regions.shape_of(region))

    def eager(self, values):
        return call(self, self.fn, [p.eager(values) for p in self.parts], self.shape)

    def describe(self):
        return f'{self.label}({list_str(self.parts)})'


@dataclasses.dataclass(frozen=True)
class Apply(Expr):
    """A whole-array Python function: reads all of its inputs on this host."""

    fn: Callable[[list[Any]], Any]
    parts: tuple[Expr, ...]
    shape: Shape
    dtype: np.dtype
    label: str

    @property
    def lazy(self) -> bool:
        return False

    @property
    def children(self):
        return self.parts

    def child_regions(self, region):
        for p in self.parts:
            yield p, regions.full(p.shape)

    async def evaluate(self, region, ctx):
        return regions.take(await ctx.whole(self), region)

    async def evaluate_whole(self, ctx: EvalContext) -> np.ndarray:
        """Reads every input whole and calls the function once."""
        blocks = await asyncio.gather(*(p.evaluate(regions.full(p.shape), ctx) for p in self.parts))
        return self.compute(list(blocks))

    def compute(self, blocks: list[np.ndarray]) -> np.ndarray:
        return call(self, lambda *xs: self.fn(list(xs)), blocks, self.shape)

    def eager(self, values):
        return self.compute([p.eager(values) for p in self.parts])

    def describe(self):
        return f'{self.label}({list_str(self.parts)})'


@dataclasses.dataclass(frozen=True)
class Received(Expr):
    """An input of a value function, handed over as a NumPy array or a placed jax.Array.

    Orbax's `RestoreArgs` of a `multi_value_fn` input say this (`restore_type`,
    `sharding`); the values are its input's, region by region.
    """

    base: Expr
    as_kind: Kind
    sharding: jax.sharding.Sharding | None = None

    @property
    def shape(self) -> Shape:  # type: ignore[override]
        return self.base.shape

    @property
    def dtype(self) -> np.dtype:  # type: ignore[override]
        return self.base.dtype

    @property
    def kind(self) -> Kind:
        return self.as_kind

    @property
    def children(self):
        return (self.base,)

    def child_regions(self, region):
        yield self.base, region

    async def evaluate(self, region, ctx):
        return await self.base.evaluate(region, ctx)

    def eager(self, values):
        return self.base.eager(values)

    def describe(self):
        return self.base.describe()


def as_input(block: np.ndarray, kind: Kind, sharding: jax.sharding.Sharding | None = None) -> Any:
    """What a value function receives: the type a plain Orbax restore returns.

    A saved `jax.Array` arrives as a `jax.Array` on this host's CPU device (the
    function runs on the host, never on an accelerator); a saved NumPy array as
    a NumPy array, keeping 64-bit dtypes; a saved scalar as a Python scalar.
    """
    if kind == 'jax.Array' and sharding is not None:
        return jax.make_array_from_callback(block.shape, sharding, lambda index: block[index])
    if kind == 'jax.Array':
        return jax.device_put(block, jax.local_devices(backend='cpu')[0])
    if kind == 'scalar' and block.ndim == 0:
        return block.item()
    return block


def call(
    node: Elementwise | Apply,
    fn: Callable[..., Any],
    blocks: Sequence[np.ndarray],
    shape: Sequence[int],
) -> np.ndarray:
    """Calls a user function on `blocks` and checks its output against the plan.

    Raises:
        RuleError: the function raised (its exception is the `__cause__`).
        ShapeMismatchError, DtypeMismatchError: it returned another shape or dtype.
    """
    inputs = [
        as_input(b, p.kind, p.sharding if isinstance(p, Received) else None)
        for b, p in zip(blocks, node.parts, strict=True)
    ]
    try:
        result = np.asarray(fn(*inputs))
    except SurgeryError as e:
        e.add_note(f'while computing {node.label} for {node.describe()!r}')
        raise
    except Exception as e:
        # Every failure of a restore is a SurgeryError; the user's exception is the cause.
        raise RuleError(
            f'{node.label} raised {type(e).__name__}: {e} (computing {node.describe()!r})'
        ) from e
    if result.shape != tuple(shape):
        raise ShapeMismatchError(
            f'{node.label} returned shape {result.shape} where {tuple(shape)} was expected '
            f'(for {node.describe()!r}).'
        )
    if result.dtype != node.dtype:
        raise DtypeMismatchError(
            f'{node.label} returned dtype {result.dtype} where {node.dtype} was expected '
            f'(for {node.describe()!r}); declare the output with `out=`.'
        )
    return result


def predict(fn: Callable[..., Any], *inputs: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    """The shape and dtype `fn(*inputs)` returns, found by tracing, reading nothing.

    64-bit inputs are traced with 64-bit types on, so a NumPy float64 leaf is
    predicted as float64, as the function will compute it.

    Raises:
        Exception: whatever tracing raised (the function is not traceable).
    """
    wide = any(np.dtype(x.dtype).itemsize == 8 for x in jax.tree.leaves(inputs))
    with jax.enable_x64(wide):
        out = jax.eval_shape(fn, *inputs)
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise TypeError(f'the function returned {type(out).__name__}, not one array')
    return jax.ShapeDtypeStruct(tuple(out.shape), np.dtype(out.dtype))
