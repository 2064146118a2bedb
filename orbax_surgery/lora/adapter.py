"""One adapted weight: its A and B keys, axes, rank and scale, and the update A @ B."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from orbax_surgery.arrays.regions import Shape
from orbax_surgery.errors import LoraMismatchError, UnmatchedKeyError
from orbax_surgery.keys import SEP, KeyPath, PyTree, flatten

NAMINGS: dict[str, tuple[str, str]] = {
    'sibling': ('{module}/{name}_lora_a', '{module}/{name}_lora_b'),
    'nnx': ('{module}/lora/lora_a', '{module}/lora/lora_b'),
}
Naming = str | tuple[str, str]
_NNX_VALUE = SEP + 'value'


def canonical(key: KeyPath) -> KeyPath:
    """A key without the trailing '/value' that `nnx.State` leaves carry."""
    return key.removesuffix(_NNX_VALUE)


def canonical_shapes(tree: PyTree) -> dict[KeyPath, tuple[Shape, np.dtype]]:
    """`{key: (shape, dtype)}` of a tree's numeric leaves, keys made canonical."""
    out = {}
    for key, leaf in flatten(tree)[0].items():
        dtype = getattr(leaf, 'dtype', None)
        if leaf is None or dtype is None or jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            continue
        out[canonical(key)] = (tuple(np.shape(leaf)), np.dtype(dtype))
    return out


def adapter_keys(key: KeyPath, templates: tuple[str, str]) -> tuple[KeyPath, KeyPath]:
    """The A and B keys of the weight at `key`, from templates.

    `{module}` is the key without its last part, `{name}` that part, and
    `{parent}` the module without its last part (`nnx.LoRA(base_module=...)`
    keeps its adapters beside `base_module`).
    """
    module, _, name = key.rpartition(SEP)
    parent = module.rpartition(SEP)[0]
    filled = [t.format(module=module, name=name, parent=parent) for t in templates]
    return tuple(SEP.join(p for p in k.split(SEP) if p) for k in filled)  # type: ignore[return-value]


def low_rank_delta(a: Any, b: Any, batch_axes: int, in_axes: int) -> Any:
    """`A @ B` per batch entry, shaped `batch + in + out` (NumPy or jax.numpy).

    NumPy blocks go through one batched BLAS matmul; JAX arrays through an
    einsum, which keeps explicit shardings (A's input axes, B's output axes).
    """
    if not isinstance(a, np.ndarray):
        letters = [chr(ord('a') + i) for i in range(a.ndim + b.ndim)]
        batch, ins = letters[:batch_axes], letters[batch_axes : batch_axes + in_axes]
        outs = letters[batch_axes + in_axes : batch_axes + in_axes + b.ndim - batch_axes - 1]
        rank = 'z'
        spec = f'{"".join(batch + ins)}{rank},{"".join(batch)}{rank}{"".join(outs)}'
        return jnp.einsum(f'{spec}->{"".join(batch + ins + outs)}', a, b)
    batch = a.shape[:batch_axes]
    ins = a.shape[batch_axes:-1]
    outs = b.shape[batch_axes + 1 :]
    rank = a.shape[-1]
    a3 = a.reshape((math.prod(batch), math.prod(ins), rank))
    b3 = b.reshape((math.prod(batch), rank, math.prod(outs)))
    return (a3 @ b3).reshape(batch + ins + outs)


@dataclasses.dataclass(frozen=True)
class Adapter:
    """One adapted weight: `W' = W + scale * A @ B` over its `batch + in + out` axes.

    Attributes:
        key: The weight's key.
        a_key: Key of `A`, shape `batch + in + (rank,)`.
        b_key: Key of `B`, shape `batch + (rank,) + out`.
        shape: The weight's shape.
        rank: Adapter rank.
        alpha: LoRA alpha.
        rslora: Whether the scale is `alpha / sqrt(rank)` (else `alpha / rank`).
        batch_axes: Leading stacked-layer axes, each layer with its own adapter.
        in_axes: Input axes after the batch axes; the rest are outputs.
        dtype: The adapters' dtype.

    Example:
        >>> import numpy as np
        >>> from orbax_surgery import LoraSpec
        >>> adapter = LoraSpec(['w'], rank=2, alpha=8).bind({'w': np.zeros((4, 6))}).adapters[0]
        >>> adapter.a_key, adapter.a_shape, adapter.b_shape, adapter.scale
        ('w_lora_a', (4, 2), (2, 6), 4.0)
    """

    key: KeyPath
    a_key: KeyPath
    b_key: KeyPath
    shape: Shape
    rank: int
    alpha: float
    rslora: bool = False
    batch_axes: int = 0
    in_axes: int = 1
    dtype: str = 'float32'

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def a_shape(self) -> Shape:
        return self.shape[: self.batch_axes + self.in_axes] + (self.rank,)

    @property
    def b_shape(self) -> Shape:
        return (
            self.shape[: self.batch_axes]
            + (self.rank,)
            + self.shape[self.batch_axes + self.in_axes :]
        )

    def checked_against(self, found: Sequence[Any], where: str) -> Adapter:
        """This adapter, its dtype taken from `found` `(shape, dtype)` pairs of A and B.

        Raises:
            UnmatchedKeyError: neither A nor B is there.
            LoraMismatchError: one of A and B is missing, or a shape does not fit.
        """
        names = (self.a_key, self.b_key)
        if not any(found):
            raise UnmatchedKeyError(
                f'{where} has no adapters for {self.key!r}: neither {self.a_key!r} nor '
                f'{self.b_key!r}.'
            )
        if not all(found):
            have, missing = names if found[1] is None else names[::-1]
            raise LoraMismatchError(
                f'{where} has {have!r} but not {missing!r}, the other adapter of {self.key!r}.'
            )
        for name, want, (shape, _) in zip(names, (self.a_shape, self.b_shape), found, strict=True):
            if tuple(shape) != want:
                raise LoraMismatchError(
                    f'Adapter {name!r} in {where} has shape {tuple(shape)}, but weight '
                    f'{self.key!r} {self.shape} with rank {self.rank}, {self.batch_axes} batch '
                    f'and {self.in_axes} input axes needs {want}.{_rank_hint(self, name, shape)}'
                )
        return dataclasses.replace(self, dtype=np.dtype(found[0][1]).name)

    def delta(self, a: Any, b: Any) -> Any:
        """`scale * A @ B` as an array of the weight's shape."""
        return self.scale * low_rank_delta(a, b, self.batch_axes, self.in_axes)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out['shape'] = list(self.shape)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Adapter:
        return cls(**{**data, 'shape': tuple(data['shape'])})


def _rank_hint(adapter: Adapter, name: KeyPath, shape: Shape) -> str:
    axis = -1 if name == adapter.a_key else adapter.batch_axes
    if len(shape) == len(adapter.a_shape if axis == -1 else adapter.b_shape):
        return f' Its rank axis has size {shape[axis]}: was it made with rank {shape[axis]}?'
    return ''
