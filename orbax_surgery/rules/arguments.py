"""Checking a rule's arguments when it is built: dtypes, ints, axes, and value functions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from orbax_surgery.arrays import expr as ex
from orbax_surgery.arrays.value_functions import predict
from orbax_surgery.errors import RuleError
from orbax_surgery.keys import did_you_mean


def predict_or_explain(
    fn: Callable[..., Any],
    *parts: ex.Expr,
    fix: str = 'Pass out=jax.ShapeDtypeStruct(shape, dtype).',
    name: str | None = None,
) -> jax.ShapeDtypeStruct:
    """The output a function will give on `parts`, or a RuleError saying why not."""
    try:
        return predict(fn, *(jax.ShapeDtypeStruct(p.shape, p.dtype) for p in parts))
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ''
        inputs = ', '.join(signature(p) for p in parts)
        raise RuleError(
            f'cannot tell what {name or fn_name(fn)} returns for {inputs} '
            f'without running it ({type(e).__name__}: {reason}). {fix}'
        ) from e


def parse_dtype(dtype: Any, owner: str) -> np.dtype:
    """A NumPy dtype from a name or type ('bfloat16' included), or a RuleError."""
    try:
        parsed = jnp.dtype(dtype)
    except TypeError as e:
        names = ['bfloat16', 'float16', 'float32', 'float64', 'int8', 'int32', 'int64', 'bool']
        raise RuleError(
            f'{owner}: {dtype!r} is not a dtype.{did_you_mean(str(dtype), names)}'
        ) from e
    if not is_numeric(parsed):
        raise RuleError(f'{owner}: {parsed} is not a numeric dtype; arrays cannot be cast to it.')
    return np.dtype(parsed)


def parse_ints(values: Any, what: str, owner: str) -> tuple[int, ...]:
    """A sequence of ints (axes, sizes, layers), or a RuleError naming `what`.

    Example:
        >>> parse_ints([1, 0], 'axes', 'Transpose(...)')
        (1, 0)
        >>> parse_ints('ab', 'axes', 'Transpose(...)')  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        orbax_surgery.errors.RuleError: Transpose(...): axes must be a sequence of ints, not 'ab'.
    """
    if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray):
        raise RuleError(f'{owner}: {what} must be a sequence of ints, not {values!r}.')
    return tuple(parse_int(v, what, owner, plural=True) for v in values)


def parse_int(value: Any, what: str, owner: str, *, plural: bool = False) -> int:
    """An int (a NumPy integer too; not a bool or float), or a RuleError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        kind = 'ints' if plural else 'an int'
        raise RuleError(f'{owner}: {what} must be {kind}, not {value!r}.')
    return int(value)


def fn_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, '__name__', None) or type(fn).__name__


def is_numeric(dtype: np.dtype) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_))


def signature(value: ex.Expr) -> str:
    return f'{value.shape} {value.dtype}'
