"""Typed PRNG key arrays, restored as Orbax stores them: their key data (uint32)."""

from __future__ import annotations

from typing import Any

import jax


def is_key_array(x: Any) -> bool:
    """Whether `x` is a typed PRNG key array (or its `jax.ShapeDtypeStruct`).

    Example:
        >>> is_key_array(jax.random.key(0)), is_key_array(jax.random.PRNGKey(0))
        (True, False)
    """
    dtype = getattr(x, 'dtype', None)
    return isinstance(x, jax.ShapeDtypeStruct | jax.Array) and bool(
        jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    )


def key_impl_name(dtype: Any) -> str:
    """The name of a key dtype's implementation, which `jax.random.wrap_key_data` takes.

    Example:
        >>> key_impl_name(jax.random.key(0, impl='rbg').dtype)
        'rbg'
    """
    return dtype._impl.name  # noqa: SLF001 - JAX names it nowhere public for a dtype.
